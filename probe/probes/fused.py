"""Statistics fused into compiled kernels: each tensor read once or twice instead of once per
reduction.

In eager PyTorch every norm, difference, product and sum of :class:`~probe.ResidualNorms` and
:class:`~probe.ChannelStats` is its own pass over a block-sized tensor (about twenty per block),
and on a CPU those passes, not the hooks, are most of the probes' cost. ``torch.compile`` turns
each probe's arithmetic into one loop over its inputs (two for the channel variance, which needs
the mean first). The channel moments compile :func:`probe.probes.statistics.moments`, the eager
formula itself; :func:`residual_quantities` is ResidualNorms' formulas in one function. Both are
tested against numpy in float64 (tests/probe/test_fused_statistics.py).

On the CPU each signature of a call (the tensors' shapes, strides and dtypes, the other
arguments, CPU autocast) is compiled on its own, for those shapes, and called without Dynamo:
a Dynamo call costs 150-290 us of Python where a model's pass has just left the caches cold,
against ~20 us warm, as much as a small block's arithmetic (docs/performance.md). Past
``STATIC_SIGNATURES`` signatures of one function, and on other devices, one function compiled by
``torch.compile`` with dynamic shapes serves every call. The first batch pays the compilation
(3-4 s per signature on a 2-core CPU with an empty Inductor cache, about 1 s with a warm one).
Where compiling fails (no C++ compiler, an unsupported platform) the probe warns once with
:class:`FusedStatsWarning` and computes eagerly: the same numbers, at the eager speed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Hashable

import torch

__all__ = [
    "FusedStatsWarning",
    "Fused",
    "STATIC_SIGNATURES",
    "residual_quantities",
    "identity_quantities",
]

log = logging.getLogger(__name__)

# Signatures compiled one by one per function on the CPU; a model with more shapes than this (a
# sequence model fed every length) has the rest served by one dynamically shaped function.
STATIC_SIGNATURES = 16


try:  # a private setting; where it is absent, sizes are traced as torch does by default
    from torch.fx.experimental import _config as _FX_CONFIG

    _FX_CONFIG.use_duck_shape  # noqa: B018 -- present in this torch?
except (ImportError, AttributeError):  # pragma: no cover
    _FX_CONFIG = None


class FusedStatsWarning(UserWarning):
    """``fused=True`` statistics fell back to eager computation (torch.compile failed)."""


class Fused:
    """``fn`` compiled: on the CPU once per signature of its calls, for fixed shapes, and called
    without Dynamo; past STATIC_SIGNATURES and elsewhere once, with dynamic shapes, by
    ``torch.compile``; eager ``fn`` where compiling fails.

    Example:
        >>> double = Fused(lambda t: 2 * t)
        >>> double(torch.ones(2))
        tensor([2., 2.])
    """

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn
        self._compiled: Callable[..., object] | None = None
        self._static: dict[Hashable, Callable[..., object]] = {}  # signature -> its function
        self.static_failed: str | None = None  # why a static compilation failed, once one has
        self.failed: str | None = None  # why compiling failed, once it has

    def __call__(self, *args: torch.Tensor) -> object:
        if self.failed is not None:
            return self.fn(*args)
        # Statistics carry no gradient: detached, a gradient pass's tensors neither compile a
        # variant of their own nor get an autograd graph built around the kernel.
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        static = self._static_for(args)
        if static is not None:
            return static(*(a for a in args if isinstance(a, torch.Tensor)))
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
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

    def _static_for(self, args: tuple) -> Callable[..., object] | None:
        """The function compiled for this call's signature (compiled now if new); None off the
        CPU, past STATIC_SIGNATURES, or once a static compilation has failed."""
        if self.static_failed is not None:
            return None
        key = _signature(args)
        if key is None:
            return None
        found = self._static.get(key)
        if found is not None or len(self._static) >= STATIC_SIGNATURES:
            return found
        try:
            found = self._static[key] = _compile_static(self.fn, args)
        except Exception as e:  # noqa: BLE001 -- the dynamic path (or eager, warned) takes over
            self.static_failed = f"{type(e).__name__}: {e}"
            log.debug("static compilation of %s failed: %s", self.fn.__name__, self.static_failed)
            return None
        return found


def _cpu_autocast() -> tuple[bool, torch.dtype]:
    try:
        return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except TypeError:  # pragma: no cover -- torch before 2.4's device-type forms
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()


def _signature(args: tuple) -> Hashable | None:
    """What a function compiled for fixed shapes depends on: each tensor's shape, strides and
    dtype, every other argument, and CPU autocast; None unless every tensor is on the CPU."""
    parts: list[Hashable] = [_cpu_autocast()]
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                return None
            parts.append((tuple(a.shape), a.stride(), a.dtype))
        else:
            parts.append(a)
    return tuple(parts)


def _compile_static(fn: Callable[..., object], args: tuple) -> Callable[..., object]:
    """``fn`` traced on ``args`` (its graph for their shapes) and compiled by Inductor: a function
    of the tensor arguments alone, in order, for tensors of the same signature."""
    from torch._inductor import compile as inductor_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def of_tensors(*ts: torch.Tensor) -> object:
        given = iter(ts)
        return fn(*(next(given) if isinstance(a, torch.Tensor) else a for a in args))

    with torch.no_grad():
        graph = make_fx(of_tensors)(*tensors)
        return inductor_compile(graph, tensors)


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
