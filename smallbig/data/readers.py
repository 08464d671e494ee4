"""Reading frames: videos through decord, or JPEG frame folders. One small interface:

    reader = open_video(path) / open_frames(folder, num_frames, template)
    len(reader)               number of frames
    reader.get(indices)       uint8 numpy [len(indices), H, W, 3]

Any failure raises VideoError naming the file and the problem.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class VideoError(RuntimeError):
    """A video or frame folder could not be read. The message names the file and the problem."""


class DecordVideo:
    def __init__(self, path: str | Path):
        import decord

        self.path = str(path)
        p = Path(path)
        if not p.exists():
            raise VideoError(f"{p}: missing")
        if p.is_file() and p.stat().st_size == 0:
            raise VideoError(f"{p}: zero bytes")
        try:
            self.vr = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises DECORDError (a RuntimeError subclass)
            raise VideoError(f"{p}: cannot open video: {_short(e)}") from None
        self.n = len(self.vr)
        if self.n < 1:
            raise VideoError(f"{p}: no frames")

    def __len__(self) -> int:
        return self.n

    def get(self, indices) -> np.ndarray:
        idx = [int(i) for i in indices]
        if min(idx) < 0 or max(idx) >= self.n:
            raise VideoError(f"{self.path}: frame indices {min(idx)}..{max(idx)} outside 0..{self.n - 1}")
        try:
            out = self.vr.get_batch(idx).asnumpy()
        except Exception as e:
            raise VideoError(f"{self.path}: decoding frames failed (truncated?): {_short(e)}") from None
        if out.ndim != 4 or out.shape[0] != len(idx) or out.shape[-1] != 3:
            raise VideoError(f"{self.path}: decoder returned shape {out.shape}")
        return out


class FrameFolder:
    def __init__(self, folder: str | Path, num_frames: int, template: str = "img_{:05d}.jpg"):
        self.folder = Path(folder)
        self.n = int(num_frames)
        self.template = template
        if not self.folder.is_dir():
            raise VideoError(f"{self.folder}: frame folder missing")
        if self.n < 1:
            raise VideoError(f"{self.folder}: list says {self.n} frames")

    def __len__(self) -> int:
        return self.n

    def get(self, indices) -> np.ndarray:
        from PIL import Image

        frames = []
        cache: dict[int, np.ndarray] = {}
        for i in indices:
            i = int(i)
            if i not in cache:
                p = self.folder / self.template.format(i + 1)  # files are numbered from 1
                try:
                    with Image.open(p) as im:
                        cache[i] = np.asarray(im.convert("RGB"))
                except FileNotFoundError:
                    raise VideoError(f"{p}: frame missing ({self.n} frames listed)") from None
                except Exception as e:
                    raise VideoError(f"{p}: cannot read JPEG: {_short(e)}") from None
            frames.append(cache[i])
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise VideoError(f"{self.folder}: frames of different sizes {sorted(shapes)}")
        return np.stack(frames)


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    msg = [m for m in msg if m.strip()]
    text = msg[0] if msg else type(e).__name__
    # decord prefixes a C++ stack trace; keep the informative last line if present
    for m in reversed(msg):
        if "ERROR" in m or "Error" in m or "error" in m:
            text = m
            break
    return text.strip()[:300]


def open_video(path) -> DecordVideo:
    return DecordVideo(path)


def open_frames(folder, num_frames: int, template: str) -> FrameFolder:
    return FrameFolder(folder, num_frames, template)
