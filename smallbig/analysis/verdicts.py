"""Intervals, verdicts and ordering claims: how far one reproduced Top-1 can be trusted.

Our number of a row and its interval (an :class:`Estimate`):
  seeds      two or more seeds: mean ± sample standard deviation (ddof 1) over the seeds; the
             interval is [mean − std, mean + std] (the ML Reproducibility Challenge's practice:
             the spread of one training run)
  bootstrap  one seed: the percentile bootstrap interval (default 95 %, 2,000 resamples, seed 0;
             params/tables.yaml `verdicts.bootstrap`) over the validation videos. Top-1 is the
             mean of a 0/1 "video right" vector, so the number of right videos in a resample
             of N videos drawn with replacement is Binomial(N, k/N): drawn directly, the same
             distribution as resampling the vector, without holding N × resamples indices
  reported   another paper's number: a point (lo = hi = the number)

Verdict of a row (paper number p, tolerance t Top-1 points, our interval [lo, hi]):
  reproduced      p − t ≤ lo and hi ≤ p + t  (the whole interval within the tolerance)
  not reproduced  hi < p − t or lo > p + t   (the whole interval outside it)
  inconclusive    otherwise (the interval straddles p ± t, or is wider than 2t), or no interval
  not comparable  the run is scaled down (the embedded default): its numbers are not the paper's
No verdict (None) without a paper number or while the row has no complete result.

A claim "A > B" on our numbers with their intervals:
  held            lo(A) > hi(B)      (the intervals do not overlap, A above)
  not held        hi(A) < lo(B)      (B clearly above)
  inconclusive    the intervals overlap, or a row has no result
A claim of several pairs (`order: [A, B, C]` is A > B and B > C) is not held if any pair is not
held, held if every pair is held, else inconclusive; a pair against another paper's number is
"not comparable" on a scaled-down run. Non-overlap is a conservative test (two 95 % intervals
that just touch already differ at about the 0.6 % level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_COMPARABLE = (
    "reproduced",
    "not reproduced",
    "inconclusive",
    "not comparable",
)
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_COMPARABLE)
HELD, NOT_HELD = "held", "not held"
CLAIM_VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE, NOT_COMPARABLE)
SEEDS, BOOTSTRAP, REPORTED = "seeds", "bootstrap", "reported"
_EPS = 1e-9  # paper ± tolerance in binary floating point (64.1 - 0.5)


@dataclass(frozen=True)
class Estimate:
    """Our Top-1 of a row: `mean` (%), its interval [lo, hi] (None when there is none), how it
    was made (`kind`: seeds / bootstrap / reported), the seeds behind it (`n`), their standard
    deviation (`std`, seeds only), the validation videos (`videos`, bootstrap only) and
    `confidence` (bootstrap only)."""

    mean: float
    lo: float | None
    hi: float | None
    kind: str
    n: int
    std: float | None = None
    videos: int | None = None
    confidence: float | None = None

    @property
    def has_interval(self) -> bool:
        return self.lo is not None and self.hi is not None

    def as_dict(self) -> dict:
        return {
            "mean": self.mean,
            "lo": self.lo,
            "hi": self.hi,
            "kind": self.kind,
            "n": self.n,
            "std": self.std,
            "videos": self.videos,
            "confidence": self.confidence,
        }


def seed_estimate(values: Sequence[float]) -> Estimate:
    """Mean ± sample std (ddof 1) of two or more seeds' Top-1."""
    if len(values) < 2:
        raise ValueError(f"a seed estimate needs at least 2 values, got {len(values)}")
    v = np.asarray(values, dtype=np.float64)
    mean, std = float(v.mean()), float(v.std(ddof=1))
    return Estimate(mean, mean - std, mean + std, SEEDS, len(v), std=std)


