"""Uncertainty of the numbers mi_tune prints: paired bootstrap intervals and spread across seeds.

Every before/after or adapter-control difference is scored on the same items (sentences, sentence
pairs, queries) on both sides, so it is resampled *paired*: one resample of the items is applied to
both columns and the statistic (a difference) is recomputed. The interval is the percentile interval
of the resampled statistic (plain numpy, ``numpy.random.default_rng(seed)``; not scipy.stats.bootstrap,
whose BCa default needs jackknife refits that cost too much for clustering and rank correlations).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

RESAMPLES = 2000  # default number of bootstrap resamples
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its paired-bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL
    resamples: int = RESAMPLES
    n: int = 0  # items resampled

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def fmt(self, digits: int = 4, mark: bool = True) -> str:
        """'+0.0498 [+0.0412, +0.0581]*' (the * marks an interval that excludes 0)."""
        s = f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return s + ("*" if mark and self.excludes_zero else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement; the same draw serves every column of a comparison."""
    if n < 1:
        raise ValueError(f"bootstrap: got {n} items; allowed: at least 1")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return float(lo), float(hi)


def paired_mean_difference(after: Sequence[float], before: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                           level: float = LEVEL) -> Interval:
    """mean(after) - mean(before) over the same items, with a paired bootstrap interval. NaN items are dropped on both sides."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap: {a.shape} vs {b.shape} items; a paired comparison needs the same items on both sides")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]  # (n,)
    idx = resample_indices(d.size, resamples, seed)
    lo, hi = _percentiles(d[idx].mean(1), level)
    return Interval(float(d.mean()), lo, hi, level, resamples, int(d.size))


def stratified_mean_difference(after: Sequence[Sequence[float]], before: Sequence[Sequence[float]], resamples: int = RESAMPLES,
                               seed: int = 0, level: float = LEVEL) -> Interval:
    """Mean over sets of (mean(after) - mean(before)), each set's items resampled on their own (paired within a set).

    With one set this is ``paired_mean_difference``.
    """
    if len(after) != len(before) or not after:
        raise ValueError("stratified bootstrap: one (after, before) pair of arrays per set")
    if len(after) == 1:
        return paired_mean_difference(after[0], before[0], resamples, seed, level)
    ests, boots, n = [], [], 0
    for i, (a, b) in enumerate(zip(after, before)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        keep = np.isfinite(a) & np.isfinite(b)
        d = a[keep] - b[keep]
        ests.append(d.mean())
        boots.append(d[resample_indices(d.size, resamples, seed + i)].mean(1))
        n += d.size
    lo, hi = _percentiles(np.mean(boots, axis=0), level)
    return Interval(float(np.mean(ests)), lo, hi, level, resamples, n)


def paired_bootstrap(statistic: Callable[..., float], *samples: Sequence, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> Interval:
    """Any paired statistic: ``statistic(*[s[idx] for s in samples])`` on the full data and on each resample.

    ``samples`` are arrays sharing their first axis (the items), e.g. (gold, cos_base, cos_adapter) for an
    STS difference of Spearman correlations. Resamples where the statistic is undefined (NaN) are dropped.
    """
    arrays = [np.asarray(s) for s in samples]
    n = len(arrays[0])
    if any(len(s) != n for s in arrays):
        raise ValueError("paired bootstrap: every sample needs the same items (same length)")
    est = float(statistic(*arrays))
    idx = resample_indices(n, resamples, seed)
    vals = np.array([statistic(*[s[i] for s in arrays]) for i in idx], dtype=np.float64)
    lo, hi = _percentiles(vals, level)
    return Interval(est, lo, hi, level, resamples, n)


def across_seeds(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation of one number over runs that differ only in their seed."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan, "n": int(v.size)}
