"""Data-loading throughput on the embedded dataset (hand-run; not a test).

  .venv/bin/python benchmarks/data_throughput.py [--work DIR] [--workers 2] [--seconds 20]

Measures, on the Kinetics-style embedded dataset (160x120 h264 videos):
  1. training clips/s (8 x 224 x 224, random short side [256, 320] + crop + flip, batch 8) with
     `--workers` DataLoader workers, reading videos (decord) and JPEG frames (short side 256);
  2. multi-view evaluation videos/s (10 clips x 3 crops of 256, short side 256): decode once per
     video (the dataset's test mode) vs decode per view (every view decodes its own frames).
Writes benchmarks/results/data_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallbig.data import sampling  # noqa: E402
from smallbig.data.dataset import build_dataset, collate  # noqa: E402
from smallbig.data.prepare import prepare  # noqa: E402
from smallbig.data.readers import open_video  # noqa: E402
from smallbig.data.toy import make_toy  # noqa: E402


def params(root: Path, src: Path, fmt: str) -> dict:
    return {
        "data": {
            "dataset": "kinetics400",
            "root": str(root),
            "source": {"base_url": str(src)},
            "format": fmt,
            "num_frames": 8,
            "sampling": "dense",
            "frame_stride": 4,
            "train_short_side": [256, 320],
            "crop_size": 224,
            "flip": True,
            "frame_short_side": 256,
        },
        "test": {"short_side": 256, "multi_crop_size": 256, "single_crop_size": 224},
    }


def train_rate(p: dict, workers: int, seconds: float, batch: int = 8) -> dict:
    ds = build_dataset(p, "train", "train")
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    clips, batches, t0, warm = 0, 0, None, 2
    while True:
        for b in loader:
            batches += 1
            if batches == warm:
                t0, clips = time.perf_counter(), 0
            elif batches > warm:
                clips += b["video"].shape[0]
                assert b["video"].shape[1:] == (3, 8, 224, 224)
            if t0 is not None and time.perf_counter() - t0 >= seconds:
                dt = time.perf_counter() - t0
                return {"clips_per_s": clips / dt, "clips": clips, "seconds": dt}


def eval_once_rate(p: dict, n_videos: int) -> dict:
    ds = build_dataset(p, "val", "test", "10x3")
    ds[0]  # warm up
    t0 = time.perf_counter()
    for i in range(n_videos):
        item = ds[i % len(ds)]
        assert item["video"].shape == (30, 3, 8, 256, 256)
    dt = time.perf_counter() - t0
    return {"videos_per_s": n_videos / dt, "videos": n_videos, "seconds": dt}


def eval_per_view_rate(p: dict, n_videos: int) -> dict:
    """Baseline: every view opens the video, decodes its clip's frames, resizes and crops."""
    ds = build_dataset(p, "val", "test", "10x3")
    d, t = p["data"], p["test"]

    def one(entry):
        n = len(open_video(ds.root / entry.path))
        views = []
        for _c, idx in enumerate(sampling.test_indices(n, d, 10)):
            for k in range(3):
                frames = open_video(ds.root / entry.path).get(idx)
                x = sampling.resize_short(sampling.frames_tensor(frames), t["short_side"])
                y0, x0 = sampling.crop_boxes(*x.shape[-2:], t["multi_crop_size"], 3)[k]
                s = t["multi_crop_size"]
                views.append(x[..., y0 : y0 + s, x0 : x0 + s].permute(1, 0, 2, 3).contiguous())
        return torch.stack(views)

    one(ds.entries[0])
    t0 = time.perf_counter()
    for i in range(n_videos):
        v = one(ds.entries[i % len(ds)])
        assert v.shape == (30, 3, 8, 256, 256)
    dt = time.perf_counter() - t0
    return {"videos_per_s": n_videos / dt, "videos": n_videos, "seconds": dt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/smallbig-data-bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--eval-videos", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_throughput"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    if not (work / "toy" / "toy.json").exists():
        make_toy(work / "toy", seed=0, datasets=("kinetics400",))
    src = work / "toy" / "kinetics400"
    pv = params(work / "k400-video", src, "video")
    pf = params(work / "k400-frames", src, "frames")
    prepare(pv, progress=False)
    prepare(pf, progress=False)
    res = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads_main": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
        },
        "dataset": "embedded Kinetics-style (160x120 h264, 48-72 frames), upscaled to short side 256-320",
        "train_workers": args.workers,
    }
    res["train_video"] = train_rate(pv, args.workers, args.seconds)
    res["train_frames"] = train_rate(pf, args.workers, args.seconds)
    res["eval_10x3_decode_once"] = eval_once_rate(pv, args.eval_videos)
    res["eval_10x3_decode_per_view"] = eval_per_view_rate(pv, max(4, args.eval_videos // 4))
    res["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = [
        "# Data throughput (embedded dataset)",
        "",
        f"Machine: {res['machine']['cpus']} CPUs, {res['machine']['platform']}, torch {res['machine']['torch']}; "
        f"load average at start {np.round(res['machine']['loadavg_start'], 1).tolist()} (other jobs running "
        f"lower these numbers).",
        "",
        "| measurement | rate |",
        "|---|---|",
        f"| train clips/s, 8x224^2, {args.workers} workers, videos (decord) | {res['train_video']['clips_per_s']:.1f} |",
        f"| train clips/s, 8x224^2, {args.workers} workers, JPEG frames | {res['train_frames']['clips_per_s']:.1f} |",
        f"| eval videos/s, 10x3 views of 256^2, decode once | {res['eval_10x3_decode_once']['videos_per_s']:.2f} |",
        f"| eval videos/s, 10x3 views of 256^2, decode per view | {res['eval_10x3_decode_per_view']['videos_per_s']:.2f} |",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
