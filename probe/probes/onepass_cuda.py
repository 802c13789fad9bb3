"""The statistics on a CUDA device in one read of each tensor (Triton kernels).

On a GPU each of a block's statistics in PyTorch is its own pass over a map, with its own
temporaries: a float32 copy of S(x), y - S(x), the products y S and F S, each channel's
deviations, then a reduction of each. Recorded as a CUDA graph, so that the host's dispatch no
longer counts, a ResNet-56 pass at batch 512 still spent ~8.7 ms of GPU time per forward on its
statistics, 2.6 x the model's forward and ~30 x the time to read y, F and S once
(docs/performance-log.md, "Fourth session"). The kernels of :mod:`probe.probes._triton_kernels` read
each tensor once and widen it in registers: per-sample sums of exact float64 products in
float64, channel moments per tile in float32 combined in float64:

- :func:`block_sums`: a block's ||F||, ||S||, ||y||, ||y - S||, cos(y, S), cos(F, S) and the
  channel mean and variance of y and F, two launches;
- :func:`moments`: the channel mean and variance of one map, one launch;
- :func:`dot` and :func:`norm`: per-sample a.b and ||a||, two launches.

They serve float32, bfloat16 and float16 tensors on a CUDA device, each in its own dtype, whose
maps share one shape and strides, channel-first or channels-last (see :func:`_layout`); results
are float32, the dtype of torch's formulas for those inputs. Anything else, every call where
triton does not import, ``RESPROBE_ONEPASS=0`` (as for the CPU kernels), and every call after a
kernel failed to compile or run (an :class:`~probe.probes.onepass.OnePassWarning`, once) takes
torch's formulas. No result is read back on the host, so a recorded pass (probe.replay) records
the kernels as it records torch's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from types import ModuleType

import torch

# one switch and one warning for the kernels of both devices, and the same layout rules
from probe.probes.onepass import (
    ENV,
    _channel_order,
    _formulas,
    _in_memory_order,
    _warn_failed,
)

__all__ = ["available", "mode", "block_sums", "moments", "dot", "norm", "INTERPRET_ENV"]

log = logging.getLogger(__name__)

# triton's own switch: kernels run on the CPU by its interpreter (tests, without a GPU)
INTERPRET_ENV = "TRITON_INTERPRET"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 2048  # values per tile of a map: 3 x 2048 float32 in registers over _WARPS warps
_WARPS = 8  # 4 took ~160-250 registers a thread at 2048 (cuobjdump), spilling past 255
_PIECE = 1 << 16  # values per program of a per-sample product (a long row takes several)
_VECTOR = 1024  # values a products program loads at a time
_PARTS = 128  # partial sums a finishing program loads at a time
# the values of one sample the map kernel addresses with 32-bit offsets: a larger sample would
# wrap them, so it is left to torch's formulas
_SAMPLE_VALUES = 2**31 - 1
_GRID_Y = 65535  # CUDA's limit on a launch grid's second axis

_failed = False  # a kernel failed once in this process: torch's formulas serve from then on


@functools.cache
def _module() -> ModuleType | None:
    """The kernel module, or None where triton does not load."""
    try:
        from probe.probes import _triton_kernels
    except Exception as e:  # noqa: BLE001 -- an absent or broken triton: torch's formulas serve
        log.debug("one-pass CUDA statistics off: triton did not load (%s)", e)
        return None
    return _triton_kernels


def _interpreted() -> bool:
    return os.environ.get(INTERPRET_ENV, "0").strip() == "1"


def _off() -> bool:
    return _failed or os.environ.get(ENV, "1").strip() == "0"


def available() -> bool:
    """Whether the kernels serve CUDA tensors in this process (triton loads, not turned off).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return not _off() and _module() is not None


def mode() -> str:
    """Which formulas this process's CUDA statistics take: "one-pass" (the kernels) or "torch"
    (recorded with every capture's runtime settings). Does not import triton.

    Example:
        >>> mode() in ("one-pass", "torch")
        True
    """
    return _formulas(_off(), _module, "triton")