def bootstrap_interval(
    n_correct: int, n_videos: int, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval (%) of Top-1 = n_correct / n_videos over the videos."""
    if n_videos <= 0 or not 0 <= n_correct <= n_videos:
        raise ValueError(f"bootstrap of {n_correct} right of {n_videos} videos")
    rng = np.random.default_rng(seed)
    acc = 100.0 * rng.binomial(n_videos, n_correct / n_videos, size=resamples) / n_videos
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(acc, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_estimate(
    top1: float, n_videos: int, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """One seed: Top-1 (%) over `n_videos` with its bootstrap interval over the videos."""
    n_correct = int(round(top1 * n_videos / 100.0))
    lo, hi = bootstrap_interval(n_correct, n_videos, resamples, confidence, seed)
    return Estimate(top1, lo, hi, BOOTSTRAP, 1, videos=n_videos, confidence=confidence)


def reported(value: float) -> Estimate:
    """Another paper's number: a point."""
    return Estimate(value, value, value, REPORTED, 0)


def estimate(top1s: Sequence[float], videos: int | None, bootstrap: dict) -> Estimate | None:
    """The row's estimate from its seeds' Top-1 (and, with one seed, its validation videos)."""
    vals = [float(v) for v in top1s if v is not None and math.isfinite(v)]
    if len(vals) >= 2:
        return seed_estimate(vals)
    if len(vals) == 1:
        if videos:
            return bootstrap_estimate(vals[0], int(videos), **bootstrap)
        return Estimate(vals[0], None, None, BOOTSTRAP, 1)
    return None


def verdict(
    est: Estimate | None, paper: float | None, tolerance: float, comparable: bool = True
) -> str | None:
    """reproduced / not reproduced / inconclusive / not comparable (module docstring); None
    without a paper number or a result."""
    if paper is None or est is None:
        return None
    if not comparable:
        return NOT_COMPARABLE
    if not est.has_interval:
        return INCONCLUSIVE
    lo, hi = est.lo, est.hi
    assert lo is not None and hi is not None
    if lo >= paper - tolerance - _EPS and hi <= paper + tolerance + _EPS:
        return REPRODUCED
    if hi < paper - tolerance - _EPS or lo > paper + tolerance + _EPS:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def compare(better: Estimate | None, worse: Estimate | None) -> str:
    """held / not held / inconclusive for "better > worse"."""
    if better is None or worse is None or not (better.has_interval and worse.has_interval):
        return INCONCLUSIVE
    assert better.lo is not None and better.hi is not None and worse.lo is not None and worse.hi is not None
    if better.lo > worse.hi:
        return HELD
    if better.hi < worse.lo:
        return NOT_HELD
    return INCONCLUSIVE


def combine(pair_results: Sequence[str]) -> str:
    """A claim's result from its pairs'."""
    if not pair_results:
        return INCONCLUSIVE
    if NOT_COMPARABLE in pair_results:
        return NOT_COMPARABLE
    if NOT_HELD in pair_results:
        return NOT_HELD
    if all(r == HELD for r in pair_results):
        return HELD
    return INCONCLUSIVE


def summary_counts(verdicts: Sequence[str | None]) -> dict[str, int]:
    """How many rows of each verdict (rows without one are left out)."""
    return {v: sum(1 for x in verdicts if x == v) for v in VERDICTS}


def summary_line(counts: dict[str, int], pending: int = 0) -> str:
    """ "5 of 7 rows reproduced, 1 not reproduced, 1 inconclusive" (+ rows still without a
    result)."""
    total = sum(counts.values())
    if counts.get(NOT_COMPARABLE):
        head = f"{counts[NOT_COMPARABLE]} of {total} rows not comparable (scaled-down run)"
    elif total:
        parts = [f"{counts.get(REPRODUCED, 0)} of {total} rows reproduced"]
        parts += [f"{counts[v]} {v}" for v in (NOT_REPRODUCED, INCONCLUSIVE) if counts.get(v)]
        head = ", ".join(parts)
    else:
        head = "no row has a verdict yet"
    if pending:
        head += f"; {pending} row{'s' if pending != 1 else ''} without a complete result"
    return head


def fmt_interval(est: Estimate | None) -> str:
    """The cell next to our Top-1: '± 0.4 (3 seeds)' or '[62.5, 87.5] (bootstrap)'."""
    if est is None:
        return ""
    if est.kind == SEEDS:
        return f"± {est.std:.1f} ({est.n} seeds)"
    if est.has_interval:
        return f"[{est.lo:.1f}, {est.hi:.1f}] (bootstrap)"
    return "no interval (1 seed, video count unknown)"


def fmt_claim_pair(better: Estimate | None, worse: Estimate | None) -> str:
    def one(e: Estimate | None) -> str:
        if e is None:
            return "no result"
        if e.kind == REPORTED:
            return f"{e.mean:.1f} (reported)"
        if e.has_interval:
            return f"{e.mean:.1f} [{e.lo:.1f}, {e.hi:.1f}]"
        return f"{e.mean:.1f}"

    return f"{one(better)} vs {one(worse)}"
