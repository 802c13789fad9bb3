"""The numba kernels behind :mod:`probe.probes.onepass` (imported only when numba is present).

Each kernel reads its tensors once, element by element, and keeps every sum a statistic needs in
float64 accumulators: a row's sum and sum of squares for the channel moments, and for a block
the sums of squares of F, S, y and y - S and the products y.S and F.S. Two memory layouts are
served, both as views of the tensors' memory (no copy): "rows", a channel-first map [N, C, P] whose
positions are contiguous, and "columns", [N, P, C], a channels-last map or a [N, T, C] token
tensor. A variance whose one-pass formula would cancel is taken again by the two-pass formula on
that row only (see :func:`_variance`).

The kernels are serial and release the GIL: each takes a span ``[lo, hi)`` of its work items
(rows, samples or pieces of a row) and writes only what those items own. A kernel whose items
leave per-sample partial sums has a ``*_samples`` step that adds them once every span is done.
:mod:`probe.probes.onepass` calls them through :func:`entry` (below), C functions that take a
call's chunks on whichever threads enter them: the calling thread, resprobe's pool, or torch's
own OpenMP team. numba's parallel threading layers are not used: the one found first on Linux is
GNU OpenMP, which binds to torch's OpenMP runtime and resets its thread count when it starts.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core.ccallback import CFunc
from numba.extending import intrinsic

__all__ = [
    "block_rows",
    "block_samples",
    "block_columns",
    "moments_rows",
    "moments_columns",
    "products",
    "products_samples",
    "entry",
    "WORDS",
    "ARRAYS",
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


# -- entries: a call described by one array of words, on any threads ----------------------------
# probe.probes.onepass calls a kernel through an entry, a C function ``void entry(void *data)``
# (a numba cfunc): directly on the calling thread, on resprobe's pool, or on torch's own OpenMP
# team through GOMP_parallel(entry, data, threads, 0). ``data`` points at one int64 array, the
# call's descriptor (WORDS words):
#   0      the next chunk to take (each thread takes chunks by an atomic add on it)
#   1      the number of chunks: chunk k is items [items k / chunks, items (k + 1) / chunks)
#   2      the number of work items (rows, samples or pieces of a row: the kernel's lo, hi)
#   3-5    the inputs' shape: [N, C, P], [N, P, C], or [N, M, pieces of a row]
#   6      the variance limit (a float64's bits), or for products 1 where the sum is rooted
#   7      the chunks done (an atomic add after each: the thread that does the last one finishes
#          the call, e.g. block_samples, once every other chunk's writes are seen; the caller
#          checks after the call that it equals word 1, so a chunk that failed is never taken
#          for one done)
#   8-13   the addresses of the kernel's arrays, in the order of its arguments
# Every thread that enters takes chunks until none is left, so a thread that starts late takes
# fewer and the calling thread never waits for work nobody has begun; each item is written by
# the one thread that took it, so the numbers are those of one serial call, bit for bit. The
# Python around a call is a descriptor and one foreign call, where a numba dispatcher would check
# the type of each of eight arguments (in a model's pass, with Python's caches cold, the wrapper
# around a kernel had cost more than the kernel; docs/performance.md).

WORDS = 14  # the descriptor's length
ARRAYS = 8  # the word of the first array's address


@intrinsic
def _words(typingctx, data):  # pragma: no cover -- compiled
    """``data`` (a void pointer) as a pointer to int64 words."""
    sig = types.CPointer(types.int64)(data)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _pointer(typingctx, address, zero):  # pragma: no cover -- compiled
    """The int64 ``address`` as a pointer to values of ``zero``'s type."""
    sig = types.CPointer(zero)(address, zero)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _add_one(typingctx, words, index):  # pragma: no cover -- compiled
    """``words[index]``'s value before adding one to it, atomically, with acquire-release order:
    the writes a thread made before its add are seen by the thread whose add comes later."""
    sig = types.int64(words, index)

    def codegen(context, builder, signature, args):
        first = context.make_array(signature.args[0])(context, builder, args[0]).data
        word = builder.gep(first, [args[1]])
        one = ir.Constant(ir.IntType(64), 1)
        return builder.atomic_rmw("add", word, one, "acq_rel")

    return sig, codegen


