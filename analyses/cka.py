"""Linear CKA (Kornblith et al., ICML 2019) and its unbiased minibatch estimator (Nguyen, Raghu &
Kornblith, ICLR 2021).

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),  K = X X^T, L = Y Y^T (n x n Gram matrices)
    biased   HSIC(K, L) = tr(K H L H) / (n - 1)^2,  H = I - 11^T / n
    unbiased HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))
              with K~, L~ the Gram matrices with zeroed diagonals (Song et al. 2012).
The minibatch estimator averages HSIC_1 over batches before normalising, so it is unbiased for
any batch size and can be streamed.
"""

from __future__ import annotations

import numpy as np

from probe.errors import ProbeError
from probe.store.reader import CaptureReader

__all__ = [
    "capture_representations",
    "gram",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "MinibatchCKA",
    "cka_matrix",
]


def gram(x: np.ndarray) -> np.ndarray:
    """Linear Gram matrix of samples x [n, ...] (flattened), float64. -> [n, n]"""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x @ x.T


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - 1.0 / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    if n < 4:
        raise ValueError(f"Unbiased HSIC needs at least 4 samples; got {n}.")
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one_k, one_l = k.sum(0), l.sum(0)
    term = (
        (k * l).sum()
        + one_k.sum() * one_l.sum() / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one_k @ one_l)
    )
    return float(term / (n * (n - 3)))


def linear_cka(x: np.ndarray, y: np.ndarray, unbiased: bool = False) -> float:
    """Linear CKA between two representations of the same n samples.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 8))
        >>> print(round(linear_cka(x, 3 * x), 12))
        1.0
    """
    k, l = gram(x), gram(y)
    h = hsic_unbiased if unbiased else hsic_biased
    return float(h(k, l) / np.sqrt(h(k, k) * h(l, l)))


class MinibatchCKA:
    """Streaming unbiased CKA between several layers: feed batches, read the L x L matrix.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a = rng.normal(size=(64, 5)); b = a @ rng.normal(size=(5, 5))
        >>> m = MinibatchCKA(2)
        >>> for part in np.split(np.arange(64), 4):
        ...     m.update([a[part], b[part]])
        >>> bool(np.isclose(m.matrix()[0, 0], 1.0))
        True
    """

    def __init__(self, n_layers: int) -> None:
        self.hsic = np.zeros((n_layers, n_layers))
        self.batches = 0

    def update(self, reps: list[np.ndarray]) -> None:
        grams = [gram(r) for r in reps]
        for i, k in enumerate(grams):
            for j in range(i, len(grams)):
                v = hsic_unbiased(k, grams[j])
                self.hsic[i, j] += v
                if i != j:
                    self.hsic[j, i] += v
        self.batches += 1

    def matrix(self) -> np.ndarray:
        d = np.sqrt(np.clip(np.diag(self.hsic), 1e-300, None))
        return self.hsic / np.outer(d, d)


def capture_representations(cap: CaptureReader) -> tuple[list[str], list[np.ndarray]]:
    """The layers of ``cap`` with captured ``output`` activations and their flattened rows
    [n, features] over the samples they all share (the first n)."""
    layers = [l for l in cap.layers if cap.has(l, "output")]
    if not layers:
        return [], []
    n = min(cap.shape(l, "output")[0] for l in layers)
    return layers, [cap.read(l, "output", slice(0, n)).reshape(n, -1) for l in layers]


def cka_matrix(reps: list[np.ndarray] | CaptureReader, batch_size: int | None = None) -> np.ndarray:
    """Layer x layer CKA of representations over the same samples (unbiased minibatch estimator
    when ``batch_size`` is given, else biased one-shot CKA). ``reps`` may be a capture: its layers
    with ``output`` activations (probe 'activations'), in capture order."""
    if isinstance(reps, CaptureReader):
        layers, reps = capture_representations(reps)
        if len(layers) < 2:
            raise ProbeError(
                f"CKA needs 'output' activations of at least two layers; this capture has them "
                f"for {len(layers)}. Capture with probes=[probe.Activations()] (--probe activations)."
            )
    n = len(reps[0])
    if batch_size is None:
        grams = [gram(r) for r in reps]
        out = np.ones((len(reps), len(reps)))
        for i in range(len(reps)):
            for j in range(i + 1, len(reps)):
                out[i, j] = out[j, i] = hsic_biased(grams[i], grams[j]) / np.sqrt(
                    hsic_biased(grams[i], grams[i]) * hsic_biased(grams[j], grams[j])
                )
        return out
    m = MinibatchCKA(len(reps))
    for start in range(0, n - batch_size + 1, batch_size):
        m.update([r[start : start + batch_size] for r in reps])
    return m.matrix()
