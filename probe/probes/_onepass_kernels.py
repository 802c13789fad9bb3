"""The numba kernels behind :mod:`probe.probes.onepass` (imported only when numba is present).

Each kernel reads its tensors once, element by element, and keeps every sum a statistic needs in
float64 accumulators: a row's sum and sum of squares for the channel moments, and for a block
the sums of squares of F, S, y and y - S and the products y.S and F.S. Two memory layouts are
served, both as numpy views of the tensors (no copy): "rows", a channel-first map [N, C, P] whose
positions are contiguous, and "columns", [N, P, C], a channels-last map or a [N, T, C] token
tensor. A variance whose one-pass formula would cancel is taken again by the two-pass formula on
that row only (see :func:`_variance`).

The kernels are serial and release the GIL: each takes a span ``[lo, hi)`` of its work items
(rows, samples or pieces of a row) and writes only what those items own, so
:mod:`probe.probes.onepass` can hand the spans of a large call to threads of its own. A
kernel whose items leave per-sample partial sums has a ``*_samples`` step that adds them once
every span is done. numba's parallel threading layers are not used: the one found first on Linux
is GNU OpenMP, which binds to torch's OpenMP runtime and resets its thread count when it starts.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "block_rows",
    "block_samples",
    "block_columns",
    "moments_rows",
    "moments_columns",
    "products",
    "products_samples",
]

# Reassociation lets LLVM vectorise the sums (several partial sums per row, added at the end);
# NaN and inf keep their IEEE meaning (no "nnan"/"ninf"), so a NaN row gives NaN statistics and
# fails the variance guard, as the torch formulas do.
_FLAGS = {"reassoc", "contract", "nsz", "arcp"}
_COS_EPS = 1e-12  # the floor of ||a|| ||b|| in a cosine, as probe.probes.statistics


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _variance(row, s1, s2, limit):  # pragma: no cover -- compiled
    """Population variance of a 1-D ``row`` from its sum ``s1`` and sum of squares ``s2``: kept
    where ``s2 / (n var) <= limit`` (no cancellation past what the caller allows), else by the
    corrected two-pass formula over the row (Chan, Golub & LeVeque 1983), in float64."""
    n = row.shape[0]
    m2 = s2 - s1 * s1 / n  # n var
    if m2 * limit >= s2:  # False for NaN, and for inf - inf
        return m2 / n
    mean = s1 / n
    d1 = 0.0
    d2 = 0.0
    for k in range(n):
        d = np.float64(row[k]) - mean
        d1 += d
        d2 += d * d
    v = (d2 - d1 * d1 / n) / n
    return v if not v < 0.0 else 0.0  # NaN stays NaN


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _write_sample(out, i, ff, ss, yy, dd, ys, fs):  # pragma: no cover -- compiled
    """Sample ``i``'s six block quantities from its sums into ``out[:, i]``: ||F||, ||S||, ||y||,
    ||y - S||, cos(y, S), cos(F, S)."""
    nf = np.sqrt(ff)
    ns = np.sqrt(ss)
    ny = np.sqrt(yy)
    out[0, i] = nf
    out[1, i] = ns
    out[2, i] = ny
    out[3, i] = np.sqrt(dd)
    out[4, i] = ys / max(ny * ns, _COS_EPS)
    out[5, i] = fs / max(nf * ns, _COS_EPS)


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def block_rows(y, f, s, limit, moments, part, lo, hi):  # pragma: no cover -- compiled
    """Rows ``lo`` to ``hi`` (a row: sample r // C, channel r % C) of a block's statistics from
    y, F, S as [N, C, P] (positions contiguous): ``moments`` [4, N, C] gets mean and variance of
    y, then of F; ``part`` [6, N C] the row's sums that :func:`block_samples` adds per sample."""
    c, p = y.shape[1], y.shape[2]
    for r in range(lo, hi):
        i = r // c
        j = r - i * c
        yr = y[i, j]  # 1-D slices vectorise more often than 3-D indexing (see dot)
        fr = f[i, j]
        sr = s[i, j]
        sy = 0.0
        yy = 0.0
        sf = 0.0
        ff = 0.0
        ss = 0.0
        dd = 0.0
        ys = 0.0
        fs = 0.0
        for k in range(p):
            a = np.float64(yr[k])
            b = np.float64(fr[k])
            t = np.float64(sr[k])
            sy += a
            yy += a * a
            sf += b
            ff += b * b
            ss += t * t
            d = a - t
            dd += d * d
            ys += a * t
            fs += b * t
        moments[0, i, j] = sy / p
        moments[1, i, j] = _variance(yr, sy, yy, limit)
        moments[2, i, j] = sf / p
        moments[3, i, j] = _variance(fr, sf, ff, limit)
        part[0, r] = ff
        part[1, r] = ss
        part[2, r] = yy
        part[3, r] = dd
        part[4, r] = ys
        part[5, r] = fs


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def block_samples(part, sample):  # pragma: no cover -- compiled
    """The six per-sample quantities of :func:`_write_sample` into ``sample`` [6, N] from
    :func:`block_rows`' sums ``part`` [6, N C] (ff, ss, yy, dd, ys, fs of each row) once all of
    its rows are done. A sample's rows lie side by side: each sum is one slice's."""
    n = sample.shape[1]
    c = part.shape[1] // n
    for i in range(n):
        lo = i * c
        hi = lo + c
        _write_sample(
            sample, i, part[0, lo:hi].sum(), part[1, lo:hi].sum(), part[2, lo:hi].sum(),
            part[3, lo:hi].sum(), part[4, lo:hi].sum(), part[5, lo:hi].sum(),
        )  # fmt: skip


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def block_columns(y, f, s, limit, moments, sample, lo, hi):  # pragma: no cover -- compiled
    """Samples ``lo`` to ``hi`` of :func:`block_rows` and :func:`block_samples` for y, F, S as
    [N, P, C] (channels contiguous): a sample is one item, its quantities written at once. The
    sums only a sample needs (S.S, (y - S)^2, y.S, F.S) are scalars, the four per channel arrays:
    eight arrays updated per position were 2-4 x slower on narrow maps (C = 16)."""
    p, c = y.shape[1], y.shape[2]
    for i in range(lo, hi):
        sy = np.zeros(c)
        yy = np.zeros(c)
        sf = np.zeros(c)
        ff = np.zeros(c)
        ss = 0.0
        dd = 0.0
        ys = 0.0
        fs = 0.0
        for k in range(p):
            yr = y[i, k]
            fr = f[i, k]
            sr = s[i, k]
            for j in range(c):
                a = np.float64(yr[j])
                b = np.float64(fr[j])
                t = np.float64(sr[j])
                sy[j] += a
                yy[j] += a * a
                sf[j] += b
                ff[j] += b * b
                ss += t * t
                d = a - t
                dd += d * d
                ys += a * t
                fs += b * t
        total_yy = 0.0
        total_ff = 0.0
        for j in range(c):
            moments[0, i, j] = sy[j] / p
            moments[1, i, j] = _variance(y[i, :, j], sy[j], yy[j], limit)
            moments[2, i, j] = sf[j] / p
            moments[3, i, j] = _variance(f[i, :, j], sf[j], ff[j], limit)
            total_yy += yy[j]
            total_ff += ff[j]
        _write_sample(sample, i, total_ff, ss, total_yy, dd, ys, fs)


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def moments_rows(t, limit, moments, lo, hi):  # pragma: no cover -- compiled
    """Mean and variance of rows ``lo`` to ``hi`` of ``t`` [N, C, P] (a row: sample r // C,
    channel r % C) into ``moments`` [2, N, C]."""
    c, p = t.shape[1], t.shape[2]
    for r in range(lo, hi):
        i = r // c
        j = r - i * c
        row = t[i, j]
        s1 = 0.0
        s2 = 0.0
        for k in range(p):
            a = np.float64(row[k])
            s1 += a
            s2 += a * a
        moments[0, i, j] = s1 / p
        moments[1, i, j] = _variance(row, s1, s2, limit)


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def moments_columns(t, limit, moments, lo, hi):  # pragma: no cover -- compiled
    """:func:`moments_rows` of samples ``lo`` to ``hi`` of ``t`` as [N, P, C] (channels
    contiguous)."""
    p, c = t.shape[1], t.shape[2]
    for i in range(lo, hi):
        s1 = np.zeros(c)
        s2 = np.zeros(c)
        for k in range(p):
            for j in range(c):
                a = np.float64(t[i, k, j])
                s1[j] += a
                s2[j] += a * a
        for j in range(c):
            moments[0, i, j] = s1[j] / p
            moments[1, i, j] = _variance(t[i, :, j], s1[j], s2[j], limit)


PIECE = 16384  # values per piece of a row in products: a batch of one still splits


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def products(a, b, part, lo, hi):  # pragma: no cover -- compiled
    """Pieces ``lo`` to ``hi`` of the per-sample sum of a * b of ``a``, ``b`` [N, M] (each row in
    one order of memory, the same for both), in float64: piece r is PIECE values of sample
    r // pieces, its sum put in ``part`` [N pieces] for :func:`products_samples`. The pieces lie
    where they lie whatever the span, so a sum is the same number however a call is split."""
    m = a.shape[1]
    pieces = part.shape[0] // a.shape[0]
    for r in range(lo, hi):
        i = r // pieces
        k0 = (r - i * pieces) * PIECE
        k1 = min(k0 + PIECE, m)
        # 1-D slices: LLVM vectorises this loop, not one over a 2-D array's bounded range (6 x)
        ar = a[i, k0:k1]
        br = b[i, k0:k1]
        ab = 0.0
        for k in range(ar.shape[0]):
            ab += np.float64(ar[k]) * np.float64(br[k])
        part[r] = ab


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def products_samples(part, root, out):  # pragma: no cover -- compiled
    """Each sample's sum of :func:`products`' pieces ``part``, its square root where ``root`` (a
    norm: ``b`` was ``a``), into ``out`` [N], rounded once."""
    n = out.shape[0]
    pieces = part.shape[0] // n
    for i in range(n):
        ab = 0.0
        for r in range(i * pieces, (i + 1) * pieces):
            ab += part[r]
        out[i] = np.sqrt(ab) if root else ab
