"""Deterministic seeding and data order.

The data order and every random augmentation are a pure function of (seed, epoch, sample):

* :class:`EpochSampler` draws the epoch's permutation from ``torch.Generator(seed, epoch)``,
  pads it to a multiple of the world size (as DistributedSampler), keeps the global rank's
  strided share, truncates it to whole optimizer steps, and can *start* at any position, so a
  run resumed mid-epoch sees exactly the samples an uninterrupted run would have seen next.
* It yields ``(index, sample_seed)`` pairs; :class:`SeededDataset` seeds Python's ``random``,
  NumPy's global RNG and torch's CPU RNG with ``sample_seed`` around each ``__getitem__`` (and
  restores the caller's states), so augmentation does not depend on which worker, in which
  order, or after how many other samples an item is loaded — nor on a resume.
* :func:`worker_init_fn` also seeds every data-loader worker from (seed, epoch, rank, worker),
  and makes workers ignore SIGTERM/SIGUSR1 (the main process decides when to stop).
"""

from __future__ import annotations

import random
import signal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def mix_seed(*parts: int) -> int:
    """A 32-bit seed from integers (NumPy SeedSequence: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class EpochSampler(Sampler):
    def __init__(
        self,
        num_samples: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        samples_per_rank: int | None = None,
    ):
        if num_samples <= 0:
            raise ValueError("dataset is empty")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        padded = -(-self.num_samples // self.world_size)
        self.samples_per_rank = padded if samples_per_rank is None else int(samples_per_rank)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch to draw and the position (in this rank's samples) to start from."""
        self.epoch = int(epoch)
        self.start = int(start)

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(mix_seed(self.seed, epoch, 0x5A11))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = -(-self.num_samples // self.world_size) * self.world_size
        order = (order * (-(-total // len(order))))[:total]
        return order[self.rank : total : self.world_size][: self.samples_per_rank]

    def __iter__(self):
        for idx in self.indices(self.epoch)[self.start :]:
            yield idx, mix_seed(self.seed, self.epoch, idx)

    def __len__(self) -> int:
        return max(0, self.samples_per_rank - self.start)


class SeededDataset(Dataset):
    """Wraps a dataset; ``ds[(index, seed)]`` loads item ``index`` under RNGs seeded with ``seed``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        py, npst = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py)
                np.random.set_state(npst)


class WorkerInit:
    """worker_init_fn: seed from (seed, epoch, rank, worker id); ignore stop signals."""

    def __init__(self, seed: int, epoch: int, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, worker_id: int) -> None:
        s = mix_seed(self.seed, self.epoch, self.rank, worker_id, 0x3017)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, signal.SIG_IGN)
