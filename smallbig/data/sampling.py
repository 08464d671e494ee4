"""Temporal sampling and spatial views (the paper's protocol, Sec. 4 of docs/data.md).

Temporal (frame indices, 0-based, always within [0, n)):
- dense (Kinetics): T frames with stride s from a window of T*s consecutive frames
  (8 x 8 = 64). Short-video rule: a video with n < T*s frames uses the largest stride
  s' = n // T that fits (s' >= 1) with the same window rule; a video with n < T frames takes
  T indices spread evenly over the whole video, floor(i * n / T), repeating frames in order.
  train: random window start in [0, n - T*s']; val: centre start (n - T*s') // 2;
  test with k clips: starts round((n - T*s') * (j + 0.5) / k), j = 0..k-1 (k = 1 is the centre).
- segment (Something-Something): the video is cut into T equal segments
  [floor(i*n/T), floor((i+1)*n/T)) (at least one frame each); train: one random frame per
  segment; val: segment centres floor((i + 0.5) * n / T); test with k clips: clip j takes
  offset j/k of each segment, except k = 1, which takes the centres; so 2 clips = segment
  starts (clip 0) and segment centres (clip 1). (The metrics' 1-clip subset of k saved clips
  is clip k // 2: the centres for k = 2, as in the 1-clip protocol.)

Spatial (frames are uint8 [T, H, W, 3] numpy or torch; outputs torch uint8 [3, T, h, w];
resizing is bilinear with antialiasing, on uint8):
- train: short side random integer in [a, b], random crop c x c, horizontal flip with p=0.5
  only when flip is enabled (never for Something-Something);
- val: short side `short`, centre crop `size`;
- test: short side `short`; 3 crops of `size` along the long side at its start, centre and end
  (crop index 0, 1, 2), centred on the short side; or 1 centre crop (crop index 0).
Views are clip-major: view v = clip v // crops, crop v % crops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from smallbig.spec.params import DataSpec
from smallbig.spec.protocol import Protocol


# --------------------------------------------------------------------------- temporal
def _dense_stride(n: int, num_frames: int, stride: int) -> int:
    if n >= num_frames * stride:
        return stride
    return max(1, n // num_frames)


def _spread(n: int, num_frames: int) -> np.ndarray:
    return (np.arange(num_frames) * n // num_frames).astype(np.int64)


def dense_indices(n: int, num_frames: int, stride: int, start: int) -> np.ndarray:
    s = _dense_stride(n, num_frames, stride)
    if n < num_frames:
        return _spread(n, num_frames)
    return start + s * np.arange(num_frames, dtype=np.int64)


def dense_max_start(n: int, num_frames: int, stride: int) -> int:
    if n < num_frames:
        return 0
    return n - num_frames * _dense_stride(n, num_frames, stride)


def dense_train(n: int, num_frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    _check_n(n)
    start = int(rng.integers(0, dense_max_start(n, num_frames, stride) + 1))
    return dense_indices(n, num_frames, stride, start)


def dense_test(n: int, num_frames: int, stride: int, num_clips: int) -> list[np.ndarray]:
    """`num_clips` windows evenly spaced over the video; 1 clip = the centre one (val)."""
    _check_n(n)
    m = dense_max_start(n, num_frames, stride)
    starts = [int(round(m * (j + 0.5) / num_clips)) for j in range(num_clips)]
    return [dense_indices(n, num_frames, stride, s) for s in starts]


def _segments(n: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(num_frames)
    lo = i * n // num_frames
    hi = np.maximum(lo + 1, (i + 1) * n // num_frames)
    return lo.astype(np.int64), np.minimum(hi, n).astype(np.int64)


def segment_train(n: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    _check_n(n)
    lo, hi = _segments(n, num_frames)
    return np.array([int(rng.integers(a, b)) for a, b in zip(lo, hi)], dtype=np.int64)


def segment_test(n: int, num_frames: int, num_clips: int) -> list[np.ndarray]:
    """k = 1: segment centres; k >= 2: clip j at offset j / k of each segment (j = 0: starts)."""
    _check_n(n)
    lo, hi = _segments(n, num_frames)
    length = hi - lo
    if num_clips == 1:
        return [np.minimum(lo + length // 2, hi - 1)]
    return [np.minimum(lo + (length * j) // num_clips, hi - 1) for j in range(num_clips)]


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"cannot sample frames from a video with {n} frames")


def _spec(data: DataSpec | Mapping[str, Any]) -> DataSpec:
    """The params' data section, typed (a mapping is completed from params/base.yaml)."""
    return data if isinstance(data, DataSpec) else DataSpec.from_dict(data)


def _stride(d: DataSpec) -> int:
    if d.frame_stride is None:  # the params validation requires it for dense sampling
        raise ValueError("data.frame_stride: required for dense sampling")
    return d.frame_stride


