"""On-device statistics: per-sample norms, per-channel moments and gradient norms.

All are computed inside the hook, so only a few numbers per sample leave the device; low-precision
tensors (fp16, bf16) are accumulated in float32, float64 tensors stay in float64.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from probe.errors import ProbeError
from probe.probes import onepass, onepass_cuda
from probe.probes.base import Call, Probe
from probe.probes.fused import Fused, identity_quantities, residual_quantities
from probe.probes.group import (
    CallGroup,
    f_of,
    grad_input_of,
    grad_output_of,
    input_of,
    output_of,
    s_of,
    x_of,
    y_of,
)
from probe.probes.layout import channel_axis, check_layout

__all__ = [
    "ResidualNorms",
    "ChannelStats",
    "GradNorms",
    "per_sample_norm",
    "per_sample_cos",
    "per_sample_dot",
    "channel_moments",
    "moments",
    "sum_moments",
    "polarized_dot",
    "ONE_PASS_MAX_RATIO",
    "moments_of_two",
    "block_statistics",
    "identity_block_statistics",
    "accumulation_dtype",
    "NormMemo",
]


_SINGLE = (torch.float16, torch.bfloat16, torch.float32)  # accumulated in float32
# per_sample_norm takes a row of at least _CASCADE_ROW values piece by piece, each piece at
# least _PIECE values: on shorter rows one running sum per lane is accurate enough (<= 1e-5
# with a few values holding the mass, 2e-7 on ResNet-56's largest random rows) and ~1.4 x
# faster with cold caches; on shorter pieces the many short reductions cost more than they save.
_CASCADE_ROW = 32768
_PIECE = 128


def _one_read(t: torch.Tensor) -> ModuleType:
    """The one-read kernels for ``t``'s device: Triton's on a CUDA device
    (probe.probes.onepass_cuda), numba's elsewhere (probe.probes.onepass, CPU tensors only);
    each says None where it does not serve a call."""
    return onepass_cuda if t.is_cuda else onepass  # is_cuda: no device object made per call


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for fp16/bf16/fp32 inputs, float64 when any input is float64."""
    if all(t.dtype in _SINGLE for t in tensors):  # the usual case, without promotion calls
        return torch.float32
    return torch.promote_types(
        torch.float32, functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    )


