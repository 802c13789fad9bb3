"""Uncertainty: bootstrap confidence intervals over samples, t-intervals across seeds (scipy.stats)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

__all__ = ["bootstrap_ci", "mean_ci", "seed_ci", "CONFIDENCE"]

CONFIDENCE = 0.95
_RESAMPLES = 1000


def bootstrap_ci(
    statistic: Callable[..., np.ndarray],
    *samples: np.ndarray,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic and its percentile-bootstrap interval over samples.

    ``statistic(*arrays, axis=-1)`` must be vectorised; paired arrays are resampled together.

    Example:
        >>> x = np.random.default_rng(0).normal(size=200)
        >>> est, lo, hi = bootstrap_ci(np.mean, x)
        >>> lo < est < hi
        True
    """
    data = [np.asarray(s, np.float64) for s in samples]
    est = float(statistic(*data, axis=-1))
    n = len(data[0])
    if n < 3 or not np.all(np.isfinite(np.concatenate(data))):
        return est, float("nan"), float("nan")
    if all(np.ptp(d) == 0 for d in data):
        return est, est, est
    res = stats.bootstrap(
        tuple(data),
        statistic,
        paired=len(data) > 1,
        vectorized=True,
        n_resamples=_RESAMPLES,
        confidence_level=confidence,
        method="percentile",
        random_state=seed,
    )
    return est, float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(x: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean over samples with its bootstrap interval."""
    return bootstrap_ci(np.mean, x, seed=seed)


def seed_ci(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean across runs (seeds) with a Student-t interval; (mean, nan, nan) for a single run.

    Example:
        >>> m, lo, hi = seed_ci(np.array([1.0, 2.0, 3.0]))
        >>> m, round(lo, 3), round(hi, 3)
        (2.0, -0.484, 4.484)
    """
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half