def train_indices(n: int, data: DataSpec | Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    d = _spec(data)
    if d.sampling == "dense":
        return dense_train(n, d.num_frames, _stride(d), rng)
    return segment_train(n, d.num_frames, rng)


def test_indices(n: int, data: DataSpec | Mapping[str, Any], num_clips: int) -> list[np.ndarray]:
    d = _spec(data)
    if d.sampling == "dense":
        return dense_test(n, d.num_frames, _stride(d), num_clips)
    return segment_test(n, d.num_frames, num_clips)


def min_frames_needed(data: DataSpec | Mapping[str, Any]) -> int:
    """Frames a video needs to be sampled without the short-video rule (for `data check`)."""
    d = _spec(data)
    if d.sampling == "dense":
        return d.num_frames * _stride(d)
    return d.num_frames


# --------------------------------------------------------------------------- spatial
# Internally frames are torch uint8 [T, 3, H, W] with channels-last strides (a free view of the
# decoder's [T, H, W, 3]); uint8 antialiased bilinear resizing is fastest on that layout. Views
# are returned as contiguous uint8 [3, T, h, w].
def frames_tensor(frames) -> torch.Tensor:
    """uint8 [T, H, W, 3] (numpy or torch) -> uint8 torch [T, 3, H, W] (a view, no copy)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
    return frames.permute(0, 3, 1, 2)


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    if h <= w:
        return short, max(1, int(round(w * short / h)))
    return max(1, int(round(h * short / w))), short


def resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> uint8 [T, 3, h, w] with min(h, w) = short (bilinear, antialiased)."""
    h, w = x.shape[-2:]
    if min(h, w) == short:
        return x
    return F.interpolate(
        x, size=short_side_size(h, w, short), mode="bilinear", align_corners=False, antialias=True
    )


def _to_clip(x: torch.Tensor) -> torch.Tensor:
    """[T, 3, h, w] -> contiguous [3, T, h, w]."""
    return x.permute(1, 0, 2, 3).contiguous()


def _check_crop(h: int, w: int, size: int, what: str) -> None:
    if size > h or size > w:
        raise ValueError(f"{what}: crop {size}x{size} is larger than the resized frames {h}x{w}")


def train_view(frames, short_range, size: int, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """Random short side in [a, b], random size x size crop, flip (p = 0.5) only if `flip`."""
    short = int(rng.integers(short_range[0], short_range[1] + 1))
    x = resize_short(frames_tensor(frames), short)
    h, w = x.shape[-2:]
    _check_crop(h, w, size, "train view")
    y0 = int(rng.integers(0, h - size + 1))
    x0 = int(rng.integers(0, w - size + 1))
    out = x[..., y0 : y0 + size, x0 : x0 + size]
    if flip and rng.random() < 0.5:
        out = out.flip(-1)
    return _to_clip(out)


def crop_boxes(h: int, w: int, size: int, num_crops: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the test crops; 3 crops: start, centre, end of the long side."""
    _check_crop(h, w, size, "test view")
    cy, cx = (h - size) // 2, (w - size) // 2
    if num_crops == 1:
        return [(cy, cx)]
    if num_crops != 3:
        raise ValueError(f"crops must be 1 or 3, got {num_crops}")
    if w >= h:
        return [(cy, 0), (cy, cx), (cy, w - size)]
    return [(0, cx), (cy, cx), (h - size, cx)]


def center_view(frames, short: int, size: int) -> torch.Tensor:
    """Short side `short`, centre crop size x size -> uint8 [3, T, size, size]."""
    x = resize_short(frames_tensor(frames), short)
    ((y0, x0),) = crop_boxes(*x.shape[-2:], size, 1)
    return _to_clip(x[..., y0 : y0 + size, x0 : x0 + size])


def test_views(frames, clips: list, short: int, size: int, num_crops: int):
    """All views of one video from frames decoded once.

    `frames`: uint8 [F, H, W, 3] of the *unique* decoded indices; `clips`: per clip, the
    positions of its frames in `frames`. Each decoded frame is resized once. Returns
    (uint8 [V, 3, T, size, size], clip_idx long [V], crop_idx long [V]), clip-major
    (view v = clip v // crops, crop v % crops)."""
    allf = resize_short(frames_tensor(frames), short)  # [F, 3, h, w]
    boxes = crop_boxes(*allf.shape[-2:], size, num_crops)
    views, clip_idx, crop_idx = [], [], []
    for c, pos in enumerate(clips):
        clip = allf[torch.as_tensor(np.asarray(pos), dtype=torch.long)]
        for k, (y0, x0) in enumerate(boxes):
            views.append(_to_clip(clip[..., y0 : y0 + size, x0 : x0 + size]))
            clip_idx.append(c)
            crop_idx.append(k)
    return (
        torch.stack(views),
        torch.tensor(clip_idx, dtype=torch.long),
        torch.tensor(crop_idx, dtype=torch.long),
    )


def parse_protocol(protocol: str | Protocol) -> tuple[int, int]:
    """(clips, crops) of a protocol such as '10x3' (`Protocol.parse`; ProtocolError is a
    ValueError)."""
    p = Protocol.parse(protocol)
    return p.clips, p.crops