def _served(tensors: tuple[torch.Tensor, ...], min_ndim: int) -> tuple | None:
    """(shape, strides) shared by ``tensors``: dense tensors of a served dtype on one CUDA
    device (any device under triton's interpreter), of at least ``min_ndim`` axes, not empty,
    whose memory holds their values as they are; None otherwise, and where a tensor has no
    memory to read (a functorch or fake tensor)."""
    if _off():
        return None
    first = tensors[0]
    try:
        shape, strides, device = first.shape, first.stride(), first.device
        if len(shape) < min_ndim or first.numel() == 0:
            return None
        if device.type != "cuda" and not _interpreted():
            return None
        for t in tensors:
            if t.dtype not in _DTYPES or t.layout != torch.strided or t.device != device:
                return None
            if t.shape != shape or t.stride() != strides or t.is_neg() or t.is_conj():
                return None
            t.data_ptr()  # a wrapped or fake tensor has none: refused here, not in the kernel
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return (shape, strides) if _module() is not None else None


def _layout(tensors: tuple[torch.Tensor, ...], axis: int) -> tuple[int, int, int, int, bool] | None:
    """(N, C, P, sample stride, columns?) of ``tensors`` with channel axis ``axis``: read as
    [N, C, P] with positions contiguous (channel-first), or as [N, P, C] with channels
    contiguous (a channels-last map, [N, T, C] tokens); None where neither, or not served."""
    found = _served(tensors, 3)
    if found is None:
        return None
    shape, strides = found
    n, c = shape[0], shape[axis]
    p = math.prod(shape) // (n * c)
    # past 32-bit offsets within a sample, or more runs of channels (at least one channel each)
    # than the launch grid's second axis holds
    if c * p > _SAMPLE_VALUES or c > _GRID_Y:
        return None
    # the sample axis is left out: a sample's values are one block, wherever the next one starts
    rows = _channel_order(*_one_sample(shape, strides), axis)
    if rows is None:
        return None
    return n, c, p, strides[0] if n > 1 else c * p, not rows


def _one_sample(shape: torch.Size, strides: tuple[int, ...]) -> tuple[tuple, tuple]:
    """``shape`` and ``strides`` of one sample: the kernels take the sample stride as given."""
    return (1, *shape[1:]), (0, *strides[1:])