def _rows(t: torch.Tensor) -> int | tuple[int, ...]:
    """Every axis but the first: a per-sample reduction over them needs no flattened copy (a
    channels-last tensor's ``flatten(1)`` is one) and no view call. [N] tensors are refused:
    torch reads ``dim=()`` as every axis, which would be one number for the whole batch."""
    if t.ndim < 2:
        raise ProbeError(
            f"Per-sample norms need a tensor [N, ...] with at least one axis after the sample "
            f"axis; got shape {tuple(t.shape)}. Select layers whose outputs have features."
        )
    return 1 if t.ndim == 2 else tuple(range(1, t.ndim))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _cascade_norm(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-sample norms of a long CPU row taken piece by piece (see :func:`per_sample_norm`):
    the axes after the sample's, in the order of memory, split where the trailing ones hold at
    least _PIECE values; the norms of those pieces, then of each sample's pieces. None where the
    row is short, a piece would be, or the sample's values are not one block of memory."""
    if t.ndim < 3 or t.numel() < _CASCADE_ROW * max(len(t), 1) or not t.is_cpu:
        return None
    order = sorted(range(1, t.ndim), key=lambda d: -t.stride(d))  # outermost first
    m = t.permute(0, *order)  # a view: a channels-last map as [N, H, W, C]
    if not m.is_contiguous():
        return None
    for k in range(m.ndim - 1, 1, -1):
        if math.prod(m.shape[k:]) >= _PIECE:
            pieces = torch.linalg.vector_norm(m, dim=tuple(range(k, m.ndim)), dtype=dtype)
            return torch.linalg.vector_norm(pieces, dim=tuple(range(1, k)))
    return None


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample over all non-batch dims (float32, float64 for a float64 input).
    [N, ...] -> [N]

    Tensors whose samples each lie in one block of memory are read once, with float64 sums and
    one rounding: float32 and float64 ones on the CPU by :func:`probe.probes.onepass.norm`,
    float32, bf16 and fp16 ones on a CUDA device by :func:`probe.probes.onepass_cuda.norm`;
    others take torch's norm, piece by piece on long CPU rows (below).

    Example:
        >>> per_sample_norm(torch.ones(2, 3, 4, dtype=torch.float64))
        tensor([3.4641, 3.4641], dtype=torch.float64)
    """
    if not (t.is_floating_point() or t.is_complex()):  # indices or masks: torch has no norm
        t = t.to(accumulation_dtype(t))  # of them
    if t.ndim >= 2:  # one read, float64 sums, one rounding, as the block kernels take theirs
        found = _one_read(t).norm(t)  # (probe.probes.onepass, probe.probes.onepass_cuda)
        if found is not None:
            return found
    dtype = accumulation_dtype(t)
    # torch's CPU norm adds a row's squares into one running sum per vector lane: on long rows,
    # and where a few values hold the row's mass (a ViT's gradient, 99.99 % of it in the class
    # token), the small ones are rounded away: 1.3e-5 relative in float32 on [8, 197, 384],
    # 1e-4 on a [64, 56, 56] row with a channel's mass. Piece by piece, a two-level cascade:
    # ~2e-7 there, at 1.05-1.3 x the time (benchmarks/bench_statistics_parts.py --norms).
    # A GPU's norm is a tree already.
    cascaded = _cascade_norm(t, dtype)
    if cascaded is not None:
        return cascaded
    return torch.linalg.vector_norm(t, dim=_rows(t), dtype=dtype)


def per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product of each sample's flattened tensors (precision as :func:`per_sample_norm`).
    [N, ...] x2 -> [N]

    A product then a sum: on the CPU ``torch.linalg.vecdot`` and ``einsum`` run 4-25x slower
    than this pair of vectorised passes (benchmarks/compare.py, docs/performance.md).

    Example:
        >>> per_sample_dot(torch.ones(2, 3), torch.full((2, 3), 2.0))
        tensor([6., 6.])
        >>> per_sample_dot(torch.tensor([[1j]]), torch.tensor([[1j]]))  # Re sum(a conj(b))
        tensor([1.])
    """
    if a.is_complex() or b.is_complex():
        # the inner product of the tensors read as real vectors (real and imaginary parts), so
        # that dot(a, a) = ||a||^2 and cos(a, a) = 1; a plain product would be complex
        return torch.real(a * b.conj()).sum(_rows(a))
    dtype = accumulation_dtype(a, b)
    if a.dtype != dtype and b.dtype != dtype:  # else the product is promoted to it, element by
        b = b.to(dtype)  # element, exactly (bf16 and fp16 values are exact in float32): no copy
    return (a * b).sum(_rows(a), dtype=dtype)


def _guard_is_cheap(t: torch.Tensor) -> bool:
    """Whether the one-read formulas' guard (a host read per call) suits ``t``: on the CPU. On
    an accelerator the read would wait for the device on every call, and a recorded pass
    (probe.replay) refuses it; the exact formulas serve there."""
    return t.is_cpu


def _failed_rows(excess: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Indices of the rows a guard rejects -- ``excess`` > 0 or NaN (a NaN row, or sums that
    overflowed) -- for one call of the exact formula on them; None when every row is kept.
    One host read where every row is kept, the usual case."""
    if float(excess.amax()) <= 0:
        return None
    return excess.le(0).logical_not_().nonzero(as_tuple=True)


def polarized_dot(
    a: torch.Tensor,
    b: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """:func:`per_sample_dot` of two real tensors from norms already computed,
    ``norms = (||a||, ||b||, ||a - b||)`` per sample, by the polarization identity
    a.b = (||a||^2 + ||b||^2 - ||a - b||^2) / 2, and by the product for the rows where that
    difference cancels. -> [N]

    A row is kept where (||a||^2 + ||b||^2 + ||a - b||^2) / |2 a.b| <= ONE_PASS_MAX_RATIO: the
    three squared norms each carry a relative rounding error e, so the result's is at most
    ~ONE_PASS_MAX_RATIO * e there. Nearly orthogonal rows, zero rows, NaN and overflowed ones
    fail and are computed again by :func:`per_sample_dot`, in one call. A block's output and its
    shortcut are far from orthogonal (cos(y, S) >= 0.36 at initialisation, >= 0.73 trained, on
    ResNet-56): on a CPU this saves the product's temporary the size of the map, written and read
    back (docs/performance.md). The norms must be those of ``a``, ``b`` and ``a - b`` as given:
    ``a - b`` in the accumulation dtype.

    Example:
        >>> a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]])
        >>> norms = (per_sample_norm(a), per_sample_norm(b), per_sample_norm(a - b))
        >>> polarized_dot(a, b, norms)
        tensor([9.])
        >>> c = torch.tensor([[0.0, 1e-3]])  # nearly orthogonal to b: by the product
        >>> polarized_dot(c, b, (per_sample_norm(c), norms[1], per_sample_norm(c - b)))
        tensor([0.])
    """
    na, nb, nd = norms
    total = na.square().addcmul_(nb, nb)  # ||a||^2 + ||b||^2
    square_d = nd.square()
    dot = torch.sub(total, square_d).div_(2)
    # NaN where a norm is NaN or inf (inf - inf): failed, as where the difference cancels
    excess = total.add_(square_d).sub_(dot.abs(), alpha=2 * ONE_PASS_MAX_RATIO)
    rows = _failed_rows(excess)
    if rows is not None:
        dot.index_put_(rows, per_sample_dot(a[rows], b[rows]).to(dot.dtype))
    return dot


_COS_EPS = 1e-12  # per_sample_cos's default floor of ||a|| ||b||


def _cos(
    dot: torch.Tensor, na: torch.Tensor, nb: torch.Tensor, eps: float = _COS_EPS
) -> torch.Tensor:
    """cos(a, b) from a.b and the two norms, their product floored at ``eps``."""
    return dot / (na * nb).clamp_min(eps)


def per_sample_cos(
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float = _COS_EPS,
    norms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cosine similarity of each sample's flattened tensors (precision as :func:`per_sample_norm`);
    ``norms`` are their per-sample norms when already computed. [N, ...] x2 -> [N]

    Example:
        >>> per_sample_cos(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
        tensor([0.7071])
    """
    na, nb = norms if norms is not None else (per_sample_norm(a), per_sample_norm(b))
    return _cos(per_sample_dot(a, b), na, nb, eps)