_ENTRY_OPTIONS = {"nogil": True, "cache": True, "error_model": "numpy"}


@njit(**_ENTRY_OPTIONS)
def _descriptor(data):  # pragma: no cover -- compiled
    """The call's descriptor, and word 6 read as a float64 (the variance limit)."""
    words = carray(_words(data), (WORDS,))
    return words, words[6:7].view(np.float64)[0]


@njit(**_ENTRY_OPTIONS)
def _chunk(words):  # pragma: no cover -- compiled
    """The next chunk's span ``(lo, hi)`` of items, or ``(0, 0)`` where none is left."""
    k = _add_one(words, 0)
    chunks, items = words[1], words[2]
    if k >= chunks:
        return 0, 0
    return items * k // chunks, items * (k + 1) // chunks


@njit(**_ENTRY_OPTIONS)
def _last(words):  # pragma: no cover -- compiled
    """Whether the chunk this thread has just done was the call's last to be done."""
    return _add_one(words, 7) == words[1] - 1


@njit(**_ENTRY_OPTIONS)
def _block_rows_entry(data, zero):  # pragma: no cover -- compiled
    words, limit = _descriptor(data)
    n, c, p = words[3], words[4], words[5]
    y = carray(_pointer(words[8], zero), (n, c, p))
    f = carray(_pointer(words[9], zero), (n, c, p))
    s = carray(_pointer(words[10], zero), (n, c, p))
    moments = carray(_pointer(words[11], zero), (4, n, c))
    part = carray(_pointer(words[12], np.float64(0)), (6, n * c))
    sample = carray(_pointer(words[13], zero), (6, n))
    lo, hi = _chunk(words)
    while hi > lo:
        block_rows(y, f, s, limit, moments, part, lo, hi)
        if _last(words):
            block_samples(part, sample)
        lo, hi = _chunk(words)


@njit(**_ENTRY_OPTIONS)
def _block_columns_entry(data, zero):  # pragma: no cover -- compiled
    words, limit = _descriptor(data)
    n, p, c = words[3], words[4], words[5]
    y = carray(_pointer(words[8], zero), (n, p, c))
    f = carray(_pointer(words[9], zero), (n, p, c))
    s = carray(_pointer(words[10], zero), (n, p, c))
    moments = carray(_pointer(words[11], zero), (4, n, c))
    sample = carray(_pointer(words[12], zero), (6, n))
    lo, hi = _chunk(words)
    while hi > lo:
        block_columns(y, f, s, limit, moments, sample, lo, hi)
        _last(words)  # counted: the caller checks that every chunk was done
        lo, hi = _chunk(words)


@njit(**_ENTRY_OPTIONS)
def _moments_rows_entry(data, zero):  # pragma: no cover -- compiled
    words, limit = _descriptor(data)
    n, c, p = words[3], words[4], words[5]
    t = carray(_pointer(words[8], zero), (n, c, p))
    moments = carray(_pointer(words[9], zero), (2, n, c))
    lo, hi = _chunk(words)
    while hi > lo:
        moments_rows(t, limit, moments, lo, hi)
        _last(words)  # counted: the caller checks that every chunk was done
        lo, hi = _chunk(words)


@njit(**_ENTRY_OPTIONS)
def _moments_columns_entry(data, zero):  # pragma: no cover -- compiled
    words, limit = _descriptor(data)
    n, p, c = words[3], words[4], words[5]
    t = carray(_pointer(words[8], zero), (n, p, c))
    moments = carray(_pointer(words[9], zero), (2, n, c))
    lo, hi = _chunk(words)
    while hi > lo:
        moments_columns(t, limit, moments, lo, hi)
        _last(words)  # counted: the caller checks that every chunk was done
        lo, hi = _chunk(words)


