"""Data-loading throughput (hand-run; not a test). Three modes.

  .venv/bin/python benchmarks/data_throughput.py [--work DIR] [--workers 2] [--seconds 20]
  .venv/bin/python benchmarks/data_throughput.py --full [--work DIR] [--videos 24] [--clips 96]

Default: on the Kinetics-style embedded dataset (160x120 h264 videos):
  1. training clips/s (8 x 224 x 224, random short side [256, 320] + crop + flip, batch 8) with
     `--workers` DataLoader workers, reading videos (decord) and JPEG frames (short side 256);
  2. multi-view evaluation videos/s (10 clips x 3 crops of 256, short side 256): decode once per
     video (the dataset's test mode) vs decode per view (every view decodes its own frames).
Writes benchmarks/results/data_throughput.json and .md.

--full: the loader at full shape (benchmarks/results/data_throughput_full.{json,md}). Real sources
at Kinetics' prepared size: `--videos` H.264 mp4 of 10 s at 25 fps, 568x320 (short side 320),
synthetic but camera-like content (panned multi-scale texture, moving objects, sensor noise), and
their JPEG frames extracted by the project's own `smallbig data frames` function at short side
320. The training transform of params/experiments/k400-r50-sb-full.yaml (8 frames, stride 8,
short side U[256, 320], 224 crop, flip). Measures (1) CPU ms per clip, split into open, decode and
transform, in this process, for the two sources and for cheaper alternatives (short GOPs so decord
seeks instead of decoding from the first frame, sources re-encoded at short side 256 by the
project's `smallbig data resize` function, JPEG frames at 256); (2) DataLoader clips/s with 1 and
2 workers: wall clips/s here, and clips per CPU-second (the workers' and this process's CPU time,
from getrusage: robust on a shared machine), hence the CPU cores one GPU needs:
cores per GPU = GPU training clips/s / clips per CPU-second.

--cache PARAMS...: CPU time of reading the train split (`--epochs` times) and the val split, with
and without the decoded-frame cache (data.decode_cache_mb), clips asserted bitwise identical
(benchmarks/results/data_cache.{json,md}); PARAMS: resolved params, e.g.
results/embedded/k400-r23-sb-full/params.yaml after an embedded run.
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


# --------------------------------------------------------------------------- --full
FULL_H, FULL_W, FPS = 320, 568, 25  # Kinetics is mostly 16:9: 568x320 at short side 320


def synth_video(n: int, rng: np.random.Generator, h: int = FULL_H, w: int = FULL_W) -> np.ndarray:
    """Camera-like frames uint8 [n, h, w, 3]: a multi-scale texture panned across the frame, three
    objects moving over it, and per-frame sensor noise (so that the encoder has real work)."""
    import torch.nn.functional as F

    H, W = h + 96, w + 192
    canvas = torch.zeros(3, H, W)
    for scale, weight in ((64, 0.5), (16, 0.3), (4, 0.2)):
        small = torch.from_numpy(rng.random((1, 3, H // scale + 2, W // scale + 2), dtype=np.float32))
        canvas += weight * F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False)[0]
    canvas = (canvas.clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    t = np.arange(n)
    ox = (rng.uniform(0.2, 1.0) * 192 * t / max(1, n - 1)).astype(int)
    oy = (48 + 40 * np.sin(2 * np.pi * t / rng.uniform(60, 120))).astype(int)
    yy, xx = np.mgrid[0:h, 0:w]
    objs = [
        (
            rng.uniform(20, w - 20),
            rng.uniform(20, h - 20),
            rng.uniform(-4, 4),
            rng.uniform(-3, 3),
            rng.uniform(15, 45),
            rng.integers(0, 256, 3),
        )
        for _ in range(3)
    ]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        f = canvas[oy[i] : oy[i] + h, ox[i] : ox[i] + w].copy()
        for x0, y0, vx, vy, r, col in objs:
            x = abs((x0 + vx * i) % (2 * w) - w) if w else 0  # bounce off the borders
            y = abs((y0 + vy * i) % (2 * h) - h) if h else 0
            f[(xx - x) ** 2 + (yy - y) ** 2 < r * r] = col
        f += rng.integers(-10, 11, size=f.shape)
        out[i] = f.clip(0, 255)
    return out


def encode_h264(frames: np.ndarray, path: Path, gop: int | None = None) -> None:
    """The toy encoder's settings (smallbig.data.toy.encode_video: libx264 veryfast crf 23, one
    thread); `gop` sets the keyframe interval (x264's default: 250 frames, one keyframe in 10 s)."""
    import subprocess

    import imageio_ffmpeg

    t, h, w = frames.shape[:3]
    x264 = "threads=1:lookahead-threads=1" + (f":keyint={gop}:min-keyint={gop}" if gop else "")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-f", "rawvideo"]
    cmd += ["-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(FPS), "-i", "-", "-c:v", "libx264"]
    cmd += ["-preset", "veryfast", "-crf", "23", "-threads", "1", "-x264-params", x264]
    cmd += ["-movflags", "+faststart", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True, capture_output=True)


def make_full_sources(work: Path, n_videos: int, seconds: float) -> dict[str, list]:
    """Sources (kept in `work` between runs): name -> (format, entries) relative to `work`."""
    from smallbig.data.frames import extract_frames, resize_videos
    from smallbig.data.lists import Entry

    n = int(round(seconds * FPS))
    plain, gop16 = [], []
    for i in range(n_videos):
        a, b = work / f"videos/vid_{i:03d}.mp4", work / f"videos_gop16/vid_{i:03d}.mp4"
        if not (a.exists() and b.exists()):
            a.parent.mkdir(parents=True, exist_ok=True)
            b.parent.mkdir(parents=True, exist_ok=True)
            frames = synth_video(n, np.random.default_rng(i))
            encode_h264(frames, a)
            encode_h264(frames, b, gop=16)
        plain.append(Entry(f"videos/vid_{i:03d}.mp4", i % 8, None))
        gop16.append(Entry(f"videos_gop16/vid_{i:03d}.mp4", i % 8, None))
    v256, failed = resize_videos(work, plain, "videos_256", 256, progress=False)  # `smallbig data resize`
    f320, failed2 = extract_frames(work, plain, "frames", 320, workers=2, progress=False)
    f256, failed3 = extract_frames(work, plain, "frames_256", 256, workers=2, progress=False)
    if failed or failed2 or failed3:
        raise SystemExit(f"source preparation failed: {failed + failed2 + failed3}")
    return {
        "video 320 (GOP 250)": ["video", plain],
        "frames 320": ["frames", f320],
        "video 320, GOP 16": ["video", gop16],
        "video 256 (resized)": ["video", v256],
        "frames 256": ["frames", f256],
    }


def source_stats(work: Path, entries: list, fmt: str) -> dict:
    if fmt == "video":
        from smallbig.data.readers import stream_info

        size = sum((work / e.path).stat().st_size for e in entries)
        info = stream_info(str(work / entries[0].path))
        return {
            "mb": round(size / 2**20, 1),
            "kbit_s": round(size * 8 / 1e3 / (len(entries) * 10), 0),
            "size": f"{info.width}x{info.height}",
        }
    size = sum(p.stat().st_size for e in entries for p in (work / e.path).glob("*.jpg"))
    return {
        "mb": round(size / 2**20, 1),
        "kb_per_frame": round(size / 1e3 / sum(e.num_frames for e in entries), 1),
    }


def full_dataset(work: Path, fmt: str, entries: list, data):
    from smallbig.data.dataset import VideoDataset

    return VideoDataset(work, entries, fmt, "train", data, {})


def clip_costs(ds, clips: int, seed: int = 0) -> dict:
    """CPU ms per training clip in this process (1 thread): open, decode, transform."""
    from smallbig.data import sampling

    rng = np.random.default_rng(seed)
    d = ds.data
    t = {"open": 0.0, "decode": 0.0, "transform": 0.0}
    for _ in range(clips):
        e = ds.entries[int(rng.integers(len(ds)))]
        c0 = time.process_time()
        reader = ds.open(e)
        c1 = time.process_time()
        frames = reader.get(sampling.train_indices(len(reader), d, rng))
        c2 = time.process_time()
        clip = sampling.train_view(frames, d.train_short_side, d.crop_size, d.flip, rng)
        c3 = time.process_time()
        assert clip.shape == (3, d.num_frames, d.crop_size, d.crop_size)
        t["open"] += c1 - c0
        t["decode"] += c2 - c1
        t["transform"] += c3 - c2
    out = {k: round(1000 * v / clips, 2) for k, v in t.items()}
    out["total"] = round(sum(out.values()), 2)
    out["clips_per_cpu_s"] = round(1000 / out["total"], 1)
    return out


def loader_rate(ds, workers: int, clips: int, batch: int = 8) -> dict:
    """DataLoader (the engine's settings: batch 8, collate) over `clips` random clips. CPU time of
    the workers from getrusage(RUSAGE_CHILDREN) once they have exited (non-persistent workers
    are joined when the iteration ends), plus this process's."""
    import resource

    from smallbig.data.dataset import collate

    sampler = torch.utils.data.RandomSampler(
        ds, replacement=True, num_samples=clips, generator=torch.Generator().manual_seed(workers)
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
    )
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0, t0, n = time.process_time(), time.perf_counter(), 0
    for b in loader:
        n += b["video"].shape[0]
        assert b["video"].shape[1:] == (3, ds.data.num_frames, ds.data.crop_size, ds.data.crop_size)
    wall = time.perf_counter() - t0
    main_cpu = time.process_time() - c0
    del loader
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    cpu = worker_cpu + main_cpu
    return {
        "workers": workers,
        "clips": n,
        "wall_s": round(wall, 2),
        "clips_per_s": round(n / wall, 1),
        "worker_cpu_s": round(worker_cpu, 2),
        "main_cpu_s": round(main_cpu, 2),
        "clips_per_cpu_s": round(n / cpu, 1),
    }


def gpu_rate() -> tuple[float, str]:
    """GPU training clips/s: a measured figure when benchmarks/results has one, else the plan's guess."""
    import yaml

    base = yaml.safe_load((REPO / "params" / "base.yaml").read_text())
    return float(base["train"]["clips_per_sec_per_gpu"]), (
        "GUESS: params/base.yaml train.clips_per_sec_per_gpu (the plan's paper-scale assumption; "
        "no GPU measurement exists yet)"
    )


def main_full(args) -> int:
    from smallbig.config import load_params
    from smallbig.spec.params import DataSpec

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sources = make_full_sources(work, args.videos, 10.0)
    prep_s = time.time() - t0
    exp = load_params(REPO / "params" / "experiments" / "k400-r50-sb-full.yaml")
    data = DataSpec.from_dict(exp["data"])
    res: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "transform": {
            "params": "params/experiments/k400-r50-sb-full.yaml",
            "num_frames": data.num_frames,
            "frame_stride": data.frame_stride,
            "train_short_side": list(data.train_short_side),
            "crop_size": data.crop_size,
            "flip": data.flip,
        },
        "sources": {},
        "per_clip_ms": {},
        "loader": {},
        "source_preparation_s": round(prep_s, 1),
        "videos": args.videos,
    }
    for name, (fmt, entries) in sources.items():
        res["sources"][name] = source_stats(work, entries, fmt)
        ds = full_dataset(work, fmt, entries, data)
        clip_costs(ds, 4, seed=99)  # warm up (imports, file cache)
        res["per_clip_ms"][name] = clip_costs(ds, args.clips // 2)
        print(name, res["sources"][name], res["per_clip_ms"][name], flush=True)
    for name in ("video 320 (GOP 250)", "frames 320"):
        fmt, entries = sources[name]
        ds = full_dataset(work, fmt, entries, data)
        clips = args.clips * (
            5 if fmt == "frames" else 1
        )  # frames are ~8x cheaper: amortise the workers' start
        res["loader"][name] = [loader_rate(ds, w, clips) for w in (1, 2)]
        print(name, res["loader"][name], flush=True)
    rate, label = gpu_rate()
    res["gpu"] = {"clips_per_s": rate, "source": label}
    res["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out + "_full")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = full_markdown(res, args)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def full_markdown(res: dict, args) -> str:
    m, tr, g = res["machine"], res["transform"], res["gpu"]
    lines = [
        "# Loader at full shape (training clips 8 x 224^2)",
        "",
        f"`python benchmarks/data_throughput.py --full --videos {args.videos} --clips {args.clips}`; "
        f"{m['cpus']} CPUs, {m['platform']}, torch {m['torch']}, 1 torch thread per process; load average "
        f"{np.round(m['loadavg_start'], 1).tolist()} at start, {np.round(m['loadavg_end'], 1).tolist()} at "
        "the end (the machine was shared: wall rates are low, CPU-time rates hold).",
        "",
        f"Sources: {res['videos']} synthetic camera-like videos, 10 s at 25 fps (250 frames), H.264 "
        f"{FULL_W}x{FULL_H} (libx264 veryfast crf 23, as the toy encoder), and their JPEG frames (quality 90) "
        "from the project's frame extraction. Transform: "
        f"{tr['params']}: {tr['num_frames']} frames stride {tr['frame_stride']}, short side "
        f"U{tr['train_short_side']}, {tr['crop_size']}^2 crop, flip {tr['flip']}.",
        "",
        "## CPU per clip, one process (ms; clips per CPU-second = 1000 / total)",
        "",
        "| source | size on disk | open | decode | transform | total | clips per CPU-s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in res["per_clip_ms"].items():
        s = res["sources"][name]
        disk = (
            f"{s['mb']} MB, {s['kbit_s']:.0f} kbit/s"
            if "kbit_s" in s
            else f"{s['mb']} MB, {s['kb_per_frame']} kB/frame"
        )
        lines.append(
            f"| {name} | {disk} | {c['open']} | {c['decode']} | {c['transform']} | {c['total']} | "
            f"{c['clips_per_cpu_s']} |"
        )
    lines += [
        "",
        "## DataLoader (batch 8, the dataset's collate)",
        "",
        "| source | workers | clips | wall clips/s (loaded machine) | worker CPU s | main CPU s | "
        f"clips per CPU-s | cores per GPU at {g['clips_per_s']:g} clips/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in res["loader"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['workers']} | {r['clips']} | {r['clips_per_s']} | {r['worker_cpu_s']} | "
                f"{r['main_cpu_s']} | {r['clips_per_cpu_s']} | {g['clips_per_s'] / r['clips_per_cpu_s']:.1f} |"
            )
    v, f = res["per_clip_ms"]["video 320 (GOP 250)"], res["per_clip_ms"]["frames 320"]
    lines += [
        "",
        f"Open + decode are {100 * (v['open'] + v['decode']) / v['total']:.0f} % of a clip's CPU from video "
        f"and {100 * (f['open'] + f['decode']) / f['total']:.0f} % from JPEG frames; a clip from video costs "
        f"{v['total'] / f['total']:.1f}x one from frames.",
    ]
    lines += [
        "",
        f"cores per GPU = (GPU training clips/s) / (clips per CPU-second); GPU rate {g['clips_per_s']:g} clips/s: "
        f"{g['source']}.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- --cache
def cache_cost(params_file: str, epochs: int) -> dict:
    """Process CPU time of reading the train split `epochs` times (items seeded as the engine's
    SeededDataset), and the val split once, with and without data.decode_cache_mb; asserts that
    every clip is bitwise identical."""
    import copy

    from smallbig.config import load_params
    from smallbig.data.dataset import build_dataset
    from smallbig.engine.seeding import SeededDataset

    p = load_params(params_file)
    p["data"]["num_workers"] = 0  # in this process (no preload)
    on = copy.deepcopy(p)
    on["data"]["decode_cache_mb"] = max(1024, int(p["data"].get("decode_cache_mb") or 0))
    p["data"]["decode_cache_mb"] = 0
    out: dict = {"params": params_file, "format": p["data"]["format"], "epochs": epochs}
    for split, mode, n_ep in (("train", "train", epochs), ("val", "val", 1)):
        ds_off, ds_on = build_dataset(p, split, mode), build_dataset(on, split, mode)
        a, b = SeededDataset(ds_off), SeededDataset(ds_on)
        cpu = [0.0, 0.0]
        for ep in range(n_ep):
            for i in range(len(ds_off)):
                key = (i, 1000 * ep + i)
                c0 = time.process_time()
                x = a[key]
                c1 = time.process_time()
                y = b[key]
                c2 = time.process_time()
                cpu[0] += c1 - c0
                cpu[1] += c2 - c1
                assert bool(x) == bool(y) and (not x or torch.equal(x["video"], y["video"])), (split, i)
        out[mode] = {
            "items": len(ds_off),
            "cpu_s_without": round(cpu[0], 2),
            "cpu_s_with": round(cpu[1], 2),
            "cache": ds_on.cache.stats(),
        }
    return out


def main_cache(args) -> int:
    torch.set_num_threads(1)
    res = {"loadavg_start": os.getloadavg(), "runs": [cache_cost(f, args.epochs) for f in args.cache]}
    res["loadavg_end"] = os.getloadavg()
    out = Path(args.out).with_name("data_cache")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = [
        "# Decoded-frame cache (data.decode_cache_mb): CPU time of reading the data, with and without",
        "",
        f"`python benchmarks/data_throughput.py --cache {' '.join(args.cache)} --epochs {args.epochs}` "
        "(resolved params of a finished embedded run); process CPU time of `dataset[i]`, 1 thread; clips "
        f"asserted bitwise identical; load average {np.round(res['loadavg_start'], 1).tolist()} at start.",
        "",
        "| params | format | split x passes | items | CPU s without | CPU s with | cached MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        for mode, passes in (("train", r["epochs"]), ("val", 1)):
            m = r[mode]
            md.append(
                f"| {Path(r['params']).parent.name} | {r['format']} | {mode} x {passes} | {m['items']} | "
                f"{m['cpu_s_without']} | {m['cpu_s_with']} | {m['cache']['mb']} |"
            )
    md.append("")
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/smallbig-data-bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--eval-videos", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_throughput"))
    ap.add_argument("--full", action="store_true", help="the loader at full shape (module docstring)")
    ap.add_argument("--videos", type=int, default=24, help="--full: source videos")
    ap.add_argument(
        "--clips",
        type=int,
        default=96,
        help="--full: clips per DataLoader measurement from video (x5 from frames)",
    )
    ap.add_argument("--cache", nargs="+", metavar="PARAMS", help="decode-cache cost on these resolved params")
    ap.add_argument("--epochs", type=int, default=2, help="--cache: training epochs")
    args = ap.parse_args()
    if args.cache:
        return main_cache(args)
    if args.full:
        if args.work == ap.get_default("work"):
            args.work = "/tmp/smallbig-data-bench-full"
        return main_full(args)
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
