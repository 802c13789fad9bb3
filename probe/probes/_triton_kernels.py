"""The Triton kernels behind :mod:`probe.probes.onepass_cuda` (imported only where triton is).

The CUDA twins of :mod:`probe.probes._onepass_kernels`: each reads its tensors once and keeps
every sum a statistic needs. A program loads a tile of values, reduces it in float32 (a tree, in
registers) and adds the tile's sums into float64 accumulators, so a row of any length is summed
with ~log2(tile) float32 roundings and one float64 rounding per tile. A channel's variance is
combined tile by tile from each tile's mean and squared deviations, themselves taken in
registers about the tile's own mean (Chan, Golub & LeVeque 1983): one read, no cancellation,
and no guard that would read a result back on the host (which a recorded pass refuses).

Work that spans programs (a sample's sums over all its channels, or over the pieces of a long
row) is written as float64 partial sums, one per program, and added by a finishing kernel in a
fixed order: no atomics, so the numbers do not depend on the order the programs run in.

Tensors are addressed by strides in elements: a map is read as [N, C, P] through (sample,
channel, position) strides, which serve a channel-first map (positions contiguous) and a
channels-last one or [N, T, C] tokens (channels contiguous) with one kernel; the tile's shape
(:func:`probe.probes.onepass_cuda._tile`) puts its long side along the contiguous axis. Each
tensor is loaded in its own dtype (float32, bfloat16 or float16) and widened in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["channels", "finish_block", "products", "finish_rows", "COS_EPS"]

COS_EPS = 1e-12  # the floor of ||a|| ||b|| in a cosine, as probe.probes.statistics


@triton.jit
def _chan(mean, m2, tile_mean, tile_m2, before, count):  # pragma: no cover -- compiled
    """Chan's update of a running (mean, sum of squared deviations) over ``before`` values with a
    tile's over ``count`` more, in float64."""
    total = before + count
    delta = tile_mean - mean
    m2 = m2 + tile_m2.to(tl.float64) + delta * delta * (before * count / total)
    # the weighted mean, not mean + delta * count / total: an infinite mean stays infinite
    return (mean * before + tile_mean * count) / total, m2


@triton.jit
def _tile_moments(v, mask, count):  # pragma: no cover -- compiled
    """Per channel (axis 0) of a [BLOCK_C, BLOCK_P] tile: the mean of its ``count`` valid
    positions (float64) and the sum of squared deviations about it, by the corrected two-pass
    formula: the deviations from the float32 mean, less their own sum's square over ``count``,
    which removes what the mean's rounding adds (Chan, Golub & LeVeque 1983); the mean is then
    corrected by that sum too."""
    rough = tl.sum(v, 1) / count
    d = tl.where(mask, v - rough[:, None], 0.0)
    drift = tl.sum(d, 1)
    m2 = tl.sum(d * d, 1) - drift * drift / count
    rough = rough.to(tl.float64)
    # a NaN drift comes of a NaN or an infinity in the tile, whose mean is the rough one's
    mean = tl.where(drift == drift, rough + drift.to(tl.float64) / count, rough)
    # a rounded-negative m2 is 0; a NaN stays (tl.maximum need not propagate one)
    return mean, tl.where(m2 < 0.0, 0.0, m2)


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
    stride_c,
    stride_p,
    BLOCK: tl.constexpr,
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
    row = n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c  # [BLOCK_C, 1]
    zero = tl.zeros([BLOCK_C], dtype=tl.float64)
    y_mean, y_m2, f_mean, f_m2 = zero, zero, zero, zero
    ff, ss, yy, dd, ys, fs = zero, zero, zero, zero, zero, zero
    for start in range(0, n_positions, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = live[:, None] & (p < n_positions)[None, :]
        at = row + p.to(tl.int64)[None, :] * stride_p
        count = tl.cast(tl.minimum(n_positions - start, BLOCK_P), tl.float64)
        before = tl.cast(start, tl.float64)  # a loop counter: an int where interpreted
        yv = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
        t_mean, t_m2 = _tile_moments(yv, mask, count.to(tl.float32))
        y_mean, y_m2 = _chan(y_mean, y_m2, t_mean, t_m2, before, count)
        if BLOCK:
            fv = tl.load(f_ptr + at, mask=mask, other=0.0).to(tl.float32)
            sv = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
            t_mean, t_m2 = _tile_moments(fv, mask, count.to(tl.float32))
            f_mean, f_m2 = _chan(f_mean, f_m2, t_mean, t_m2, before, count)
            dv = yv - sv  # exact for bf16/fp16 values, rounded once for float32 ones
            ff += tl.sum(fv * fv, 1).to(tl.float64)
            ss += tl.sum(sv * sv, 1).to(tl.float64)
            yy += tl.sum(yv * yv, 1).to(tl.float64)
            dd += tl.sum(dv * dv, 1).to(tl.float64)
            ys += tl.sum(yv * sv, 1).to(tl.float64)
            fs += tl.sum(fv * sv, 1).to(tl.float64)
    out = n.to(tl.int64) * n_channels + c
    plane = tl.cast(n_samples, tl.int64) * n_channels
    tl.store(moments_ptr + out, y_mean.to(tl.float32), mask=live)
    tl.store(moments_ptr + plane + out, (y_m2 / n_positions).to(tl.float32), mask=live)
    if BLOCK:
        tl.store(moments_ptr + 2 * plane + out, f_mean.to(tl.float32), mask=live)
        tl.store(moments_ptr + 3 * plane + out, (f_m2 / n_positions).to(tl.float32), mask=live)
        # masked channels added zeros: every sum over the run is the live channels' sum
        at = (n.to(tl.int64) * tl.num_programs(1) + run) * 6
        tl.store(partial_ptr + at, tl.sum(ff, 0))
        tl.store(partial_ptr + at + 1, tl.sum(ss, 0))
        tl.store(partial_ptr + at + 2, tl.sum(yy, 0))
        tl.store(partial_ptr + at + 3, tl.sum(dd, 0))
        tl.store(partial_ptr + at + 4, tl.sum(ys, 0))
        tl.store(partial_ptr + at + 5, tl.sum(fs, 0))


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
        a = tl.load(a_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
        b = a if SAME else tl.load(b_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
        total += (a * b).to(tl.float64)
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
