"""Feature-map visualisations (paper Fig. 3 and Sec. 6.3).

For chosen validation videos: the input frames; the channel-averaged output of res3 (the paper
shows res3.2, 8×28×28 for a 224 input) of the SmallBig model and of the NonLocal model, each
overlaid on the frames; and the small-view vs big-view maps (the two BN outputs before their sum)
of the first SmallBig unit. Uses `smallbig.models.feature_maps(model, x)`, the engine's
`load_model_from_checkpoint(path)` (any smallbig checkpoint) and the data layer's
`build_dataset(params, "val", "val")` and `normalize` (docs/architecture.md).

Default models: the Table 7 pair, `k400-r23-sb-full` (SmallBig) and `k400-r23-nonlocal`, from
`results/<run>/<id>/train/checkpoint.pt`. Whatever is missing is said in the figure and in
`featmaps.json`; nothing here fails the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from smallbig.analysis.figures import MIN_FONT_PT, min_font_px, save_figure  # noqa: E402
from smallbig.data import build_dataset, normalize  # noqa: E402
from smallbig.engine.checkpoint import load_model_from_checkpoint  # noqa: E402
from smallbig.fsutil import atomic_write_json  # noqa: E402
from smallbig.models import feature_maps  # noqa: E402
from smallbig.spec.params import DataSpec  # noqa: E402

DEFAULT_SMALLBIG = "k400-r23-sb-full"
DEFAULT_NONLOCAL = "k400-r23-nonlocal"


# ---------------------------------------------------------------------------- input
def val_clips(params: dict, n: int, video_ids: list[str] | None = None) -> list[dict]:
    """Up to n validation clips {"video": uint8 [3,T,H,W], "video_id", "label"} (the data
    layer's val dataset; undecodable videos are skipped)."""
    ds = build_dataset(params, "val", "val")
    want = len(video_ids) if video_ids else n
    clips = []
    for i in range(len(ds)):
        if len(clips) >= want:
            break
        item = ds[i]
        if not item or (video_ids and str(item["video_id"]) not in video_ids):
            continue  # None / BadSample: could not be decoded (logged by the data layer)
        clips.append(
            {
                "video": np.asarray(item["video"]),
                "video_id": str(item["video_id"]),
                "label": int(item["label"]),
            }
        )
    return clips[:n]


def _normalize(video_u8: np.ndarray, params: dict) -> torch.Tensor:
    data = DataSpec.from_dict(params["data"])
    return normalize(torch.from_numpy(np.ascontiguousarray(video_u8))[None], data.mean, data.std)


def channel_mean_maps(model, x) -> dict[str, np.ndarray]:
    """{"res3"|"small_view"|"big_view": float [T,H,W]} channel-averaged maps of one clip."""
    with torch.no_grad():
        fm = feature_maps(model, x)
    out = {}
    for k in ("res3", "small_view", "big_view"):
        if k in fm and fm[k] is not None:
            out[k] = fm[k][0].float().mean(dim=0).cpu().numpy()
    return out


# ---------------------------------------------------------------------------- drawing
def _upsample(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """[h', w'] -> [h, w], bilinear (numpy; no scipy needed)."""
    hh, ww = m.shape
    ys = np.linspace(0, hh - 1, h)
    xs = np.linspace(0, ww - 1, w)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, hh - 1)
    x1 = np.minimum(x0 + 1, ww - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    top = m[y0][:, x0] * (1 - wx) + m[y0][:, x1] * wx
    bot = m[y1][:, x0] * (1 - wx) + m[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def _norm01(m: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(m)), float(np.max(m))
    return np.zeros_like(m) if hi - lo < 1e-12 else (m - lo) / (hi - lo)


def featmap_figure(
    video_u8: np.ndarray, rows: list[tuple[str, np.ndarray | str]], title: str, max_frames: int = 8
):
    """Figure: row 0 = frames; then one row per (name, map [T',H',W'] or a reason string).
    Maps are min-max normalised over the whole clip and overlaid on the frames (jet, alpha .5)."""
    T = video_u8.shape[1]
    ti = np.unique(np.linspace(0, T - 1, min(T, max_frames)).round().astype(int))
    n_rows = 1 + len(rows)
    fig, axes = plt.subplots(
        n_rows, len(ti), figsize=(1.2 * len(ti) + 1.6, 1.25 * n_rows + 0.5), squeeze=False
    )
    frames = video_u8.transpose(1, 2, 3, 0)  # [T,H,W,3]
    H, W = frames.shape[1:3]
    for j, t in enumerate(ti):
        axes[0][j].imshow(frames[t])
        axes[0][j].set_title(f"t={t}", fontsize=MIN_FONT_PT)
    axes[0][0].set_ylabel("input", fontsize=MIN_FONT_PT)
    for i, (name, m) in enumerate(rows, start=1):
        axes[i][0].set_ylabel(name.replace(" ", "\n", 1), fontsize=MIN_FONT_PT)
        if isinstance(m, str):
            for j in range(len(ti)):
                axes[i][j].imshow(np.full((H, W, 3), 235, np.uint8))
            axes[i][0].text(
                0.02, 0.5, m, transform=axes[i][0].transAxes, fontsize=MIN_FONT_PT, va="center", wrap=True
            )
            continue
        m01 = _norm01(np.asarray(m, dtype=np.float64))
        Tm = m01.shape[0]
        for j, t in enumerate(ti):
            tm = min(Tm - 1, int(round(t * (Tm - 1) / max(T - 1, 1)))) if Tm > 1 else 0
            axes[i][j].imshow(frames[t])
            axes[i][j].imshow(_upsample(m01[tm], H, W), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- driver
def write_featmaps(
    results_dir: str | Path,
    out_dir: str | Path,
    smallbig: str = DEFAULT_SMALLBIG,
    nonlocal_id: str = DEFAULT_NONLOCAL,
    num_videos: int = 2,
    video_ids: list[str] | None = None,
    smallbig_ckpt: str | Path | None = None,
    nonlocal_ckpt: str | Path | None = None,
) -> dict:
    """Figures `featmaps/<video>.{png,svg}` for the chosen val videos; returns the manifest
    {"figures": [...], "missing": [...]} (also written to <out_dir>/featmaps.json)."""
    results_dir = Path(results_dir)
    out = Path(out_dir)
    (out / "featmaps").mkdir(parents=True, exist_ok=True)  # always there (a directory() output)
    ckpts = {
        "SmallBig": Path(smallbig_ckpt)
        if smallbig_ckpt
        else results_dir / smallbig / "train" / "checkpoint.pt",
        "NonLocal": Path(nonlocal_ckpt)
        if nonlocal_ckpt
        else results_dir / nonlocal_id / "train" / "checkpoint.pt",
    }
    models: dict[str, Any] = {}
    missing: list[str] = []
    for name, path in ckpts.items():
        if not path.is_file():
            missing.append(f"{name}: no checkpoint at {path}")
            continue
        try:
            models[name] = load_model_from_checkpoint(path)
        except Exception as e:  # noqa: BLE001 — CheckpointError, a model that cannot be built: said, not fatal
            missing.append(f"{name}: {e}")
    manifest: dict[str, Any] = {
        "figures": [],
        "missing": missing,
        "checkpoints": {k: str(v) for k, v in ckpts.items()},
    }
    if not models:
        atomic_write_json(out / "featmaps.json", manifest, indent=1)
        return manifest
    params = (models.get("SmallBig") or next(iter(models.values())))[1]
    try:
        clips = val_clips(params, num_videos, video_ids)
    except Exception as e:  # noqa: BLE001
        manifest["missing"].append(f"validation videos: {e}")
        clips = []
    if not clips:
        manifest["missing"].append("no decodable validation video")
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # inference only; the caller's setting is restored
    try:
        for clip in tqdm(clips, desc="feature maps", unit="video", leave=False):
            rows: list[tuple[str, Any]] = []
            maps = {}
            for name in ("SmallBig", "NonLocal"):
                if name not in models:
                    rows.append((f"{name} res3", "model not available"))
                    continue
                model, p = models[name]
                try:
                    maps[name] = channel_mean_maps(model, _normalize(clip["video"], p))
                    rows.append((f"{name} res3", maps[name]["res3"]))
                except Exception as e:  # noqa: BLE001
                    rows.append((f"{name} res3", f"failed: {e}"))
            sb = maps.get("SmallBig", {})
            for k, label in (("small_view", "small view"), ("big_view", "big view")):
                rows.append((f"SmallBig {label}", sb.get(k, "not available")))
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(clip["video_id"]).stem)
            stem = out / "featmaps" / safe
            fig = featmap_figure(
                clip["video"],
                rows,
                f"{clip['video_id']} (label {clip['label']}): "
                "channel-averaged res3 maps; small vs big view of the first SmallBig unit",
            )
            save_figure(fig, stem, close=False)
            font_px = min_font_px(fig, draw=False)
            plt.close(fig)
            rel = stem.relative_to(out).as_posix()
            manifest["figures"].append(
                {
                    "png": f"{rel}.png",
                    "svg": f"{rel}.svg",
                    "category": "Feature maps",
                    "video_id": clip["video_id"],
                    "min_font_px": font_px,
                    "wide": True,
                    "caption": f"Feature maps (paper Fig. 3) for {clip['video_id']}: input frames, "
                    "channel-averaged res3 of SmallBig and NonLocal, small vs big view of the "
                    "first SmallBig unit.",
                }
            )
    finally:
        torch.set_grad_enabled(grad_was)
    atomic_write_json(out / "featmaps.json", manifest, indent=1)
    return manifest
