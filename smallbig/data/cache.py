"""Decoded-frame cache: each video (or frame folder) decoded once per process, not once per epoch.

Opt-in (`data.decode_cache_mb`, 0 = off; the embedded default leaves it off: no gain at 2 epochs) for small
datasets that fit in memory: the toy data of the embedded default, `benchmarks/toy_ablation.py`.
The first access to a video decodes *all* its frames (the same reader and decoder as without
the cache) and keeps them, uint8 [n, H, W, 3]; later accesses slice the frames they need out
of memory. Clips are bitwise identical with and without the cache (tests/test_data_cache.py):
the sampler draws the same indices (it sees the same frame count) and gets the same pixels.

- Key: the file's path, mtime (ns) and size (a frame folder: the folder's path and mtime, the
  listed frame count and the file-name template). A file rewritten in place is a new key.
- Bounded: frames are kept until `max_bytes` is reached; after that, videos not yet cached are
  read from disk as without the cache (no eviction: with shuffled epochs an LRU would throw
  away frames just before they are needed again, and pay a full decode for every miss).
- A video whose full decode fails (truncated, a frame missing from a folder) is not cached and
  is read as without the cache from then on, so what the sampler gets from damaged files (a
  clip from the decodable part, or the same error) is unchanged.
- Per process. DataLoader workers fork from the process that built the dataset: frames cached
  there before the workers start are shared with them (copy-on-write; the arrays are never
  written). With `num_workers > 0`, `build_dataset` therefore decodes every video up front in
  the main process (`VideoDataset.preload`); workers that the engine starts anew each epoch
  would otherwise lose what they decoded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterable
from pathlib import Path

import numpy as np

from smallbig.data.readers import VideoError

log = logging.getLogger("smallbig.data")


def video_key(path: str | Path, *extra: Hashable) -> tuple | None:
    """(path, mtime_ns, size, *extra) of `path`, or None when it cannot be stat'ed (the reader
    then reports why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(path), st.st_mtime_ns, st.st_size, *extra)


class CachedFrames:
    """A reader over frames already in memory (the interface of readers.DecordVideo /
    FrameFolder: `len()`, `get(indices)` -> a new uint8 array [len(indices), H, W, 3])."""

    def __init__(self, frames: np.ndarray, path: str | Path):
        self.frames = frames
        self.path = str(path)

    def __len__(self) -> int:
        return len(self.frames)

    def get(self, indices: Iterable[int]) -> np.ndarray:
        idx = np.asarray([int(i) for i in indices], dtype=np.int64)
        if idx.size == 0:
            raise VideoError(f"{self.path}: no frame indices asked for", "no frame indices asked for")
        n = len(self.frames)
        if idx.min() < 0 or idx.max() >= n:
            reason = f"frame indices {idx.min()}..{idx.max()} outside 0..{n - 1}"
            raise VideoError(f"{self.path}: {reason}", reason)
        return self.frames[idx]  # fancy indexing: a copy, the cached frames stay untouched


class DecodeCache:
    """Decoded frames by key, up to `max_bytes` (no eviction; see the module docstring)."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.frames: dict[tuple, np.ndarray] = {}
        self.uncacheable: set[tuple] = set()  # full decode failed: read as without the cache
        self.full = False  # a video did not fit: no more full decodes of new videos
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.frames)

    def reader(self, key: tuple | None, open_reader, path: str | Path):
        """A reader for the video under `key`: from memory if cached; else `open_reader()`,
        whose frames are all decoded and kept when there is room. `open_reader` raises what the
        uncached path raises (VideoError, OSError, ...)."""
        if key is not None and key in self.frames:
            self.hits += 1
            return CachedFrames(self.frames[key], path)
        self.misses += 1
        reader = open_reader()
        if key is None or self.full or key in self.uncacheable:
            return reader
        try:
            frames = reader.get(range(len(reader)))
        except (VideoError, ValueError, OSError) as e:
            self.uncacheable.add(key)
            log.info("decode cache: %s not cached (%s); read as without the cache", path, e)
            return open_reader()  # afresh: a decoder that failed mid-stream may keep state
        frames.flags.writeable = False
        if self.nbytes + frames.nbytes > self.max_bytes:
            self.full = True
            log.info(
                "decode cache: full at %d videos, %.0f MB (data.decode_cache_mb %d); the other videos "
                "are decoded on every access",
                len(self.frames),
                self.nbytes / 2**20,
                self.max_bytes // 2**20,
            )
        else:
            self.frames[key] = frames
            self.nbytes += frames.nbytes
        return CachedFrames(frames, path)

    def stats(self) -> dict:
        return {
            "videos": len(self.frames),
            "mb": round(self.nbytes / 2**20, 1),
            "max_mb": self.max_bytes // 2**20,
            "hits": self.hits,
            "misses": self.misses,
            "full": self.full,
            "uncacheable": len(self.uncacheable),
        }
