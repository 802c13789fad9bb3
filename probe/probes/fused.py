"""Statistics fused into compiled kernels: each tensor read once or twice instead of once per
reduction.

In eager PyTorch every norm, difference, product and sum of :class:`~probe.ResidualNorms` and
:class:`~probe.ChannelStats` is its own pass over a block-sized tensor (about twenty per block),
and on a CPU those passes, not the hooks, are most of the probes' cost. ``torch.compile`` turns
each probe's arithmetic into one loop over its inputs (two for the channel variance, which needs
the mean first). The channel moments compile :func:`probe.probes.statistics.moments`, the eager
formula itself; :func:`residual_quantities` is ResidualNorms' formulas in one function. Both are
tested against numpy in float64 (tests/probe/test_fused_statistics.py).

The first batch pays the compilation (seconds to half a minute on a CPU; shapes are dynamic, so
later batch sizes and block widths reuse it). Where ``torch.compile`` cannot run (no C++
compiler, an unsupported platform) the probe warns once with :class:`FusedStatsWarning` and
computes eagerly: the same numbers, at the eager speed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["FusedStatsWarning", "Fused", "residual_quantities", "identity_quantities"]


try:  # a private setting; where it is absent, sizes are traced as torch does by default
    from torch.fx.experimental import _config as _FX_CONFIG

    _FX_CONFIG.use_duck_shape  # noqa: B018 -- present in this torch?
except (ImportError, AttributeError):  # pragma: no cover
    _FX_CONFIG = None


class FusedStatsWarning(UserWarning):
    """``fused=True`` statistics fell back to eager computation (torch.compile failed)."""


class Fused:
    """``fn`` compiled on its first call (dynamic shapes); eager ``fn`` where compiling fails.

    Example:
        >>> double = Fused(lambda t: 2 * t)
        >>> double(torch.ones(2))
        tensor([2., 2.])
    """

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn
        self._compiled: Callable[..., object] | None = None
        self.failed: str | None = None  # why compiling failed, once it has

    def __call__(self, *args: torch.Tensor) -> object:
        if self.failed is not None:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        # Statistics carry no gradient: detached, a gradient pass's tensors neither compile a
        # variant of their own nor get an autograd graph built around the kernel.
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        # Sizes that happen to be equal are traced as distinct symbols: Dynamo's duck sizing
        # gives them one symbol (a batch of 64 and 64 channels) and guards on the coincidence,
        # so a later call without it compiled again: a ResNet's blocks made five to eight
        # variants of one function, reached the recompile limit (8), and the remaining blocks
        # ran eagerly with Dynamo warning on stderr. Only tracing reads the setting.
        duck = _FX_CONFIG is not None and _FX_CONFIG.use_duck_shape
        if duck:
            _FX_CONFIG.use_duck_shape = False
        try:
            return self._compiled(*args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager result is the same
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            warnings.warn(
                f"fused statistics could not be compiled ({self.failed[:300]}); computing them "
                "eagerly instead (same numbers, eager speed). torch.compile needs a working C++ "
                "compiler on the CPU and Triton on a GPU; or pass fused=False.",
                FusedStatsWarning,
                stacklevel=2,
            )
            return self.fn(*args)
        finally:
            if duck:
                _FX_CONFIG.use_duck_shape = True


def residual_quantities(
    x: torch.Tensor, f: torch.Tensor, s: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Per-sample ||x||, ||F||, ||S||, ||y||, ||y - S||, cos(y, S), cos(F, S) of one block, with
    ResidualNorms' formulas, accumulated in ``dtype``. [N, ...] x4 -> 7 x [N]

    Example:
        >>> t = torch.ones(2, 4)
        >>> [float(q[0]) for q in residual_quantities(t, t, t, 2 * t, torch.float32)]
        [2.0, 2.0, 2.0, 4.0, 2.0, 1.0, 1.0]
    """
    n = y.shape[0]
    xf, ff, sf, yf = (t.reshape(n, -1).to(dtype) for t in (x, f, s, y))
    nx, nf, ns, ny = (torch.linalg.vector_norm(t, dim=1) for t in (xf, ff, sf, yf))
    # ||y - S|| from the difference itself (no cancellation near the identity), as in eager
    dev = torch.linalg.vector_norm(yf - sf, dim=1)
    cos_ys = (yf * sf).sum(1) / (ny * ns).clamp_min(1e-12)
    cos_fs = (ff * sf).sum(1) / (nf * ns).clamp_min(1e-12)
    return nx, nf, ns, ny, dev, cos_ys, cos_fs


def identity_quantities(
    x: torch.Tensor, f: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """:func:`residual_quantities` of a block whose shortcut is the identity (S = x): x passed
    once, since a tensor given twice is a variant of its own to the compiler. -> 7 x [N]

    Example:
        >>> t = torch.ones(2, 4)
        >>> [float(q[0]) for q in identity_quantities(t, t, 2 * t, torch.float32)]
        [2.0, 2.0, 2.0, 4.0, 2.0, 1.0, 1.0]
    """
    return residual_quantities(x, f, x, y, dtype)
