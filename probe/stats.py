"""Exact streaming moments merged across batches (Chan, Golub & LeVeque 1979; Welford 1962).

Per-sample statistics (e.g. each sample's per-channel mean and variance over H x W) are stored in
captures; merging them with Chan's parallel formula gives the dataset-level per-channel mean and
variance exactly, batch by batch, in float64:

    n = n_a + n_b,  delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n          (variance = M2 / n)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Moments", "response_std"]


@dataclass
class Moments:
    """Running count, mean and sum of squared deviations of a vector-valued quantity.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(100, 3))
        >>> m = Moments.empty(3)
        >>> for part in np.array_split(x, 7):
        ...     m.update_from_data(part)
        >>> bool(np.allclose(m.var, x.var(0)))
        True
    """

    count: float
    mean: np.ndarray  # [C] float64
    m2: np.ndarray  # [C] float64

    @classmethod
    def empty(cls, size: int) -> Moments:
        return cls(0.0, np.zeros(size), np.zeros(size))

    @property
    def var(self) -> np.ndarray:
        """Population variance (divide by n)."""
        return self.m2 / max(self.count, 1.0)

    def merge(self, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merge a group of ``count`` observations with the given mean and M2 (Chan et al.)."""
        if count == 0:
            return
        n = self.count + count
        delta = np.asarray(mean, np.float64) - self.mean
        self.mean = self.mean + delta * (count / n)
        self.m2 = self.m2 + np.asarray(m2, np.float64) + delta**2 * (self.count * count / n)
        self.count = n

    def update_from_data(self, x: np.ndarray) -> None:
        """Merge raw observations ``x`` [n, C]."""
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        self.merge(len(x), mean, ((x - mean) ** 2).sum(0))

    def update_from_groups(
        self, means: np.ndarray, variances: np.ndarray, group_size: float
    ) -> None:
        """Merge equal-size groups given by their means and population variances, [G, C] each.

        This is how per-sample spatial statistics (one group of H*W values per sample and
        channel) become exact per-channel statistics over (N, H, W).
        """
        means = np.asarray(means, np.float64)
        variances = np.asarray(variances, np.float64)
        g = len(means)
        if g == 0:
            return
        block_mean = means.mean(0)
        # Within-group plus between-group sums of squares.
        m2 = (variances * group_size).sum(0) + group_size * ((means - block_mean) ** 2).sum(0)
        self.merge(g * group_size, block_mean, m2)


def response_std(channel_mean: np.ndarray, channel_var: np.ndarray) -> tuple[float, float]:
    """Layer-response std of He et al. (2016), Fig. 7, from per-channel moments over (N, H, W).

    Returns ``(pooled, per_channel)``: the std over all N*C*H*W entries (every channel has the
    same count, so the pooled variance is mean_c(var_c + mean_c^2) - (mean_c mean_c)^2) and the
    mean over channels of the per-channel std.

    Example:
        >>> response_std(np.array([0.0, 0.0]), np.array([1.0, 4.0]))
        (1.5811388300841898, 1.5)
    """
    mean = np.asarray(channel_mean, np.float64)
    var = np.asarray(channel_var, np.float64)
    pooled_var = float((var + mean**2).mean() - mean.mean() ** 2)
    return float(np.sqrt(max(pooled_var, 0.0))), float(np.sqrt(np.maximum(var, 0.0)).mean())