def channel_moments(t: torch.Tensor, layout: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and population variance over all other positions.

    [N, C, H, W] -> ([N, C], [N, C]); ``layout`` names the axes (see :mod:`probe.probes.layout`;
    "auto" reads [N, T, C] tokens as channel-last); a 2-D [N, C] input has one position
    (variance 0).

    Example:
        >>> tokens = torch.arange(12.0).reshape(1, 3, 4)  # [N, T, C]
        >>> channel_moments(tokens, "auto")[0]
        tensor([[4., 5., 6., 7.]])
    """
    if t.is_complex():
        raise ProbeError(
            f"Channel moments need a real tensor; got {t.dtype} of shape {tuple(t.shape)}. Take "
            "the moments of its real and imaginary parts (a custom probe), or leave the layer out."
        )
    axis = channel_axis(layout, t)
    if axis != 1:
        t = t.movedim(axis, 1)  # a view (a permute op: skipped for channel-first tensors)
    dtype = accumulation_dtype(t)
    if t.ndim == 2:
        t = t.to(dtype)
        return t, torch.zeros_like(t)
    if not t.is_floating_point():  # a layer giving indices or masks: no norm or difference
        t = t.to(dtype)  # of such tensors in torch
    # one read of each row where the kernels serve it (on the CPU float32/64, on a CUDA device
    # float32/bf16/fp16; one of the two layouts), else torch's formulas: on the CPU the guarded
    # one-pass sums, elsewhere the two-pass formula (the guard would read results on the host)
    asked = t.is_cpu and t.dtype == dtype or t.is_cuda
    found = _one_read(t).moments(t, 1) if asked else None
    if found is not None:
        return found
    return sum_moments(t, dtype) if _guard_is_cheap(t) else moments(t, dtype)


# Rows where E[x^2] <= ONE_PASS_MAX_RATIO * var take the one-pass formula of sum_moments: its
# relative error is about this ratio times the accumulation's (float32: <= ~1e-5 on rows of up to
# 12544 positions, tests/probe/test_statistics_precision.py); all others take the two-pass one.
ONE_PASS_MAX_RATIO = 16.0


def sum_moments(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moments` from one read of each row: E[x^2] - E[x]^2 from the row's sum and sum of
    squares, with no temporary the size of ``t``, and :func:`moments` for the rows where that
    difference cancels. -> ([N, C], [N, C])

    The difference loses digits as E[x^2] / var grows (every one of them at mean^2/var = 1e12;
    Chan, Golub & LeVeque 1983), so a row is kept only where its computed variance is at least
    E[x^2] / ONE_PASS_MAX_RATIO: there a relative rounding error e of the sums becomes at most
    ~ONE_PASS_MAX_RATIO * e of the variance. A row that fails (including a NaN or an overflowed
    sum of squares) is computed again by :func:`moments`. On a CPU this saves the two-pass
    formula's deviation tensor, written and read back per map (docs/performance.md).

    Example:
        >>> sum_moments(torch.tensor([[[1.0, 3.0, 1.0, 3.0]]]), torch.float32)
        (tensor([[2.]]), tensor([[1.]]))
        >>> sum_moments(torch.tensor([[[1e4, 1e4 + 1e-2]]]), torch.float32)[1]  # two-pass row
        tensor([[2.3842e-05]])
    """
    return _sums(t, dtype)[:2]


def _sums(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sum_moments` and each row's sum of squares, [N, C]: summed over the channels, the
    per-sample squared norm (the eager ResidualNorms and ChannelStats share it, _ChannelWork)."""
    # Eight ops (the two-pass formula takes seven and a map-sized temporary): each costs ~5 us
    # of dispatch, as much as a small map's arithmetic, so none is spent that a row does not need
    flat = t.flatten(2)  # [N, C, positions]; a channels-last map's is a view (no copy)
    n = flat.shape[2]
    mean = flat.mean(2, dtype=dtype)
    square = _sum_squares(flat, dtype)  # sum of x^2
    var = square.addcmul(mean, mean, value=-n)  # n * var
    # kept rows have square <= ratio * n var: their variance is >= 0 without a clamp. The
    # largest excess is NaN where a row is NaN or its sum of squares overflowed (inf - inf):
    # then, as where the difference cancels, rows are computed again
    excess = torch.sub(square, var, alpha=ONE_PASS_MAX_RATIO)
    var.div_(n)
    rows = _failed_rows(excess)
    if rows is not None:
        var.index_put_(rows, moments(flat[rows].unsqueeze(0), dtype)[1][0])
    return mean, var, square


def _sum_squares(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each row's sum of squares of [N, C, positions], accumulated in ``dtype``. -> [N, C]

    The norm reads each row once with no temporary; but where the positions are strided (a
    channels-last map: the channels are the contiguous axis) CPU torch's norm kernel reduces
    them ~10x slower than a product and a sum do (0.50 against 0.10 ms on a hot
    64x16x32x32 map, and less exactly: 6e-7 against 1e-7 relative), so there the product's
    temporary is the cheaper pass (docs/performance.md)."""
    if flat.stride(2) == 1 or flat.shape[2] == 1 or not flat.is_cpu:
        return torch.linalg.vector_norm(flat, dim=2, dtype=dtype).square_()
    wide = _as(flat, dtype)
    return torch.mul(wide, wide).sum(2)


def moments(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and population variance of a channel-first [N, C, ...]
    tensor with at least one axis after C, accumulated in ``dtype``: :func:`channel_moments`'s
    formula on an accelerator and for the rows that :func:`sum_moments` cannot keep, compiled as
    it is by ``ChannelStats(fused=True)``.
    -> ([N, C], [N, C])

    Example:
        >>> moments(torch.tensor([[[1.0, 3.0, 1.0, 3.0]]]), torch.float32)
        (tensor([[2.]]), tensor([[1.]]))
    """
    flat = t.flatten(2)  # [N, C, positions]; a channels-last map's is a view (no copy)
    # The corrected two-pass algorithm (Chan, Golub & LeVeque 1983): deviations d from the mean,
    # var = (sum d^2 - (sum d)^2 / n) / n, where the second term removes the rounding error of the
    # mean itself. As exact as var_mean (no E[x^2] - E[x]^2 cancellation; tested against numpy at
    # mean^2/var = 1e12) and on the CPU ~15x faster than its Welford kernel.
    n = flat.shape[2]
    # [N, C] tensors of their own, not views: a grouped call's rows are then plain row runs of
    # them (probe.nonfinite checks a group's rows at once)
    # the mean accumulated in dtype straight from the tensor, and the deviations in dtype by
    # promotion: a bf16 map is read as it is, never copied whole into float32
    mean = flat.mean(2, dtype=dtype)
    d = flat - mean.unsqueeze(2)
    total = d.sum(2)  # in place on the [N, C] results below: fewer calls, the same arithmetic
    var = torch.linalg.vector_norm(d, dim=2).square_().addcmul_(total, total, value=-1 / n)
    return mean, var.div_(n).clamp_min_(0)


def moments_of_two(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`moments` of a block's output and of its F(x) in one call: each call of a compiled
    function costs tens of microseconds of guards and wrappers, as much as a small block's
    arithmetic. -> (mean a, var a, mean b, var b)

    Example:
        >>> t = torch.tensor([[[1.0, 3.0, 1.0, 3.0]]])
        >>> moments_of_two(t, 2 * t, torch.float32)[3]
        tensor([[4.]])
    """
    # Equal shapes, said to the compiler: its sizes are distinct symbols (probe.probes.fused), and
    # two tensors of one shape are reduced in one loop only where it knows they have one shape.
    for i in range(a.ndim):
        torch._check(a.shape[i] == b.shape[i])
    return (*moments(a, dtype), *moments(b, dtype))


def block_statistics(
    x: torch.Tensor, f: torch.Tensor, s: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """ResidualNorms' seven quantities and ChannelStats' moments of y and F of one block in one
    function: compiled, F, S and y are read once for every sum and once more for the deviations
    from the channel means, instead of once per probe and per moment. F, S and y are channel-first
    [N, C, ...] with at least one axis after C and one shape; x is any [N, ...].
    -> (||x||, ||F||, ||S||, ||y||, ||y - S||, cos(y, S), cos(F, S), mean y, var y, mean F, var F)

    Each per-sample sum is taken over positions for each channel, then over channels: the same
    sums as the probes' own formulas, added in another order.

    Example:
        >>> t = torch.ones(1, 1, 4)
        >>> [q.flatten().tolist() for q in block_statistics(t, t, t, 2 * t, torch.float32)]
        [[2.0], [2.0], [2.0], [4.0], [2.0], [1.0], [1.0], [2.0], [0.0], [1.0], [0.0]]
    """
    nx = torch.linalg.vector_norm(x.reshape(x.shape[0], -1).to(dtype), dim=1)
    return (nx, *_joint(f, s, y, dtype))


def identity_block_statistics(
    x: torch.Tensor, f: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """:func:`block_statistics` of a block whose shortcut is the identity (S = x, channel-first
    like F and y): x passed once, since a tensor given twice is a variant of its own to the
    compiler. -> 11 tensors

    Example:
        >>> t = torch.ones(1, 1, 4)
        >>> float(identity_block_statistics(t, t, 2 * t, torch.float32)[0][0])
        2.0
    """
    quantities = _joint(f, x, y, dtype)
    return (quantities[1], *quantities)


def _joint(
    f: torch.Tensor, s: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """The ten quantities of :func:`block_statistics` that F, S and y give."""
    for i in range(f.ndim):  # one shape, said to the compiler (see moments_of_two)
        torch._check(s.shape[i] == f.shape[i])
        torch._check(y.shape[i] == f.shape[i])
    ff, sf, yf = (t.flatten(2) for t in (f, s, y))

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [N, C, P] x2 -> [N]
        return (a.to(dtype) * b.to(dtype)).sum(2).sum(1)

    nf, ns, ny = (dot(t, t).sqrt() for t in (ff, sf, yf))
    # ||y - S|| from the difference itself (no cancellation near the identity), as in eager
    diff = yf.to(dtype) - sf.to(dtype)
    dev = (diff * diff).sum(2).sum(1).sqrt()
    cos_ys = dot(yf, sf) / (ny * ns).clamp_min(1e-12)
    cos_fs = dot(ff, sf) / (nf * ns).clamp_min(1e-12)
    return (nf, ns, ny, dev, cos_ys, cos_fs, *moments(y, dtype), *moments(f, dtype))


# compiled once per process, shared by every probe instance (probe.probes.fused)
_FUSED_RESIDUAL = Fused(residual_quantities)
_FUSED_IDENTITY = Fused(identity_quantities)
_FUSED_MOMENTS = Fused(moments)
_FUSED_MOMENTS_OF_TWO = Fused(moments_of_two)
_FUSED_BLOCK = Fused(block_statistics)
_FUSED_IDENTITY_BLOCK = Fused(identity_block_statistics)


class NormMemo:
    """Per-sample norms of the last few tensors normed, reused when the very same tensor comes
    again unchanged: a block's output is the next block's input (the same object), and one
    gradient reaches the hooks of both, so each would otherwise be normed twice.

    The memo keeps weak references only, so it never keeps a tensor (nor its memory address)
    alive, and an in-place change since (the version counter moved) is a miss.

    Example:
        >>> memo, t = NormMemo(), torch.ones(2, 4)
        >>> memo.norm(t) is memo.norm(t), memo.norm(t.clone()) is memo.norm(t)
        (True, False)
    """

    def __init__(self, size: int = 4) -> None:
        self._entries: deque = deque(maxlen=size)

    def norm(self, t: torch.Tensor) -> torch.Tensor:
        try:
            version = t._version
        except RuntimeError:  # inference-mode tensors have no version counter: no reuse
            return per_sample_norm(t)
        for ref, seen, n in self._entries:
            if ref() is t and seen == version:
                return n
        return self.put(t, per_sample_norm(t))

    def put(self, t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Remember ``n`` as the per-sample norm of ``t`` as it is now (taken by other means: from
        channel sums); returns ``n``."""
        with contextlib.suppress(RuntimeError):  # inference mode: nothing to remember it by
            self._entries.append((weakref.ref(t), t._version, n))
        return n


@dataclass
class ResidualNorms(Probe):
    """Per-sample norms of a block's x, F(x), S(x), y and the identity-closeness quantities.

    For blocks: ``x_norm``, ``f_norm``, ``s_norm``, ``y_norm``, ``dev_norm`` = ||y - S(x)||,
    ``cos_ys`` = cos(y, S(x)) and ``cos_fs`` = cos(F(x), S(x)). For any other layer: ``x_norm`` and
    ``y_norm`` (input and output). Residual magnitude ||F||/||S|| follows Jastrzebski et al.
    (ICLR 2018); d = ||y - S(x)||/||S(x)|| is the identity-closeness of the analyses.

    ``fused=True`` computes a block's seven quantities in one compiled loop over x, F, S and y
    (:mod:`probe.probes.fused`): the same formulas, a fraction of the passes; the first batch pays
    the compilation.
    """

    name: ClassVar[str] = "residual"
    forward_grad: ClassVar[bool] = False
    groupable: ClassVar[bool] = True
    reduces: ClassVar[bool] = True
    fused: bool = False  # one compiled kernel per block (probe.probes.fused; compiles once)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._norms = NormMemo()  # not a setting: kept out of the probe's fields

    def replayable(self) -> bool:
        return True  # reductions of the call's tensors only (probe.replay)

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        b, norm = call.block, self._norms.norm
        if b is None:
            out = {"y_norm": norm(call.output)}
            if _batch_input(call):
                out["x_norm"] = norm(call.input)
            return out
        if self.fused and _compilable(b.y):
            shared = _shared_block(self, call, call, (b.x, b.f, b.s, b.y))
            return shared[0] if shared is not None else _fused_block(b.x, b.f, b.s, b.y)
        shared = _shared_channels(self, call)
        block = shared.block if shared is not None else None
        if shared is None and b.f.shape == b.s.shape == b.y.shape:
            found = _onepass_block(b.f, b.s, b.y, _auto_axis(b.y))
            block = found[0] if found is not None else None
        if block is not None:  # one read of F, S and y (probe.probes.onepass)
            self._norms.put(b.y, block["y_norm"])
            _keep_f_norm(call, block["f_norm"])
            return {"x_norm": block["s_norm"] if b.s is b.x else norm(b.x), **block}
        if shared is None:
            ny, nf = norm(b.y), per_sample_norm(b.f)
        else:  # from ChannelStats' sums: no pass of their own over y and F
            ny, nf = self._norms.put(b.y, shared.y_norm), shared.f_norm
        _keep_f_norm(call, nf)
        # an identity shortcut returns x itself: the memo gives its norm once
        return _block_quantities(b.x, b.f, b.s, b.y, (norm(b.x), nf, norm(b.s), ny))

    def forward_group(self, group: CallGroup) -> list[dict[str, torch.Tensor]]:
        """:meth:`forward` of a group of equally shaped calls, computed on their stacked rows."""
        first = group.calls[0]
        if first.block is None:
            out = {"y_norm": group.rowwise(output_of, per_sample_norm)}
            if _batch_input(first):
                out["x_norm"] = group.rowwise(input_of, per_sample_norm)
            return group.per_call(out)
        x, f, s, y = (group.stacked(get) for get in _PARTS)
        if self.fused and _compilable(y):
            shared = _shared_block(self, group, first, (x, f, s, y))
            return group.per_call(shared[0] if shared is not None else _fused_block(x, f, s, y))
        found = _group_onepass(self, group)
        if found is None and f.shape == s.shape == y.shape:
            found = _onepass_block(f, s, y, _auto_axis(y))
        if found is not None:
            identity = all(c.block.s is c.block.x for c in group.calls)
            nx = found[0]["s_norm"] if identity else group.rowwise(x_of, per_sample_norm)
            return group.per_call({"x_norm": nx, **found[0]})
        norms = tuple(group.rowwise(get, per_sample_norm) for get in _PARTS)
        return group.per_call(_block_quantities(x, f, s, y, norms))


# a block's x, F, S, y (CallGroup stacks each tensor once, whichever probe asks)
_PARTS = (x_of, f_of, s_of, y_of)


def _compilable(t: torch.Tensor) -> bool:
    """Whether the compiled kernels give ``t``'s statistics: not a complex tensor's, whose
    products they take without a conjugate (the eager formulas read it as a real vector)."""
    return not t.is_complex()


def _batch_input(call: Call) -> bool:
    """Whether a layer's input has a row per sample (an input of another size has no x_norm)."""
    return call.input is not None and call.input.shape[0] == call.batch_size


_BLOCK_NAMES = ("x_norm", "f_norm", "s_norm", "y_norm", "dev_norm", "cos_ys", "cos_fs")


def _fused_block(
    x: torch.Tensor, f: torch.Tensor, s: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A block's seven quantities in one compiled kernel (probe.probes.fused)."""
    dtype = accumulation_dtype(x, f, s, y)
    if s is x:
        return dict(zip(_BLOCK_NAMES, _FUSED_IDENTITY(x, f, y, dtype)))
    return dict(zip(_BLOCK_NAMES, _FUSED_RESIDUAL(x, f, s, y, dtype)))


_CHANNEL_NAMES = ("channel_mean", "channel_var", "f_channel_mean", "f_channel_var")
_SHARED = "statistics.block"  # the memo's key of the shared kernel's results


def _shared_block(
    asker: Probe,
    holder: Call | CallGroup,
    call: Call,
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """ResidualNorms' and ChannelStats' results for a block, computed by one compiled kernel
    (:func:`block_statistics`) when ``asker`` is one of a session's pair of fused probes that
    both read ``call``; None when it is not, and each probe computes its own.

    ``holder`` (the call, or the group of calls that ``parts`` stack) keeps the results, so
    whichever of the two asks first computes them and the other takes them. The pair is the
    first fused ResidualNorms and the first fused ChannelStats of the session's probes (exactly
    those classes: a subclass may change what it computes), and the kernel is used only where it
    gives their numbers: F, S and y of one shape with an axis after the channel, y the call's
    output, and one accumulation precision for both.
    """
    return _share(asker, holder, _SHARED, lambda: _block_kernel(_pair(call, True), call, parts))


def _share(
    asker: Probe,
    holder: Call | CallGroup,
    key: str,
    make: Callable[[], tuple[tuple[Probe, ...], object]],
) -> object:
    """The work a pair of probes shares on ``holder``: ``make()`` gives (the pair, their work),
    computed by whichever asks first and kept in ``holder.memo[key]``; the work if ``asker`` is
    one of the pair, else None."""
    found = holder.memo.get(key)
    if found is None:
        found = holder.memo[key] = make()
    pair, work = found
    return work if any(asker is p for p in pair) else None


def _block_kernel(
    pair: tuple[ResidualNorms, ChannelStats] | tuple[()],
    call: Call,
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[tuple[Probe, ...], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None]:
    """(pair, their results) for :func:`_shared_block`; the results are None where the kernel
    would not give the pair's numbers."""
    if not pair:
        return pair, None
    x, f, s, y = parts
    dtype = accumulation_dtype(x, f, s, y)
    shared = None
    if (
        call.output is call.block.y
        and f.ndim > 2
        and f.shape == s.shape == y.shape
        and dtype == accumulation_dtype(y, f)
    ):
        axis = channel_axis(pair[1].layout, y)
        first = [f, s, y] if axis == 1 else [t.movedim(axis, 1) for t in (f, s, y)]  # views
        if s is x:
            quantities = _FUSED_IDENTITY_BLOCK(first[1], first[0], first[2], dtype)
        else:
            quantities = _FUSED_BLOCK(x, *first, dtype)
        shared = (
            dict(zip(_BLOCK_NAMES, quantities[:7])),
            dict(zip(_CHANNEL_NAMES, quantities[7:])),
        )
    return pair, shared


def _pair(call: Call, fused: bool) -> tuple[ResidualNorms, ChannelStats] | tuple[()]:
    """The first ResidualNorms and ChannelStats (exactly those classes: a subclass may change
    what it computes) among ``call.peers`` that read it with ``fused`` as given, if both do
    (else an empty tuple)."""
    residual = channel = None
    for p in call.peers:
        kind = type(p)
        if residual is None and kind is ResidualNorms and p.fused is fused and p.applies_to(call):
            residual = p
        elif channel is None and kind is ChannelStats and p.fused is fused and p.applies_to(call):
            channel = p
    return () if residual is None or channel is None else (residual, channel)


_CHANNEL_WORK = "statistics.channels"  # the memo's key of the eager pair's shared work
_F_NORM = "statistics.f_norm"  # the memo's key of ResidualNorms' ||F|| for GradNorms


def _keep_f_norm(call: Call, norm: torch.Tensor) -> None:
    """Keep ResidualNorms' ||F(x)|| of a block call for GradNorms' cos(F, dL/dx) in the backward
    pass (the same Call): one pass fewer over each F, with the version F has now."""
    with contextlib.suppress(RuntimeError):  # inference mode: no version (and no backward)
        call.memo[_F_NORM] = (call.block.f._version, norm)


def _f_norm(call: Call) -> torch.Tensor:
    """||F(x)|| of a block call: the one its forward pass kept (:func:`_keep_f_norm`) if F has not
    changed in place since, else taken now."""
    kept = call.memo.get(_F_NORM)
    f = call.block.f
    if kept is not None and kept[0] == f._version:
        return kept[1]
    return per_sample_norm(f)


@dataclass(frozen=True)
class _ChannelWork:
    """ChannelStats' results for a block and, from the same sums, the per-sample norms of y and
    F(x) that ResidualNorms would otherwise take in a pass of their own over each map: a
    per-sample squared norm is the sum over channels of each channel's sum of squares. Where the
    one-pass kernels served the block, ``block`` holds all of ResidualNorms' quantities but
    x_norm (probe.probes.onepass)."""

    channel: dict[str, torch.Tensor]
    y_norm: torch.Tensor
    f_norm: torch.Tensor
    block: dict[str, torch.Tensor] | None = None


def _shared_channels(asker: Probe, call: Call) -> _ChannelWork | None:
    """The work a session's eager ResidualNorms and ChannelStats share on a block ``call``, if
    ``asker`` is one of that pair (see :func:`_pair`) and the sums serve: None otherwise, and each
    probe computes its own. Whichever of the two asks first computes it; ``call.memo`` keeps it.

    It serves where ChannelStats takes the one-pass sums (:func:`sum_moments`: real floating
    maps with positions, on the CPU) of the call's output, and is the block's y: the channel
    results are then those ChannelStats computes alone, to the bit, and the norms those of
    :func:`per_sample_norm` up to the order of the additions (tests/probe/test_shared_norms.py).
    """
    return _share(asker, call, _CHANNEL_WORK, lambda: _channel_work(_pair(call, False), call))


def _channel_work(
    pair: tuple[ResidualNorms, ChannelStats] | tuple[()], call: Call
) -> tuple[tuple[Probe, ...], _ChannelWork | None]:
    """(pair, their shared work) for :func:`_shared_channels`; the work is None where the sums
    would not give the pair's numbers."""
    b = call.block
    if not pair or b is None or call.output is not b.y:
        return pair, None
    if not all(t.ndim > 2 and t.is_floating_point() and _guard_is_cheap(t) for t in (b.y, b.f)):
        return pair, None
    try:
        axes = [channel_axis(pair[1].layout, t) for t in (b.y, b.f)]
    except ProbeError:  # a layout ChannelStats refuses: it says so itself, at its own call
        return pair, None
    found = _onepass_block(b.f, b.s, b.y, axes[0]) if axes[0] == axes[1] else None
    if found is not None:
        block, channel = found
        return pair, _ChannelWork(channel, block["y_norm"], block["f_norm"], block)
    sums = [
        _sums(t if axis == 1 else t.movedim(axis, 1), accumulation_dtype(t))
        for t, axis in zip((b.y, b.f), axes)
    ]
    (mean_y, var_y, square_y), (mean_f, var_f, square_f) = sums
    channel = dict(zip(_CHANNEL_NAMES, (mean_y, var_y, mean_f, var_f)))
    return pair, _ChannelWork(channel, square_y.sum(1).sqrt_(), square_f.sum(1).sqrt_())


_ONEPASS_NAMES = ("f_norm", "s_norm", "y_norm", "dev_norm", "cos_ys", "cos_fs")


def _onepass_block(
    f: torch.Tensor, s: torch.Tensor, y: torch.Tensor, axis: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """ResidualNorms' quantities but x_norm, and ChannelStats' of y and F (channel axis
    ``axis``), from one read of F, S and y by the kernels of the tensors' device; None where they
    do not serve (probe.probes.onepass on the CPU, probe.probes.onepass_cuda on a CUDA device)."""
    found = _one_read(y).block_sums(f, s, y, axis)
    if found is None:
        return None
    sample, channel = found
    return dict(zip(_ONEPASS_NAMES, sample)), dict(zip(_CHANNEL_NAMES, channel))


_GROUP_ONEPASS = "statistics.onepass"  # the memo's key of a group's shared kernel results


def _group_onepass(
    asker: Probe, group: CallGroup
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """:func:`_onepass_block` of a group's stacked F, S and y, computed once for the session's
    eager pair (see :func:`_pair`) and shared through the group's memo; None where ``asker`` is
    not one of the pair or the kernels do not serve the group (each probe then computes its own,
    as :func:`_shared_channels` says of a call). The tensors are stacked only for the pair (the
    group stacks each once, whichever probe asks)."""
    first = group.calls[0]

    def make() -> tuple[tuple[Probe, ...], object]:
        pair = _pair(first, False)
        if not pair or first.output is not first.block.y:
            return pair, None
        f, s, y = (group.stacked(get) for get in (f_of, s_of, y_of))
        try:
            axis = channel_axis(pair[1].layout, y)
        except ProbeError:  # a layout ChannelStats refuses: it says so itself
            return pair, None
        return pair, _onepass_block(f, s, y, axis)

    return _share(asker, group, _GROUP_ONEPASS, make)


def _auto_axis(t: torch.Tensor) -> int:
    """The channel axis ChannelStats' default layout reads in ``t`` (1 where it refuses ``t``):
    the axis ResidualNorms alone gives the kernels, so that a default ChannelStats shares it."""
    try:
        return channel_axis("auto", t)
    except ProbeError:
        return 1


def _block_quantities(
    x: torch.Tensor,
    f: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor,
    norms: tuple[torch.Tensor, ...],
) -> dict[str, torch.Tensor]:
    """A block's seven quantities from its tensors and their per-sample norms (x, F, S, y)."""
    nx, nf, ns, ny = norms
    # S in the accumulation dtype once (a no-op for float32 tensors): it takes part in all three
    # quantities, and with it each difference and product below is taken in that dtype, y and F
    # promoted element by element (exactly) instead of each copied whole, a bf16 map's float32
    # copy a pass of its own on a GPU
    s = _as(s, accumulation_dtype(y, f, s))
    if y.dtype == torch.bool:  # torch has no difference of masks: a mask's y is read as 0 / 1
        y = y.to(s.dtype)
    # ||y - S(x)|| from the difference itself: ||y||^2 + ||S||^2 - 2 y.S cancels exactly where
    # it matters, for blocks near the identity (d -> 0). The difference is taken in the
    # accumulation dtype: in bf16 it would be rounded to 3 significant digits.
    dev = per_sample_norm(y - s)
    if _guard_is_cheap(y) and y.shape == s.shape and not (y.is_complex() or s.is_complex()):
        # the other way round, y.S from the three norms, where that does not cancel (guarded)
        ys = polarized_dot(y, s, (ny, ns, dev))
    else:
        ys = per_sample_dot(y, s)
    return {
        "x_norm": nx,
        "f_norm": nf,
        "s_norm": ns,
        "y_norm": ny,
        "dev_norm": dev,
        "cos_ys": _cos(ys, ny, ns),
        "cos_fs": per_sample_cos(f, s, norms=(nf, ns)),
    }


@dataclass
class ChannelStats(Probe):
    """Per-sample, per-channel mean and variance over H x W of the output (and of F(x) for blocks).

    ``layout`` says which axis is the channel: "auto" (default) takes axis 1 of [N, C, H, W] and
    [N, C] and the last axis of [N, T, C] token tensors; give "NHWC" for channels-last maps.

    Merged exactly over the dataset (:class:`probe.stats.Moments`), they give the signal-propagation
    statistics of Brock et al. (ICLR 2021) -- average channel squared mean and average channel
    variance -- and the layer-response std of He et al. (2016, Fig. 7), pooled and per channel.

    ``fused=True`` computes each tensor's moments in one compiled kernel (:mod:`probe.probes.fused`).
    """

    name: ClassVar[str] = "channel"
    forward_grad: ClassVar[bool] = False
    groupable: ClassVar[bool] = True
    reduces: ClassVar[bool] = True
    dims: ClassVar = {
        q: ("sample", "channel")
        for q in ("channel_mean", "channel_var", "f_channel_mean", "f_channel_var")
    }
    layout: str = "auto"  # axes of the output, e.g. NHWC for channels-last (probe.probes.layout)
    fused: bool = False  # one compiled kernel per tensor (probe.probes.fused; compiles once)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layout(self.layout)

    def replayable(self) -> bool:
        return True  # reductions of the call's tensors only (probe.replay)

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        b = call.block
        if b is None:
            return self._moments((call.output,))
        if self.fused and _compilable(b.y):
            shared = _shared_block(self, call, call, (b.x, b.f, b.s, b.y))
            if shared is not None:
                return shared[1]
        work = _shared_channels(self, call)
        if work is not None:
            return work.channel
        return self._moments((call.output, b.f))

    def forward_group(self, group: CallGroup) -> list[dict[str, torch.Tensor]]:
        """:meth:`forward` of a group of equally shaped calls, computed on their stacked rows."""
        first = group.calls[0]
        if first.block is None:
            return group.per_call(self._moments([group.stacked(output_of)]))
        if self.fused and _compilable(first.block.y):
            parts = tuple(group.stacked(get) for get in _PARTS)
            shared = _shared_block(self, group, first, parts)
            if shared is not None:
                return group.per_call(shared[1])
        found = _group_onepass(self, group)
        if found is not None:
            return group.per_call(found[1])
        return group.per_call(self._moments([group.stacked(get) for get in (output_of, f_of)]))

    def _moments(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        names = _CHANNEL_NAMES
        # [N, C] has nothing to fuse; a complex map is refused by channel_moments
        if self.fused and all(t.ndim > 2 and _compilable(t) for t in tensors):
            first = [t.movedim(channel_axis(self.layout, t), 1) for t in tensors]
            fn = _FUSED_MOMENTS if len(tensors) == 1 else _FUSED_MOMENTS_OF_TWO  # one call
            return dict(zip(names, fn(*first, accumulation_dtype(*tensors))))
        return dict(zip(names, [q for t in tensors for q in channel_moments(t, self.layout)]))


@dataclass
class GradNorms(Probe):
    """Per-sample norms of dL/dy per layer and dL/dx per block, with L = sum of per-sample losses.

    In eval mode every sample's loss depends only on that sample, so row n is the gradient of
    sample n's own loss. For blocks whose F(x) has the shape of x it also records ``cos_f_grad`` =
    cos(F(x), dL/dx), the iterative-refinement cosine of Jastrzebski et al. (ICLR 2018, Sec. 3:
    L(x + F(x)) ~ L(x) + F(x)^T dL/dx, so a negative cosine means the block moves its input down
    the loss gradient). The gradient is the one at the block *input* x, as in the paper; in a
    downsampling block F(x) and x differ in shape and the cosine is undefined (not recorded).
    """

    name: ClassVar[str] = "grad"
    forward_grad: ClassVar[bool] = False
    eager_backward: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = True
    groupable: ClassVar[bool] = True
    reduces: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._norms = NormMemo()  # not a setting: kept out of the probe's fields

    def replayable(self) -> bool:
        return True  # reductions of the call's tensors only (probe.replay)

    def backward(self, call: Call) -> dict[str, torch.Tensor]:
        out = {}
        if call.grad_output is not None:
            out["grad_y_norm"] = self._norms.norm(call.grad_output)
        g = call.grad_input
        if g is not None:
            out["grad_x_norm"] = nx = self._norms.norm(g)
            if call.block is not None and call.block.f.shape == g.shape:
                out["cos_f_grad"] = _cos_f_grad(call.block.f, g, _f_norm(call), nx)
        return out

    def backward_group(self, group: CallGroup) -> list[dict[str, torch.Tensor]]:
        """:meth:`backward` of a group of equally shaped calls, computed on their stacked rows."""
        first, out = group.calls[0], {}
        if first.grad_output is not None:
            out["grad_y_norm"] = group.rowwise(grad_output_of, per_sample_norm)
        if first.grad_input is not None:
            # the norms by rows of the stacks: a chain's dL/dy and dL/dx share one
            out["grad_x_norm"] = nx = group.rowwise(grad_input_of, per_sample_norm)
            if first.block is not None and first.block.f.shape == first.grad_input.shape:
                f, g = group.stacked(f_of), group.stacked(grad_input_of)
                nf = group.rowwise(f_of, per_sample_norm)
                out["cos_f_grad"] = _cos_f_grad(f, g, nf, nx)
        return group.per_call(out)


def _cos_f_grad(
    f: torch.Tensor, g: torch.Tensor, nf: torch.Tensor, ng: torch.Tensor
) -> torch.Tensor:
    """cos(F(x), dL/dx) from the two norms: F.dL/dx from one read of the two where the one-pass
    kernels serve them (in float64, on the CPU or a CUDA device), else by their product. The
    norms stay those of :func:`per_sample_norm`, taken per call or per group alike, so that a
    gradient's norm is the same number whichever way its call was computed."""
    found = _one_read(f).dot(f, g)
    if found is None:
        return per_sample_cos(f, g, norms=(nf, ng))
    return _cos(found, nf, ng)