@njit(**_ENTRY_OPTIONS)
def _products_entry(data, zero):  # pragma: no cover -- compiled
    words = carray(_words(data), (WORDS,))
    n, m, pieces = words[3], words[4], words[5]
    a = carray(_pointer(words[8], zero), (n, m))
    b = carray(_pointer(words[9], zero), (n, m))
    part = carray(_pointer(words[10], np.float64(0)), (n * pieces,))
    out = carray(_pointer(words[11], zero), (n,))
    lo, hi = _chunk(words)
    while hi > lo:
        products(a, b, part, lo, hi)
        if _last(words):
            products_samples(part, words[6] == 1, out)
        lo, hi = _chunk(words)


# The entries' Python bodies, one named function each, compiled at first use by entry(). A
# factory closing over the kernel recompiled in every process (numba keys a closure's cache by its
# cells, pickled, and a dispatcher's pickle differs between processes), and one entry dispatching
# on a word of the descriptor compiled all ten at once (12.5 s with numba's cache empty, against
# ~2 s each).
def _block_rows_32(data):  # pragma: no cover -- compiled
    _block_rows_entry(data, np.float32(0))


def _block_rows_64(data):  # pragma: no cover -- compiled
    _block_rows_entry(data, np.float64(0))


def _block_columns_32(data):  # pragma: no cover -- compiled
    _block_columns_entry(data, np.float32(0))


def _block_columns_64(data):  # pragma: no cover -- compiled
    _block_columns_entry(data, np.float64(0))


def _moments_rows_32(data):  # pragma: no cover -- compiled
    _moments_rows_entry(data, np.float32(0))


def _moments_rows_64(data):  # pragma: no cover -- compiled
    _moments_rows_entry(data, np.float64(0))


def _moments_columns_32(data):  # pragma: no cover -- compiled
    _moments_columns_entry(data, np.float32(0))


def _moments_columns_64(data):  # pragma: no cover -- compiled
    _moments_columns_entry(data, np.float64(0))


def _products_32(data):  # pragma: no cover -- compiled
    _products_entry(data, np.float32(0))


def _products_64(data):  # pragma: no cover -- compiled
    _products_entry(data, np.float64(0))


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_BODIES = {
    ("block_rows", _F32): _block_rows_32,
    ("block_rows", _F64): _block_rows_64,
    ("block_columns", _F32): _block_columns_32,
    ("block_columns", _F64): _block_columns_64,
    ("moments_rows", _F32): _moments_rows_32,
    ("moments_rows", _F64): _moments_rows_64,
    ("moments_columns", _F32): _moments_columns_32,
    ("moments_columns", _F64): _moments_columns_64,
    ("products", _F32): _products_32,
    ("products", _F64): _products_64,
}


def entry(kernel: str, dtype: np.dtype) -> CFunc:
    """``kernel``'s entry for inputs of ``dtype`` (float32 or float64), ``void entry(void
    *data)``: the kernel over the chunks of the call that ``data`` describes (see above), then its
    finishing step. Compiled at its first call (numba caches it beside the kernels: one source
    file, so a change to a kernel recompiles its entries too). The caller keeps the object for as
    long as it calls the entry's address: the compiled code is the object's.

    Each kernel's arrays, in the order of the descriptor's addresses: ``block_rows`` y, F, S
    [N, C, P], moments [4, N, C], part [6, N C] (float64), sample [6, N]; ``block_columns`` y, F,
    S [N, P, C], moments, sample; ``moments_rows`` t [N, C, P], moments [2, N, C];
    ``moments_columns`` t [N, P, C], moments; ``products`` a, b [N, M], part [N pieces]
    (float64), out [N].
    """
    return cfunc(types.void(types.voidptr), nopython=True, cache=True, error_model="numpy")(
        _BODIES[kernel, np.dtype(dtype)]
    )
