"""The Triton kernels behind :mod:`probe.probes.onepass_cuda` (imported only where triton is).

The CUDA twins of :mod:`probe.probes._onepass_kernels`: each reads its tensors once and keeps
every sum a statistic needs. The per-sample sums (squares, y - S, products) are taken as the CPU
kernels take them: each value widened to float64 before it is multiplied (every product exact),
summed in float64, rounded once, so a norm is the same number whichever kernel took it. A
channel's moments are taken per tile in float32 (a tree in registers: a tile's mean and squared
deviations about it, corrected two-pass) and combined tile by tile in float64 (Chan, Golub &
LeVeque 1983): one read, no cancellation, and no guard that would read a result back on the host
(which a recorded pass refuses).

Work that spans programs (a sample's sums over all its channels, or over the pieces of a long
row) is written as float64 partial sums, one per program, and added by a finishing kernel in a
fixed order: no atomics, so the numbers do not depend on the order the programs run in.

A map is read as [N, C, P] with positions contiguous (a channel-first map) or as [N, P, C] with
channels contiguous (a channels-last map, [N, T, C] tokens): which is a constant of the kernel
(``COLUMNS``), so that the compiler knows the contiguous axis and loads 16 bytes at a time along
it; only the sample stride is given at run time. The tile's shape
(:func:`probe.probes.onepass_cuda._tile`) puts its long side along the contiguous axis. Each
tensor is loaded in its own dtype (float32, bfloat16 or float16) and widened in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["channels", "finish_block", "products", "finish_rows", "COS_EPS"]

# the floor of ||a|| ||b|| in a cosine, as probe.probes.statistics (a constexpr: a kernel reads
# no other global)
COS_EPS = tl.constexpr(1e-12)


@triton.jit
def _chan(mean, m2, tile_mean, tile_m2, before, count):  # pragma: no cover -- compiled
    """Chan's update of a running (mean, sum of squared deviations) over ``before`` values with a
    tile's over ``count`` more, in float64. The weights are scalars, shared by the channels: one
    division per tile, not one per channel."""
    inv = 1.0 / (before + count)
    delta = tile_mean - mean
    m2 = m2 + tile_m2.to(tl.float64) + delta * delta * (before * count * inv)
    # mean + delta count / total keeps a constant row's mean exact (its variance stays 0); where
    # delta is not finite the weighted mean, so that an infinite mean stays infinite
    step = mean + delta * (count * inv)
    weighted = mean * (before * inv) + tile_mean * (count * inv)
    return tl.where(tl.abs(delta) < float("inf"), step, weighted), m2


@triton.jit
def _tile_moments(v, mask, count, AXIS: tl.constexpr):  # pragma: no cover -- compiled
    """Per channel of a tile whose positions run along ``AXIS``: the mean of its ``count`` valid
    positions (float64) and the sum of squared deviations about it, by the corrected two-pass
    formula: the deviations from the float32 mean, less their own sum's square over ``count``,
    which removes what the mean's rounding adds (Chan, Golub & LeVeque 1983); the mean is then
    corrected by that sum too. ``count`` is float64."""
    inv = 1.0 / count
    rough = tl.sum(v, AXIS) * inv.to(tl.float32)
    d = tl.where(mask, v - tl.expand_dims(rough, AXIS), 0.0)
    drift = tl.sum(d, AXIS)
    m2 = tl.sum(d * d, AXIS) - drift * drift * inv.to(tl.float32)
    rough = rough.to(tl.float64)
    # a NaN drift comes of a NaN or an infinity in the tile, whose mean is the rough one's
    mean = tl.where(drift == drift, rough + drift.to(tl.float64) * inv, rough)
    # a rounded-negative m2 is 0; a NaN stays (tl.maximum need not propagate one)
    return mean, tl.where(m2 < 0.0, 0.0, m2)


@triton.jit
def _total(v):  # pragma: no cover -- compiled
    """The float64 sum of a tile of float64 values (masked positions were loaded as 0)."""
    return tl.sum(tl.sum(v, 1), 0)


@triton.jit
def channels(
    y_ptr,
    f_ptr,
    s_ptr,
    moments_ptr,
    partial_ptr,
    n_samples,
    n_channels,
    n_positions,
    stride_n,
    BLOCK: tl.constexpr,
    COLUMNS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # pragma: no cover -- compiled
    """One program per (sample, run of BLOCK_C channels): the channels' mean and population
    variance of y (and of F where BLOCK), written to ``moments`` [2 or 4, N, C] float32; where
    BLOCK, also the program's float64 sums of F^2, S^2, y^2, (y - S)^2, y.S and F.S, written to
    ``partial`` [N, programs per sample, 6] for :func:`finish_block`."""
    n = tl.program_id(0)
    run = tl.program_id(1)
    c = run * BLOCK_C + tl.arange(0, BLOCK_C)
    live = c < n_channels
    # the sample's first value; within a sample, 32-bit offsets. The contiguous axis is named by
    # a constant, so that the compiler sees it and loads several neighbours per instruction
    y_ptr += n.to(tl.int64) * stride_n
    f_ptr += n.to(tl.int64) * stride_n
    s_ptr += n.to(tl.int64) * stride_n
    zero = tl.zeros([BLOCK_C], dtype=tl.float64)
    y_mean, y_m2, f_mean, f_m2 = zero, zero, zero, zero
    # the per-sample sums as scalars: [BLOCK_C] vectors of them, held by every thread of a
    # channel's slice, spilled registers at BLOCK_C >= 16
    nil = tl.full([], 0.0, dtype=tl.float64)
    ff, ss, yy, dd, ys, fs = nil, nil, nil, nil, nil, nil
    for start in range(0, n_positions, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        # a tile [BLOCK_P, BLOCK_C] of channels contiguous ([N, P, C]), or [BLOCK_C, BLOCK_P] of
        # positions contiguous ([N, C, P]): the contiguous axis last, as the compiler lays out
        # threads along it (a transposed tile took twice the registers)
        if COLUMNS:
            mask = (p < n_positions)[:, None] & live[None, :]
            at = p[:, None] * n_channels + c[None, :]
        else:
            mask = live[:, None] & (p < n_positions)[None, :]
            at = c[:, None] * n_positions + p[None, :]
        count = tl.cast(tl.minimum(n_positions - start, BLOCK_P), tl.float64)
        before = tl.cast(start, tl.float64)  # a loop counter: an int where interpreted
        yv = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
        t_mean, t_m2 = _tile_moments(yv, mask, count, 0 if COLUMNS else 1)
        y_mean, y_m2 = _chan(y_mean, y_m2, t_mean, t_m2, before, count)
        if BLOCK:
            fv = tl.load(f_ptr + at, mask=mask, other=0.0).to(tl.float32)
            sv = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
            t_mean, t_m2 = _tile_moments(fv, mask, count, 0 if COLUMNS else 1)
            f_mean, f_m2 = _chan(f_mean, f_m2, t_mean, t_m2, before, count)
            # widened before they are multiplied: every product and y - S exact, as on the CPU
            f64, s64, y64 = fv.to(tl.float64), sv.to(tl.float64), yv.to(tl.float64)
            d64 = y64 - s64
            ff += _total(f64 * f64)
            ss += _total(s64 * s64)
            yy += _total(y64 * y64)
            dd += _total(d64 * d64)
            ys += _total(y64 * s64)
            fs += _total(f64 * s64)
    out = n.to(tl.int64) * n_channels + c
    plane = tl.cast(n_samples, tl.int64) * n_channels
    tl.store(moments_ptr + out, y_mean.to(tl.float32), mask=live)
    tl.store(moments_ptr + plane + out, (y_m2 / n_positions).to(tl.float32), mask=live)
    if BLOCK:
        tl.store(moments_ptr + 2 * plane + out, f_mean.to(tl.float32), mask=live)
        tl.store(moments_ptr + 3 * plane + out, (f_m2 / n_positions).to(tl.float32), mask=live)
        at = (n.to(tl.int64) * tl.num_programs(1) + run) * 6
        tl.store(partial_ptr + at, ff)
        tl.store(partial_ptr + at + 1, ss)
        tl.store(partial_ptr + at + 2, yy)
        tl.store(partial_ptr + at + 3, dd)
        tl.store(partial_ptr + at + 4, ys)
        tl.store(partial_ptr + at + 5, fs)


@triton.jit
def _added(partial_ptr, n, n_parts, width, column, BLOCK_R: tl.constexpr):  # pragma: no cover
    """Sample ``n``'s float64 partial sums in ``column`` of [N, n_parts, width], added in order."""
    total = tl.zeros([BLOCK_R], dtype=tl.float64)
    base = n.to(tl.int64) * n_parts * width + column
    for start in range(0, n_parts, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        total += tl.load(partial_ptr + base + r.to(tl.int64) * width, mask=r < n_parts, other=0.0)
    return tl.sum(total, 0)


@triton.jit
def _floored(v):  # pragma: no cover -- compiled
    """max(v, COS_EPS), NaN kept (tl.maximum need not propagate one)."""
    return tl.where(v < COS_EPS, COS_EPS, v)


@triton.jit
def finish_block(
    partial_ptr, out_ptr, n_samples, n_parts, BLOCK_R: tl.constexpr
):  # pragma: no cover
    """One program per sample: its six quantities ||F||, ||S||, ||y||, ||y - S||, cos(y, S),
    cos(F, S) from the partial sums of :func:`channels`, into ``out`` [6, N] float32."""
    n = tl.program_id(0)
    ff = _added(partial_ptr, n, n_parts, 6, 0, BLOCK_R)
    ss = _added(partial_ptr, n, n_parts, 6, 1, BLOCK_R)
    yy = _added(partial_ptr, n, n_parts, 6, 2, BLOCK_R)
    dd = _added(partial_ptr, n, n_parts, 6, 3, BLOCK_R)
    ys = _added(partial_ptr, n, n_parts, 6, 4, BLOCK_R)
    fs = _added(partial_ptr, n, n_parts, 6, 5, BLOCK_R)
    nf = tl.sqrt(ff)
    ns = tl.sqrt(ss)
    ny = tl.sqrt(yy)
    cos_ys = ys / _floored(ny * ns)
    cos_fs = fs / _floored(nf * ns)
    tl.store(out_ptr + n, nf.to(tl.float32))
    tl.store(out_ptr + n_samples + n, ns.to(tl.float32))
    tl.store(out_ptr + 2 * n_samples + n, ny.to(tl.float32))
    tl.store(out_ptr + 3 * n_samples + n, tl.sqrt(dd).to(tl.float32))
    tl.store(out_ptr + 4 * n_samples + n, cos_ys.to(tl.float32))
    tl.store(out_ptr + 5 * n_samples + n, cos_fs.to(tl.float32))


@triton.jit
def products(
    a_ptr,
    b_ptr,
    partial_ptr,
    n_values,
    stride_n,
    piece,
    SAME: tl.constexpr,
    BLOCK: tl.constexpr,
):  # pragma: no cover -- compiled
    """One program per (sample, piece of ``piece`` values): the float64 sum of a * b over the
    piece of the sample's ``n_values`` contiguous values (a * a where SAME), written to
    ``partial`` [N, pieces] for :func:`finish_rows`."""
    n = tl.program_id(0)
    k = tl.program_id(1)
    row = n.to(tl.int64) * stride_n
    first = k.to(tl.int64) * piece
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, piece, BLOCK):
        i = first + start + tl.arange(0, BLOCK)
        mask = i < n_values  # a piece is whole vectors (probe.probes.onepass_cuda)
        # widened before they are multiplied: each product exact (float32's 24 bits twice fit
        # float64's 53), the sum float64's, as the map kernel's per-sample sums are
        a = tl.load(a_ptr + row + i, mask=mask, other=0.0).to(tl.float64)
        b = a if SAME else tl.load(b_ptr + row + i, mask=mask, other=0.0).to(tl.float64)
        total += a * b
    tl.store(partial_ptr + n.to(tl.int64) * tl.num_programs(1) + k, tl.sum(total, 0))


@triton.jit
def finish_rows(
    partial_ptr, out_ptr, n_parts, ROOT: tl.constexpr, BLOCK_R: tl.constexpr
):  # pragma: no cover
    """One program per sample: the sum of its partials from :func:`products` (its square root
    where ROOT), into ``out`` [N] float32."""
    n = tl.program_id(0)
    total = _added(partial_ptr, n, n_parts, 1, 0, BLOCK_R)
    if ROOT:
        total = tl.sqrt(total)
    tl.store(out_ptr + n, total.to(tl.float32))
