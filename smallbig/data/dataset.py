"""One dataset API over prepared dataset directories (videos via decord, or JPEG frame folders).

    build_dataset(params, split, mode, protocol=None) -> VideoDataset
    collate(batch) -> dict
    normalize(x_uint8, mean, std) -> float tensor

A sample that cannot be read is returned as a `BadSample` (falsy, like None, carrying the
video id and the reason), logged, and reported by `collate` under "skipped": training and
evaluation never crash on a bad file and never drop one silently. Videos in the prepared
directory's `quarantine.json` (the report of `smallbig data check`) are left out of training
(counted in `dataset.quarantined`) and returned as BadSample in val/test, so evaluation counts
them as skipped.

`data.decode_cache_mb` > 0 keeps every video's decoded frames in memory in modes train and val
(smallbig/data/cache.py: decoded once per process instead of once per epoch; the same clips,
bitwise): for small datasets such as the embedded default's.

Lists are validated before anything else (smallbig/data/lists.py): a label that is not an
integer in [0, num_classes) (the dataset's `classes.json` and the params' `model.num_classes`),
a duplicate entry, a line with missing fields or bytes that are not UTF-8 raise DataError with
one `FILE:LINE: problem` per bad line, so `smallbig train` / `evaluate` stop before any
training or scoring (exit 2).

What the readers refuse fast, by name (smallbig/data/readers.py): anything that is not a regular
file (FIFO, socket, device, directory, symlink to one; never opened), zero bytes, codecs this
decord build cannot decode, declared frame sizes beyond 8K. A decoder that stalls on a regular
file is not interrupted here: `smallbig data prepare` (the workflow's first step for a dataset)
runs `smallbig data check`, which decodes every file under a deadline and writes the staller to
`quarantine.json`, which this module honours.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smallbig.data import sampling
from smallbig.data.cache import DecodeCache, video_key
from smallbig.data.lists import (  # noqa: F401 (re-exported)
    DataError,
    Entry,
    label_bounds,
    load_manifest,
    load_quarantine,
    read_list,
    write_list,
)
from smallbig.data.readers import VideoError, open_frames, open_video
from smallbig.spec.params import DataSpec, Params, TestSpec
from smallbig.spec.protocol import Protocol

log = logging.getLogger("smallbig.data")

SPLITS = ("train", "val")
MODES = ("train", "val", "test")


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be decoded. Falsy, so `if not item` treats it like None."""

    video_id: str
    reason: str

    def __bool__(self) -> bool:
        return False


def balanced_subset(entries: list[Entry], limit: int | None) -> list[Entry]:
    """The first `limit` entries taking classes in turn (deterministic, class-balanced)."""
    if not limit or limit >= len(entries):
        return list(entries)
    by_class: dict[int, list[Entry]] = {}
    for e in entries:
        by_class.setdefault(e.label, []).append(e)
    out, rank = [], 0
    while len(out) < limit:
        for c in sorted(by_class):
            if rank < len(by_class[c]) and len(out) < limit:
                out.append(by_class[c][rank])
        rank += 1
    return out


# --------------------------------------------------------------------------- dataset
def _data_spec(data: DataSpec | Mapping[str, Any]) -> DataSpec:
    return data if isinstance(data, DataSpec) else DataSpec.from_dict(data)


def _test_spec(test: TestSpec | Mapping[str, Any]) -> TestSpec:
    return test if isinstance(test, TestSpec) else TestSpec.from_dict(test)


