"""The decoded-frame cache (data.decode_cache_mb, smallbig/data/cache.py): the same clips, bitwise,
with and without it; keyed by the file; bounded; damaged files read as without it; shared with
DataLoader workers. Real encoded videos (h264 with one GOP, h264 with short GOPs and B-frames,
VP8 webm) and JPEG frame folders; fast (a few seconds)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from smallbig.data.dataset import build_dataset, collate
from smallbig.data.lists import Entry, write_list
from smallbig.data.toy import encode_video, render
from smallbig.engine.seeding import SeededDataset

KINDS = ("glide", "sway", "teleport", "pulse", "flicker", "up")


def _short_gops(frames: np.ndarray, path: Path) -> None:
    """h264 with a keyframe every 10 frames and 3 B-frames: decord seeks across GOPs."""
    import imageio_ffmpeg

    t, h, w = frames.shape[:3]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-f", "rawvideo"]
    cmd += ["-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", "25", "-i", "-", "-c:v", "libx264"]
    cmd += ["-g", "10", "-bf", "3", "-threads", "1", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True)


def _jpegs(frames: np.ndarray, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, f in enumerate(frames, 1):
        Image.fromarray(f).save(folder / f"img_{i:05d}.jpg", quality=90)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two prepared roots: videos (mp4 one GOP, mp4 short GOPs, webm, a truncated mp4 that cannot
    be opened) and frames (the same, and a folder whose last listed frame is missing)."""
    base = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(1)
    vids, frames = base / "videos", base / "frames"
    (vids / "v").mkdir(parents=True)
    entries_v, entries_f = [], []
    for i, kind in enumerate(KINDS):
        n = 40 + 4 * i
        f = render(kind, n, rng)
        name = f"v/{kind}" + (".webm" if i == 2 else ".mp4")
        if i == 1:
            _short_gops(f, vids / name)
        else:
            encode_video(f, vids / name, 25, "libvpx" if i == 2 else "libx264")
        entries_v.append(Entry(name, i % 4, None))
        _jpegs(f, frames / "f" / kind)
        entries_f.append(Entry(f"f/{kind}", i % 4, n))
    data = (vids / "v/glide.mp4").read_bytes()
    (vids / "v/truncated.mp4").write_bytes(data[: len(data) * 2 // 3])
    entries_v.append(Entry("v/truncated.mp4", 0, None))
    _jpegs(render("glide", 40, rng), frames / "f" / "gap")
    (frames / "f" / "gap" / "img_00040.jpg").unlink()
    entries_f.append(Entry("f/gap", 0, 40))
    for root, entries, fmt in ((vids, entries_v, "video"), (frames, entries_f, "frames")):
        write_list(root / "train.txt", entries, fmt)
        write_list(root / "val.txt", entries, fmt)
    return {"video": vids, "frames": frames}


def _params(root, fmt, dataset="kinetics400", cache_mb=0, **data):
    d = {
        "dataset": dataset,
        "root": str(root),
        "format": fmt,
        "num_frames": 4,
        "sampling": "dense" if dataset == "kinetics400" else "segment",
        "frame_stride": 4,
        "train_short_side": [64, 80],
        "crop_size": 56,
        "flip": dataset == "kinetics400",
        "num_workers": 0,
        "decode_cache_mb": cache_mb,
    }
    d.update(data)
    return {"data": d, "test": {"short_side": 64, "multi_crop_size": 64, "single_crop_size": 56}}


def _items(ds, epochs: int, seed: int = 7, count: int | None = None) -> list:
    """Every item (the first `count`) of every epoch, each under its own seed (as the engine's
    SeededDataset)."""
    sd = SeededDataset(ds)
    n = len(ds) if count is None else count
    return [sd[(i, seed + 1000 * ep + i)] for ep in range(epochs) for i in range(n)]


def _untimed(reason: str) -> str:
    return re.sub(r"\[\d\d:\d\d:\d\d\] ", "", reason)


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert bool(x) == bool(y)
        if not x:  # (decord's messages carry a [HH:MM:SS] time stamp of their own)
            assert _untimed(x.reason) == _untimed(y.reason)
            continue
        assert x["video_id"] == y["video_id"]
        assert x["video"].dtype == torch.uint8 and torch.equal(x["video"], y["video"])


@pytest.mark.parametrize(
    "fmt,dataset",
    [("video", "kinetics400"), ("video", "sthv2"), ("frames", "kinetics400"), ("frames", "sthv1")],
)
@pytest.mark.parametrize("mode", ["train", "val"])
def test_cached_clips_are_bitwise_identical(roots, fmt, dataset, mode):
    plain = build_dataset(_params(roots[fmt], fmt, dataset), "train", mode)
    cached = build_dataset(_params(roots[fmt], fmt, dataset, cache_mb=64), "train", mode)
    assert plain.cache is None and cached.cache is not None
    _same(_items(plain, 2), _items(cached, 2))
    n_good = 6
    s = cached.cache.stats()
    # the 7th entry is never cached (a truncated mp4 that cannot be opened; a frame folder whose
    # full read fails: read as without the cache from then on, clips and errors unchanged)
    assert s["videos"] == n_good and s["hits"] == n_good and s["misses"] == n_good + 2
    assert s["uncacheable"] == (1 if fmt == "frames" else 0)
    # a hit decodes nothing: the reader is not even opened
    cached.open = lambda e: pytest.fail(f"{e.path} opened again")  # type: ignore[method-assign]
    _same(_items(plain, 1, 99, n_good), _items(cached, 1, 99, n_good))


def test_test_mode_never_caches(roots):
    """A test pass reads each video once: the setting changes nothing there."""
    a = build_dataset(_params(roots["video"], "video"), "val", "test", "4x3")
    b = build_dataset(_params(roots["video"], "video", cache_mb=64), "val", "test", "4x3")
    assert b.cache is None
    _same([a[i] for i in range(len(a))], [b[i] for i in range(len(b))])


def test_budget_stops_filling_and_keeps_clips_identical(roots):
    p = _params(roots["video"], "video", cache_mb=1)  # 1 MiB: one 160x120 video of 40+ frames does not fit
    plain = build_dataset(_params(roots["video"], "video"), "train", "train")
    small = build_dataset(p, "train", "train")
    _same(_items(plain, 2), _items(small, 2))
    s = small.cache.stats()
    assert s["full"] and s["videos"] == 0 and s["mb"] == 0
    assert small.cache.misses == 2 * len(small)  # nothing kept: every access reads the file


def test_key_follows_the_file(roots, tmp_path):
    """A video rewritten in place (new mtime/size) is decoded anew, not served from memory."""
    import shutil

    root = tmp_path / "r"
    shutil.copytree(roots["video"], root)
    ds = build_dataset(_params(root, "video", cache_mb=64), "val", "val")
    first = ds[0]["video"]
    rng = np.random.default_rng(5)
    encode_video(render("still", 48, rng), root / "v/glide.mp4", 25, "libx264")
    again = ds[0]["video"]
    fresh = build_dataset(_params(root, "video"), "val", "val")[0]["video"]
    assert torch.equal(again, fresh) and not torch.equal(again, first)
    assert ds.cache.stats()["videos"] == 2  # the old key stays until the process ends


def test_workers_share_frames_decoded_up_front(roots):
    """num_workers > 0: build_dataset decodes everything in the main process; forked workers
    serve clips from it without opening a file, two epochs (new workers each, as the engine)."""
    p = _params(roots["video"], "video", cache_mb=64, num_workers=2)
    plain = build_dataset(_params(roots["video"], "video"), "train", "train")
    cached = build_dataset(p, "train", "train")
    s = cached.cache.stats()
    assert s["videos"] == 6 and s["misses"] == 7 and s["hits"] == 0
    good = [i for i, e in enumerate(cached.entries) if "truncated" not in e.path]
    cached.entries = [cached.entries[i] for i in good]
    plain.entries = [plain.entries[i] for i in good]

    def no_open(e):
        raise AssertionError(f"{e.path} opened in a worker")

    cached.open = no_open  # type: ignore[method-assign]
    keys = [(i, 100 * ep + i) for ep in range(2) for i in range(len(good))]
    out = []
    for ep in range(2):
        loader = torch.utils.data.DataLoader(
            SeededDataset(cached),
            sampler=keys[ep * len(good) : (ep + 1) * len(good)],
            batch_size=3,
            num_workers=2,
            collate_fn=collate,
        )
        for b in loader:
            assert not b["skipped"], b["skipped_reasons"]
            out.extend(b["video"])
    ref = [SeededDataset(plain)[k]["video"] for k in keys]
    assert len(out) == len(ref) and all(torch.equal(x, y) for x, y in zip(out, ref))


def test_preload_needs_a_cache(roots):
    ds = build_dataset(_params(roots["video"], "video"), "train", "train")
    with pytest.raises(ValueError, match="decode_cache_mb"):
        ds.preload()
