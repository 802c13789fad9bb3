"""Uncertainty: bootstrap confidence intervals over samples, t-intervals across seeds (scipy.stats).

Across seeds the interval is Student's t, which keeps its nominal coverage for the few seeds a
study has (a bootstrap over 2 seeds returns their range, which covers the mean only half of the
time), clipped to the range the quantity can take (an error rate to [0, 1], a norm or ratio to
[0, inf)): the true value lies in that range, so clipping never lowers coverage and no interval
shows an impossible value. Contrasts between two sets of runs (plain vs residual) use Welch's
t interval for mean(a) - k * mean(b).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

__all__ = [
    "bootstrap_ci",
    "mean_ci",
    "seed_ci",
    "seed_band",
    "contrast_ci",
    "linear_contrast_ci",
    "CONFIDENCE",
    "POSITIVE",
    "RATE",
]

CONFIDENCE = 0.95
_RESAMPLES = 1000
POSITIVE = (0.0, np.inf)  # norms, ratios, lengths
RATE = (0.0, 1.0)  # error rates
Bounds = tuple[float, float]


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


def seed_ci(
    values: np.ndarray,
    confidence: float = CONFIDENCE,
    bounds: Bounds = (-np.inf, np.inf),
) -> tuple[float, float, float]:
    """Mean across runs (seeds) with a Student-t interval clipped to ``bounds``; (mean, nan, nan)
    for a single run.

    Example:
        >>> m, lo, hi = seed_ci(np.array([1.0, 2.0, 3.0]))
        >>> m, round(lo, 3), round(hi, 3)
        (2.0, -0.484, 4.484)
        >>> seed_ci(np.array([0.01, 0.03]), bounds=RATE)[1]  # t would give -0.107
        0.0
    """
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, float(max(m - half, bounds[0])), float(min(m + half, bounds[1]))


def seed_band(bounds: Bounds = (-np.inf, np.inf)):
    """The :func:`seed_ci` interval as a seaborn ``errorbar`` callable, so figure bands and table
    intervals across seeds are the same numbers.

    Example:
        >>> [round(x, 3) for x in seed_band(RATE)(np.array([0.01, 0.03]))]
        [0.0, 0.147]
    """

    def band(values) -> tuple[float, float]:
        _, lo, hi = seed_ci(np.asarray(values), bounds=bounds)
        return lo, hi

    return band


def contrast_ci(
    a: np.ndarray,
    b: np.ndarray,
    k: float = 1.0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """mean(a) - k * mean(b) for two independent sets of runs, with Welch's t interval.

    The interval is (nan, nan) when either set has fewer than two finite runs; with no spread in
    either set it collapses to the estimate.

    Example:
        >>> d, lo, hi = contrast_ci(np.array([3.0, 3.2, 2.8]), np.array([1.0, 1.1, 0.9]))
        >>> round(d, 3), lo > 0
        (2.0, True)
    """
    return linear_contrast_ci([a, b], [1.0, -k], confidence)


def linear_contrast_ci(
    samples: list[np.ndarray], weights: list[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """sum_i w_i * mean(x_i) over independent sets of runs, with the Welch-Satterthwaite t interval
    (se^2 = sum w_i^2 s_i^2 / n_i; df = se^4 / sum (w_i^2 s_i^2 / n_i)^2 / (n_i - 1)).

    A difference of differences ("the plain-residual gap at lr 0.1 minus the gap at lr 0.01") is
    the contrast with weights (1, -1, -1, 1). Interval (nan, nan) when a set has fewer than two
    finite runs.

    Example:
        >>> a, b = np.array([3.0, 3.2, 2.8]), np.array([1.0, 1.1, 0.9])
        >>> linear_contrast_ci([a, b], [1.0, -1.0]) == contrast_ci(a, b)
        True
    """
    xs = [np.asarray(x, np.float64) for x in samples]
    xs = [x[np.isfinite(x)] for x in xs]
    if len(xs) != len(weights):
        raise ValueError(f"{len(xs)} samples but {len(weights)} weights")
    if any(len(x) == 0 for x in xs):
        return float("nan"), float("nan"), float("nan")
    d = float(sum(w * x.mean() for w, x in zip(weights, xs)))
    if any(len(x) < 2 for x, w in zip(xs, weights) if w != 0):
        return d, float("nan"), float("nan")
    v = [w**2 * x.var(ddof=1) / len(x) for w, x in zip(weights, xs) if w != 0]
    n = [len(x) for w, x in zip(weights, xs) if w != 0]
    se = float(np.sqrt(sum(v)))
    if se == 0:
        return d, d, d
    df = sum(v) ** 2 / sum(vi**2 / (ni - 1) for vi, ni in zip(v, n))  # Welch-Satterthwaite
    half = float(stats.t.ppf(0.5 + confidence / 2, df) * se)
    return d, d - half, d + half