def _tile(channels: int, positions: int, columns: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of a map's tile: its long side along the contiguous axis, _TILE
    values in all (fewer for a small map)."""
    if columns:  # channels contiguous
        block_c = min(triton_power(channels), 128)
        return block_c, min(triton_power(positions), max(_TILE // block_c, 1))
    block_p = min(triton_power(positions), _TILE)
    return min(triton_power(channels), max(_TILE // block_p, 1)), block_p


def triton_power(n: int) -> int:
    """The power of two at or above ``n`` (a tile's side must be one).

    Example:
        >>> [triton_power(k) for k in (1, 3, 64, 65)]
        [1, 4, 64, 128]
    """
    return 1 << max(n - 1, 0).bit_length()


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` made current for a launch: triton launches on the current CUDA device, which
    need not be the tensors' (a model on cuda:1 in a process whose current device is cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run(launch, device: torch.device) -> bool:
    """Run ``launch`` on ``device``; on a failure (a compiler or driver error), warn once, turn
    the kernels off for the process and say False, so that torch's formulas serve the call."""
    global _failed
    try:
        with _on(device):
            launch()
    except Exception as e:  # noqa: BLE001 -- any failure: torch's formulas serve, with a warning
        _failed = True
        _warn_failed("one-pass CUDA statistics", e)
        return False
    return True


def block_sums(
    f: torch.Tensor, s: torch.Tensor, y: torch.Tensor, axis: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
    """A block's statistics from one read of F(x), S(x) and y (one shape and strides, channel
    axis ``axis``): ((||F||, ||S||, ||y||, ||y - S||, cos(y, S), cos(F, S)) [N] each, (mean y,
    var y, mean F, var F) [N, C] each), float32; None where the kernels do not serve them.

    Example:
        >>> f, s = torch.ones(1, 1, 4), torch.zeros(1, 1, 4)
        >>> block_sums(f, s, f + s, 1) is None  # CPU tensors: the CPU's kernels serve those
        True
    """
    found = _layout((y, f, s), axis)
    if found is None:
        return None
    n, c, p, stride_n, columns = found
    block_c, block_p = _tile(c, p, columns)
    runs = -(-c // block_c)
    moments_out = torch.empty(4, n, c, dtype=torch.float32, device=y.device)
    partial = torch.empty(n, runs, 6, dtype=torch.float64, device=y.device)
    sample = torch.empty(6, n, dtype=torch.float32, device=y.device)
    k = _module()

    def launch() -> None:
        k.channels[(n, runs)](
            y, f, s, moments_out, partial, n, c, p, stride_n,
            BLOCK=True, COLUMNS=columns, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=_WARPS,
        )  # fmt: skip
        k.finish_block[(n,)](partial, sample, n, runs, BLOCK_R=min(triton_power(runs), _PARTS))

    if not _run(launch, y.device):
        return None
    return tuple(sample.unbind(0)), tuple(moments_out.unbind(0))


def moments(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample, per-channel mean and population variance of ``t`` (channel axis ``axis``, at
    least one axis besides the sample's and the channel's) from one read, [N, C] float32 each;
    None where the kernels do not serve it.

    Example:
        >>> moments(torch.ones(1, 1, 4), 1) is None  # a CPU tensor
        True
    """
    found = _layout((t,), axis)
    if found is None:
        return None
    n, c, p, stride_n, columns = found
    block_c, block_p = _tile(c, p, columns)
    out = torch.empty(2, n, c, dtype=torch.float32, device=t.device)
    k = _module()

    def launch() -> None:
        k.channels[(n, -(-c // block_c))](
            t, t, t, out, out, n, c, p, stride_n,
            BLOCK=False, COLUMNS=columns, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=_WARPS,
        )  # fmt: skip

    if not _run(launch, t.device):
        return None
    return out[0], out[1]


def _rows(tensors: tuple[torch.Tensor, ...]) -> tuple[int, int, int] | None:
    """(N, M, sample stride) where each sample's M values of ``tensors`` lie together in memory,
    in the same order for all (a channels-last map: H, W, C); None otherwise, or not served."""
    found = _served(tensors, 2)
    if found is None:
        return None
    shape, strides = found
    if not _in_memory_order(*_one_sample(shape, strides)):
        return None
    m = math.prod(shape[1:])
    return shape[0], m, strides[0] if shape[0] > 1 else m


def _products(a: torch.Tensor, b: torch.Tensor, root: bool) -> torch.Tensor | None:
    found = _rows((a,) if a is b else (a, b))
    if found is None:
        return None
    n, m, stride_n = found
    vector = min(_VECTOR, triton_power(m))
    piece = min(-(-m // vector) * vector, _PIECE)  # whole vectors: no program loads past its piece
    pieces = -(-m // piece)
    if pieces > _GRID_Y:  # a launch grid's second axis holds no more programs
        return None
    partial = torch.empty(n, pieces, dtype=torch.float64, device=a.device)
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    k = _module()

    def launch() -> None:
        k.products[(n, pieces)](a, b, partial, m, stride_n, piece, SAME=a is b, BLOCK=vector)
        k.finish_rows[(n,)](
            partial, out, pieces, ROOT=root, BLOCK_R=min(triton_power(pieces), _PARTS)
        )

    return out if _run(launch, a.device) else None


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per-sample a.b from one read of ``a`` and ``b`` (one shape and strides), [N] float32,
    summed in float64 (GradNorms' F.dL/dx); None where the kernels do not serve them.

    Example:
        >>> dot(torch.ones(1, 4), torch.ones(1, 4)) is None  # CPU tensors
        True
    """
    return _products(a, b, root=False)


def norm(t: torch.Tensor) -> torch.Tensor | None:
    """Per-sample L2 norm of ``t`` [N, ...] from one read, summed in float64 and rounded once,
    [N] float32; None where the kernels do not serve it.

    Example:
        >>> norm(torch.ones(1, 4)) is None  # a CPU tensor
        True
    """
    return _products(t, t, root=True)