class VideoDataset(torch.utils.data.Dataset):
    """`data`, `test`: the params' sections, typed (a mapping, even a partial one, is completed
    from params/base.yaml)."""

    def __init__(
        self,
        root,
        entries: list[Entry],
        fmt: str,
        mode: str,
        data: DataSpec | Mapping[str, Any],
        test: TestSpec | Mapping[str, Any],
        protocol: str | Protocol | None = None,
        frame_template: str = "img_{:05d}.jpg",
        quarantine: dict[str, str] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.root = Path(root)
        self.fmt = fmt
        self.mode = mode
        self.data = _data_spec(data)
        self.test = _test_spec(test)
        self.frame_template = frame_template
        quarantine = quarantine or {}
        self.quarantined = [e.path for e in entries if e.path in quarantine]
        if mode == "train":
            entries = [e for e in entries if e.path not in quarantine]
            if self.quarantined:
                log.warning(
                    "%s: %d quarantined videos left out of training", self.root, len(self.quarantined)
                )
        self.quarantine = quarantine
        self.entries = entries
        views = Protocol(1, 1)  # train and val: one clip, one (centre) crop
        if mode == "test":
            if protocol is None:
                raise ValueError("mode 'test' needs a protocol such as '10x3'")
            views = Protocol.parse(protocol)
        self.protocol = views if mode == "test" else None
        self.num_clips, self.num_crops = views.clips, views.crops
        self.short_side = self.test.short_side
        self.crop_size = views.crop_size(self.test)
        # train and val read every video again each epoch; a test pass reads each once (no cache)
        mb = self.data.decode_cache_mb if mode != "test" else 0
        self.cache = DecodeCache(mb * 2**20) if mb > 0 else None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    def open(self, e: Entry):
        p = self.root / e.path
        if self.fmt == "frames":
            return open_frames(p, e.num_frames, self.frame_template)
        return open_video(p)

    def reader(self, e: Entry):
        """The entry's reader: through the decode cache when there is one."""
        if self.cache is None:
            return self.open(e)
        p = self.root / e.path
        key = video_key(p, e.num_frames, self.frame_template) if self.fmt == "frames" else video_key(p)
        return self.cache.reader(key, lambda: self.open(e), p)

    def preload(self) -> dict:
        """Decode every (non-quarantined) video into the cache now, in this process; DataLoader
        workers forked afterwards share the frames. Returns the cache's stats."""
        if self.cache is None:
            raise ValueError("preload needs a decode cache (data.decode_cache_mb > 0)")
        for e in self.entries:
            if self.cache.full:
                break
            if e.path not in self.quarantine:
                try:
                    self.reader(e)
                except (VideoError, ValueError, OSError):
                    pass  # reported when the sample is read
        log.info("%s: decode cache %s", self.root, self.cache.stats())
        return self.cache.stats()

    def __getitem__(self, i: int):
        e = self.entries[i]
        if e.path in self.quarantine:
            return BadSample(e.video_id, f"quarantined: {self.quarantine[e.path]}")
        try:
            return self._load(e)
        except (VideoError, ValueError, OSError) as err:
            log.warning("skipping %s: %s", e.path, err)
            return BadSample(e.video_id, str(err))

    def _load(self, e: Entry) -> dict:
        reader = self.reader(e)
        n = len(reader)
        d = self.data
        if self.mode == "train":
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
            idx = sampling.train_indices(n, d, rng)
            video = sampling.train_view(reader.get(idx), d.train_short_side, d.crop_size, d.flip, rng)
            return {"video": video, "label": e.label, "video_id": e.video_id}
        clips = sampling.test_indices(n, d, self.num_clips)
        if self.mode == "val":
            video = sampling.center_view(reader.get(clips[0]), self.short_side, self.crop_size)
            return {"video": video, "label": e.label, "video_id": e.video_id}
        uniq, inverse = np.unique(np.concatenate(clips), return_inverse=True)
        positions = np.split(inverse, len(clips))  # positions of each clip's frames in `uniq`
        frames = reader.get(uniq)  # decoded once for all views
        video, clip_idx, crop_idx = sampling.test_views(
            frames, positions, self.short_side, self.crop_size, self.num_crops
        )
        return {
            "video": video,
            "label": e.label,
            "video_id": e.video_id,
            "clip_idx": clip_idx,
            "crop_idx": crop_idx,
        }


def build_dataset(
    params: Params | Mapping[str, Any], split: str, mode: str, protocol: str | Protocol | None = None
) -> VideoDataset:
    """The dataset of `split` (train/val) of the prepared directory `params.data.root`. `params`:
    `Params` or a params mapping (sections or keys it leaves out come from params/base.yaml)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(params, Params):
        data, test, raw = params.data, params.test, params.raw
    else:  # a mapping, perhaps partial (no model section): only its data and test sections
        data, test, raw = (
            DataSpec.from_dict(params["data"]),
            TestSpec.from_dict(params.get("test") or {}),
            params,
        )
    root = Path(data.root)
    manifest = load_manifest(root)
    fmt = data.format
    if manifest and manifest.get("format") and manifest["format"] != fmt:
        raise DataError(
            f"{root / 'manifest.json'}: prepared as format {manifest['format']!r} but "
            f"params data.format is {fmt!r}; run `smallbig data prepare` with these params"
        )
    # the labels are bounded by model.num_classes only where the params give one
    entries = read_list(root / f"{split}.txt", fmt, label_bounds(root, raw))
    limit = data.limit_train if split == "train" else data.limit_val
    entries = balanced_subset(entries, limit)
    template = manifest.get("frame_template", "img_{:05d}.jpg")
    ds = VideoDataset(root, entries, fmt, mode, data, test, protocol, template, load_quarantine(root))
    if ds.cache is not None and data.num_workers > 0:
        ds.preload()  # decoded once here; workers (forked each epoch) share the frames
    return ds


# --------------------------------------------------------------------------- batching
def collate(batch: list) -> dict:
    """Stack the good items; bad ones (BadSample or None) go to "skipped" (video ids).

    Returns {"video": uint8 [N,3,T,H,W] or [N,V,3,T,H,W] (an empty tensor, shape[0] == 0, when
    no item is good), "label":
    long [N], "video_id": [N], "skipped": [ids], "skipped_reasons": [str]} plus "clip_idx" and
    "crop_idx" (long [V], from the first item) in test mode."""
    good = [b for b in batch if b]
    bad = [b for b in batch if not b]
    out = {
        "skipped": [b.video_id if isinstance(b, BadSample) else "<unknown>" for b in bad],
        "skipped_reasons": [b.reason if isinstance(b, BadSample) else "dataset returned None" for b in bad],
        "video_id": [b["video_id"] for b in good],
        "label": torch.tensor([b["label"] for b in good], dtype=torch.long),
        "video": torch.stack([b["video"] for b in good]) if good else torch.empty((0,), dtype=torch.uint8),
    }
    if good and "clip_idx" in good[0]:
        out["clip_idx"] = good[0]["clip_idx"]
        out["crop_idx"] = good[0]["crop_idx"]
    return out


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 clips [..., 3, T, H, W] -> float (x / 255 - mean) / std, per channel.

    Works on any device; the channel axis is the 4th from the end (dim 1 of [N, 3, T, H, W])."""
    if x.ndim < 4 or x.shape[-4] != 3:
        raise ValueError(f"expected [..., 3, T, H, W], got {tuple(x.shape)}")
    shape = (3, 1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x.float().div_(255.0) - m) / s
