"""Synthetic results in the workflow's layout (for the report's tests and for trying the report
without training anything): known logits -> known accuracies.

Written in the real formats: scores.npz as `smallbig/engine/metrics.py` documents it, and
metrics.json with the engine's own `build_metrics`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from smallbig.engine import metrics as M
from smallbig.engine.evaluate import build_metrics
from smallbig.spec.protocol import Protocol


def view_index(clips: int, crops: int) -> tuple[np.ndarray, np.ndarray]:
    """clip_idx, crop_idx of V = clips × crops views, clip-major (as the data layer orders them)."""
    return (
        np.repeat(np.arange(clips), crops).astype(np.int64),
        np.tile(np.arange(crops), clips).astype(np.int64),
    )


def make_logits(
    labels, num_classes: int, views: int, correct, in_top5=None, margin: float = 4.0
) -> np.ndarray:
    """[N, V, K] logits, the same for every view: video i predicts its label when correct[i],
    else the next class; its label is then second (in the top 5) when in_top5[i], else last."""
    labels = np.asarray(labels)
    n = len(labels)
    correct = np.asarray(correct, dtype=bool)
    in_top5 = np.ones(n, bool) if in_top5 is None else np.asarray(in_top5, dtype=bool)
    logits = np.zeros((n, views, num_classes), np.float32)
    for i, y in enumerate(labels):
        if correct[i]:
            logits[i, :, y] = margin
        else:
            logits[i, :, (y + 1) % num_classes] = margin
            logits[i, :, y] = margin / 2 if in_top5[i] else -margin
    return logits


def write_scores(
    path: Path, logits: np.ndarray, labels, clips: int, crops: int, video_ids=None, skipped=()
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = logits.shape[0]
    clip_idx, crop_idx = view_index(clips, crops)
    if logits.shape[1] != clips * crops:
        raise ValueError(f"logits have {logits.shape[1]} views, protocol {clips}x{crops} has {clips * crops}")
    ids = np.array(video_ids if video_ids is not None else [f"vid{i:04d}" for i in range(n)])
    np.savez(
        path,
        logits=logits.astype(np.float32),
        labels=np.asarray(labels, np.int64),
        video_ids=ids.astype(str),
        clip_idx=clip_idx,
        crop_idx=crop_idx,
        num_clips=np.int64(clips),
        num_crops=np.int64(crops),
        skipped=np.array(list(skipped), dtype=str),
    )
    return path


def write_evaluation(
    run_dir: Path,
    exp_id: str,
    protocol: str,
    logits: np.ndarray,
    labels,
    with_metrics: bool = True,
    video_ids=None,
    skipped=(),
) -> Path:
    """results/<run>/<id>/eval-<protocol>/{scores.npz, metrics.json}; returns the eval dir."""
    clips, crops = Protocol.parse(protocol).clips, Protocol.parse(protocol).crops
    ev = Path(run_dir) / exp_id / f"eval-{protocol}"
    write_scores(ev / "scores.npz", logits, labels, clips, crops, video_ids, skipped)
    if with_metrics:
        m = build_metrics(M.load_scores(ev / "scores.npz"), exp_id, protocol, None)
        (ev / "metrics.json").write_text(json.dumps(m, indent=1))
    return ev


def write_training(
    run_dir: Path,
    exp_id: str,
    epochs: int,
    total_epochs: int | None = None,
    finished: bool = True,
    params: dict | None = None,
) -> Path:
    """train/history.json (loss falling, cosine LR, val Top-1 every epoch), and when finished
    a checkpoint.pt placeholder and train_metrics.json; `params` -> results/<run>/<id>/params.yaml."""
    d = Path(run_dir) / exp_id
    train = d / "train"
    train.mkdir(parents=True, exist_ok=True)
    total = total_epochs or epochs
    hist = [
        {
            "epoch": e + 1,
            "iteration": 10 * (e + 1),
            "loss": 2.0 / (e + 1),
            "lr": 0.01 * 0.5 * (1 + np.cos(np.pi * (e + 1) / total)),
            "val_top1": 20.0 + 5 * e,
            "clips_per_s": 100.0,
            "peak_mem_mb": 10.0,
            "skipped": 0,
        }
        for e in range(epochs)
    ]
    (train / "history.json").write_text(json.dumps(hist))
    if params is not None:
        (d / "params.yaml").write_text(yaml.safe_dump(params))
    if finished:
        (train / "checkpoint.pt").write_bytes(b"placeholder: not a real checkpoint")
        (train / "train_metrics.json").write_text(
            json.dumps(
                {
                    "experiment": exp_id,
                    "epochs": total,
                    "device": "cuda:0",
                    "world_size": 2,
                    "wall_time_s_this_process": 1800.0,
                    "val_top1": hist[-1]["val_top1"] if hist else None,
                }
            )
        )
    return train


def write_model_info(run_dir: Path, infos: dict[str, dict]) -> Path:
    """results/<run>/model-info.json as `smallbig model-info --all --json` writes it (a list)."""
    p = Path(run_dir) / "model-info.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps([{"id": k, **v} for k, v in infos.items()], indent=1))
    return p
