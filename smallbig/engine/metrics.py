"""Accuracy metrics from saved per-video, per-view logits (the paper's rule: softmax averaged
over views). Pure NumPy, so reports and tests use it without the model.

Saved evaluation scores (`scores.npz`, written by `smallbig evaluate`) hold:
  logits    float32 [N, V, K]   per video, per view, per class
  labels    int64   [N]
  video_ids str     [N]
  clip_idx  int64   [V]         clip index of each view (0..num_clips-1)
  crop_idx  int64   [V]         crop index of each view (0..num_crops-1; 1 crop -> 0)
  num_clips, num_crops  scalars
  skipped   str     [S]         video ids that could not be decoded (counted, never silent)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smallbig.errors import InputError
from smallbig.fsutil import not_regular


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def video_scores(logits: np.ndarray, view_mask: np.ndarray | None = None) -> np.ndarray:
    """[N, V, K] logits -> [N, K] video scores = mean over (selected) views of softmax."""
    probs = softmax(logits.astype(np.float64), axis=-1)
    if view_mask is not None:
        probs = probs[:, np.asarray(view_mask, dtype=bool)]
    if probs.shape[1] == 0:
        raise ValueError("no views selected")
    return probs.mean(axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percentage of videos whose label is among the k highest scores."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    # stable: ties resolved by class index, as argsort on -scores with kind="stable"
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())


def per_class_accuracy(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-1 accuracy (%) per class; NaN for classes with no videos."""
    pred = scores.argmax(axis=1)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            out[c] = 100.0 * (pred[sel] == c).mean()
    return out


def select_views(
    clip_idx: np.ndarray,
    crop_idx: np.ndarray,
    num_clips_total: int,
    clips: int | None = None,
    crops: int | None = None,
    num_crops_total: int | None = None,
) -> np.ndarray:
    """Boolean mask over views for a protocol subset of `clips` clips x `crops` crops.

    Clips: `clips` evenly spaced indices among the saved clips (1 -> the middle clip).
    Crops: 3 -> all three, 1 -> the centre crop (index 1 of 3, or 0 of 1).
    """
    clip_idx = np.asarray(clip_idx)
    crop_idx = np.asarray(crop_idx)
    if num_crops_total is None:
        num_crops_total = int(crop_idx.max()) + 1
    clips = num_clips_total if clips is None else clips
    crops = num_crops_total if crops is None else crops
    if not 1 <= clips <= num_clips_total:
        raise InputError(f"cannot take {clips} clips from {num_clips_total} saved clips")
    if crops not in (1, num_crops_total):
        raise InputError(f"cannot take {crops} crops from {num_crops_total} saved crops")
    if clips == num_clips_total:
        keep_clips = np.arange(num_clips_total)
    elif clips == 1:
        keep_clips = np.array([num_clips_total // 2])
    else:
        keep_clips = np.unique(np.round(np.linspace(0, num_clips_total - 1, clips)).astype(int))
    keep_crops = np.arange(num_crops_total) if crops == num_crops_total else np.array([num_crops_total // 2])
    return np.isin(clip_idx, keep_clips) & np.isin(crop_idx, keep_crops)


def compute_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int | None = None,
    view_mask: np.ndarray | None = None,
) -> dict:
    """top1/top5 (%), mean class accuracy (%), per-class accuracy, number of videos."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = num_classes or logits.shape[-1]
    scores = video_scores(logits, view_mask)
    pca = per_class_accuracy(scores, labels, num_classes)
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "mean_class_acc": float(np.nanmean(pca)) if np.isfinite(pca).any() else float("nan"),
        "per_class_acc": [None if np.isnan(v) else float(v) for v in pca],
        "num_videos": int(len(labels)),
        "num_views": int(logits.shape[1] if view_mask is None else np.sum(view_mask)),
    }


def load_scores(path: str | Path) -> dict:
    """Load a scores.npz written by `smallbig evaluate`; clear error on a bad file
    (FileNotFoundError when missing, else InputError)."""
    path = Path(path)
    kind = not_regular(path)
    if kind and kind.startswith("missing"):
        raise FileNotFoundError(f"{path}: scores file not found")
    if kind:
        raise InputError(f"{path}: is {kind}, not a scores file")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise InputError(f"{path}: not a readable scores file ({e})") from None
    missing = {"logits", "labels", "video_ids", "clip_idx", "crop_idx"} - set(out)
    if missing:
        raise InputError(f"{path}: scores file lacks {sorted(missing)}")
    return out


def subset_metrics(scores: dict, clips: int | None = None, crops: int | None = None) -> dict:
    """Metrics of a clips x crops subset of saved scores (no model run)."""
    num_clips = int(scores.get("num_clips", scores["clip_idx"].max() + 1))
    num_crops = int(scores.get("num_crops", scores["crop_idx"].max() + 1))
    mask = select_views(scores["clip_idx"], scores["crop_idx"], num_clips, clips, crops, num_crops)
    return compute_metrics(scores["logits"], scores["labels"], view_mask=mask)


def ensemble_scores(members: list[dict]) -> dict:
    """Fuse several models' saved scores: per video, average each model's view-averaged softmax.

    Videos are matched by id; only videos present in every member are kept. Returns
    {'scores': [N, K] fused probabilities, 'labels': [N], 'video_ids': [N]}.
    """
    if not members:
        raise InputError("ensemble needs at least one member")
    common = set(members[0]["video_ids"].tolist())
    for m in members[1:]:
        common &= set(m["video_ids"].tolist())
    ids = sorted(common)
    fused = None
    labels = None
    for m in members:
        index = {v: i for i, v in enumerate(m["video_ids"].tolist())}
        rows = np.array([index[v] for v in ids], dtype=np.int64)
        s = video_scores(m["logits"][rows])
        fused = s if fused is None else fused + s
        lab = np.asarray(m["labels"])[rows]
        if labels is not None and not np.array_equal(labels, lab):
            raise InputError("ensemble members disagree on the labels of the same videos")
        labels = lab
    return {"scores": fused / len(members), "labels": labels, "video_ids": np.array(ids)}
