"""The eager statistics on the CPU in one read of each tensor (numba kernels).

In eager PyTorch each of a block's statistics is its own pass over a map: the channel sums and
sums of squares of y and of F(x), the difference y - S(x) and its norm, the product F(x) S(x)
and its sum, each temporary written and read back. On a CPU those passes, not the hooks, were
most of the statistics' cost (docs/performance.md). The kernels here read y, F(x) and S(x) once,
element by element, and keep every sum in float64:

- **the same quantities** as the torch formulas of :mod:`probe.probes.statistics`, more exactly:
  float64 sums of float32 values, a difference y - S taken in float64, y.S and F.S from their
  products (no polarization identity to guard);
- **the channel variance** from a row's sum and sum of squares where that cannot cancel past
  float32's rounding (``E[x^2] / var <= 2^27 / (3 P)`` for a row of P positions: the float64
  sums' worst-case error, ~3 P u of E[x^2], stays under 2^-26 of the variance), else by the
  corrected two-pass formula over that row, in float64 (Chan, Golub & LeVeque 1983).

They serve float32 and float64 CPU tensors laid out channel-first ([N, C, ...], positions
contiguous) or channel-last (a channels-last map, a [N, T, C] token tensor); anything else
(half precision, other strides, mixed dtypes, other devices) takes the torch formulas, as does
every call when numba is absent or ``RESPROBE_ONEPASS=0`` is set. Each kernel is compiled on its
first call (about a second; numba caches it on disk, so later processes load it). Tensors whose
memory does not hold their values as they are (negated views, sparse tensors, the wrapped tensors
of ``torch.func`` transforms) take the torch formulas too.

**Calls.** A call is one descriptor (shape, the tensors' addresses from ``data_ptr``, the
outputs') handed to a compiled C entry (:func:`probe.probes._onepass_kernels.entry`) that takes
the call's chunks of rows, samples or pieces of a row on whichever threads enter it, the thread
that finishes the last chunk adding the per-sample sums. In a model's pass, with Python's caches
cold, the Python around a kernel had cost more than the kernel (numpy views, numba's dispatcher
checking eight arguments); a descriptor and one foreign call cost a fraction of it.

**Threads.** The kernels are serial and release the GIL. Where torch runs on several threads, a
call runs on torch's own OpenMP team (:class:`_Team`), one thread per :data:`TEAM_VALUES` values
it reads up to torch's count, through ``GOMP_parallel`` of the runtime torch loaded. That team
spins between torch's operations, so it starts on a block's sub-millisecond call in time, and
none of its settings is touched. Where it does not serve (not OpenMP, not Linux,
``RESPROBE_ONEPASS_TEAM=0``, a forked child), a call that reads :data:`MIN_VALUES` values per
thread is entered by the calling thread and threads of a small pool of this module's. A row is
always summed whole by one thread, so the numbers do not depend on the thread count or the place.
numba's own threading layers are not used: the one it picks first on Linux, GNU OpenMP, binds to
the OpenMP runtime torch loaded and, when it starts, sets that runtime's thread count to every
core and its nesting to 255 levels, overriding ``torch.set_num_threads`` (a rank given one thread
ran torch's ops on two).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from types import ModuleType

import numpy as np
import torch

__all__ = [
    "OnePassWarning",
    "available",
    "mode",
    "serves",
    "block_sums",
    "moments",
    "dot",
    "norm",
    "ENV",
    "MIN_VALUES",
    "TEAM_ENV",
    "TEAM_VALUES",
]

log = logging.getLogger(__name__)

ENV = "RESPROBE_ONEPASS"  # "0" turns the kernels off: torch's formulas everywhere

_DTYPES = (torch.float32, torch.float64)
# float64 values' one-pass variance is kept where E[x^2]/var <= 16, as the torch formula's
_FLOAT64_LIMIT = 16.0
# the values (elements of every tensor a call reads) a thread takes at the least before a call is
# split. Inside a model's pass a hand-off cost more than it saved on a ResNet-56's blocks (3 M
# values a call at batch 64): the pool's threads wake from a futex and share the cores with
# torch's spinning OpenMP team (docs/performance-log.md, "The kernels' threads")
MIN_VALUES = 1 << 21
TEAM_ENV = "RESPROBE_ONEPASS_TEAM"  # "0": the kernels never run on torch's OpenMP team
# the values a call reads per thread of torch's OpenMP team it takes. A block's statistics on two
# threads of the team against one, right after a torch op: 82 against 87 us at 98 k values, 160
# against 217 at 786 k; under ~10^5 values the second thread saves nothing (a ResNet-56 block at
# batch 64, 0.8-3 M values, takes two)
TEAM_VALUES = 1 << 16
CHUNKS = 4  # chunks per thread of a split call: a thread that starts late takes fewer
# a call's descriptor: its length and where its addresses start (probe.probes._onepass_kernels)
_WORDS, _ARRAYS = 14, 8


class OnePassWarning(UserWarning):
    """The one-pass kernels failed to compile or run; the torch formulas serve from then on."""


_failed = False  # the kernels failed once in this process: the torch formulas serve from then on


@functools.cache
def _module() -> ModuleType | None:
    """The kernel module, or None when numba is absent or cannot load."""
    try:
        from probe.probes import _onepass_kernels
    except Exception as e:  # noqa: BLE001 -- an absent or broken numba: the torch formulas serve
        log.debug("one-pass statistics off: numba did not load (%s)", e)
        return None
    return _onepass_kernels


def _off() -> bool:
    """Whether the kernels are off: ``RESPROBE_ONEPASS=0`` (read at each call, so that it can be
    set at any time), or a kernel has failed in this process."""
    return _failed or os.environ.get(ENV, "1").strip() == "0"


def _kernels() -> ModuleType | None:
    """The kernel module where it serves: not :func:`_off`, and numba loads."""
    return None if _off() else _module()


def available() -> bool:
    """Whether the one-pass kernels serve this process (numba loads, not turned off by ENV).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _kernels() is not None


def mode() -> str:
    """Which formulas this process's CPU statistics take: "one-pass" (the kernels) or "torch"
    (recorded with every capture's runtime settings). Does not import numba.

    Example:
        >>> mode() in ("one-pass", "torch")
        True
    """
    return _formulas(_off(), _module, "numba")


def _formulas(off: bool, module: Callable, package: str) -> str:
    """ "one-pass" or "torch": which formulas a device's statistics take, given whether the
    kernels are ``off`` and the cached loader ``module`` of the kernels that need ``package``;
    whether that loads is asked of the loader once tried, else of the package's presence."""
    if off:
        return "torch"
    if module.cache_info().currsize:  # tried already: whether it loaded
        return "one-pass" if module() is not None else "torch"
    return "one-pass" if importlib.util.find_spec(package) is not None else "torch"


def serves(t: torch.Tensor) -> bool:
    """Whether the kernels take statistics of tensors like ``t`` in this process (float32 or
    float64 on the CPU, kernels on); their layout is checked at the call.

    Example:
        >>> serves(torch.ones(2, 3, dtype=torch.bfloat16))
        False
    """
    return t.dtype in _DTYPES and t.is_cpu and mode() == "one-pass"


def _views(tensors: tuple[torch.Tensor, ...], min_ndim: int) -> tuple | None:
    """(shape, strides, dtype, each tensor's address) shared by ``tensors``: one supported dtype,
    shape and strides, dense tensors on the CPU of at least ``min_ndim`` axes, not empty, whose
    memory holds their values as they are (no negated or conjugated view); None otherwise, and
    where a tensor has no memory of its own to read (a functorch or fake tensor): torch's
    formulas serve those."""
    first = tensors[0]
    try:
        dtype, shape = first.dtype, first.shape
        if dtype not in _DTYPES or len(shape) < min_ndim or first.numel() == 0:
            return None
        if first.layout != torch.strided or not first.is_cpu:
            return None
        strides = first.stride()
        for t in tensors:
            if t.dtype != dtype or t.shape != shape or t.layout != torch.strided:
                return None
            if t.stride() != strides or not t.is_cpu or t.is_neg() or t.is_conj():
                return None
        return shape, strides, dtype, [t.data_ptr() for t in tensors]
    except (RuntimeError, TypeError):
        return None


def _dense_in(shape: tuple[int, ...], strides: tuple[int, ...], order: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` and ``strides`` lies in memory as one block, its axes
    outermost first in ``order`` (axes of size one may have any stride)."""
    step = 1
    for d in reversed(order):
        if shape[d] != 1:
            if strides[d] != step:
                return False
            step *= shape[d]
    return True


def _layout(tensors: tuple[torch.Tensor, ...], axis: int) -> tuple | None:
    """(rows?, the kernel's shape, dtype, addresses) of ``tensors`` with channel axis ``axis``,
    all of one supported dtype, shape and strides: rows [N, C, P] where each channel's positions
    lie together, else columns [N, P, C] where the channels are the innermost axis (a
    channels-last map, [N, T, C] tokens); None where neither. Read from the strides: a numpy
    view of each tensor costs a few dispatches, and in a model's pass, with Python's caches
    cold, the views had cost ~1/5 of the kernels' own time."""
    found = _views(tensors, 3)
    if found is None:
        return None
    shape, strides, dtype, addresses = found
    rows = _channel_order(shape, strides, axis)
    if rows is None:
        return None
    n, c = shape[0], shape[axis]
    positions = math.prod(shape) // (n * c)
    return rows, ((n, c, positions) if rows else (n, positions, c)), dtype, addresses


def _channel_order(shape: tuple[int, ...], strides: tuple[int, ...], axis: int) -> bool | None:
    """Whether a tensor of ``shape`` and ``strides`` (one block of memory, the sample axis
    outermost) holds each channel's positions together (True), or its channels innermost
    (False: a channels-last map, [N, T, C] tokens); None where neither. Shared with the CUDA
    kernels (probe.probes.onepass_cuda), which pass a sample's axes alone."""
    rest = tuple(d for d in range(1, len(shape)) if d != axis)
    if _dense_in(shape, strides, (0, axis, *rest)):
        return True
    if _dense_in(shape, strides, (0, *rest, axis)):
        return False
    return None


def _in_memory_order(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` and ``strides`` is one block of memory with the sample axis
    outermost, its other axes in any order (a channels-last map: H, W, C)."""
    order = (0, *sorted(range(1, len(shape)), key=lambda d: -strides[d]))
    return _dense_in(shape, strides, order)


def _limit(dtype: torch.dtype, positions: int) -> float:
    """The largest E[x^2]/var of a row whose one-pass variance is kept (see the module)."""
    return _FLOAT64_LIMIT if dtype == torch.float64 else 2.0**27 / (3 * positions)


def _buffers(part: int, results: int, dtype: np.dtype) -> tuple:
    """A call's memory: (its descriptor's words, ``part`` float64 partial sums, ``results``
    values of ``dtype``, the words' address, the partial sums' address, the results' address).
    The words and the partial sums share one allocation."""
    scratch = np.empty(_WORDS + part, dtype=np.float64)
    out = np.empty(results, dtype=dtype)
    # addresses read through torch: numpy's ``ctypes.data`` runs Python code, slow in a pass
    data, at = torch.from_numpy(scratch).data_ptr(), torch.from_numpy(out).data_ptr()
    words = scratch[:_WORDS].view(np.int64)
    return words, scratch[_WORDS:], out, data, data + 8 * _WORDS, at


class _Pool:
    """The threads that enter a split call beside the calling thread, where torch's OpenMP team
    cannot (:class:`_Team`): made at the first split call, grown when torch's count grows, and
    made anew in a forked child (a fork keeps the executor but not its threads, whose queue
    nobody would empty)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._size = 0
        self._executor: ThreadPoolExecutor | None = None

    def get(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid() or self._size < workers:
                # the old executor is dropped, not shut down: a call on another thread may still
                # be handing it work; its threads end once the last reference to it goes
                self._executor = ThreadPoolExecutor(workers, thread_name_prefix="resprobe-onepass")
                self._pid, self._size = os.getpid(), workers
            return self._executor


_POOL = _Pool()

_RUNTIMES = ("libgomp", "libiomp5", "libomp")  # OpenMP runtimes that offer GOMP_parallel


def _loaded_libraries() -> set[str]:
    """The paths of the shared libraries this process has loaded (empty off Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split(maxsplit=5)[-1].strip() for line in maps if ".so" in line}
    except OSError:
        return set()


def _torchs_runtime(loaded: set[str], home: str) -> str | None:
    """Which of the ``loaded`` libraries is the OpenMP runtime torch runs on: the one loaded, or
    where several are, the one under torch's directory ``home`` (a wheel's torch/lib); None
    where that is not certain."""
    found = {p for p in loaded if os.path.basename(p).startswith(_RUNTIMES)}
    if len(found) > 1:
        found = {p for p in found if os.path.realpath(p).startswith(home + os.sep)}
    return found.pop() if len(found) == 1 else None


def _openmp_runtime() -> ctypes.CDLL | None:
    """torch's OpenMP runtime, already loaded in this process; None where torch's parallel
    backend is not OpenMP, off Linux, or where the runtime is not certain."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    home = os.path.dirname(os.path.realpath(torch.__file__))
    path = _torchs_runtime(_loaded_libraries(), home)
    if path is None:
        log.debug("one-pass kernels: no OpenMP runtime of torch's found")
        return None
    try:
        # RTLD_NOLOAD: the runtime already loaded, never a second copy
        runtime = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        parallel = runtime.GOMP_parallel
    except (OSError, AttributeError) as e:
        log.debug("one-pass kernels: torch's OpenMP runtime %s is not usable (%s)", path, e)
        return None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return runtime


class _Team:
    """torch's own OpenMP team, where this process may hand it a call: its threads spin between
    torch's operations, so they start on a block's 0.2-0.6 ms call in time, where a thread woken
    from a futex does not (docs/performance-log.md, "The kernels' threads").

    Only ``GOMP_parallel`` is called, with the thread count given per call: the runtime's own
    settings (torch's thread count, its nesting) are left as they are. Never used in a forked
    child: there the parent's team is gone while the runtime still counts on it (torch's own
    parallel operations hang in such a child), so the child's calls take :class:`_Pool`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._parallel = None
        self._tried = False
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._pid = -1

    def serves(self) -> bool:
        """Whether calls may go to the team: torch's OpenMP runtime found, this process not a
        fork of the one that found it, and ``RESPROBE_ONEPASS_TEAM`` not "0"."""
        if self._pid != os.getpid():
            return False
        if not self._tried:
            with self._lock:
                if not self._tried:
                    off = os.environ.get(TEAM_ENV, "1").strip() == "0"
                    runtime = None if off else _openmp_runtime()
                    self._parallel = None if runtime is None else runtime.GOMP_parallel
                    self._tried = True
        return self._parallel is not None

    def run(self, entry: int, data: int, threads: int) -> None:
        """The ``entry`` at ``data``'s call on ``threads`` threads of the team, the calling
        thread one of them."""
        self._parallel(entry, data, threads, 0)


_TEAM = _Team()


@functools.cache
def _entry(kernel: str, dtype: np.dtype) -> tuple[int, Callable[[int], None], object]:
    """(``kernel``'s entry for ``dtype`` inputs: its address, it as a Python callable that lets
    the GIL go, and the numba object that owns its code, kept alive with them), compiled at the
    first call; raises where it fails to compile (see :func:`_launch`)."""
    compiled = _module().entry(kernel, dtype)
    return compiled.address, compiled.ctypes, compiled


def _place(items: int, values: int) -> tuple[str, int]:
    """Where a call of ``items`` work items reading ``values`` values runs, and on how many
    threads: "team", one thread of torch's count per :data:`TEAM_VALUES` values (at most one
    per item), where that is two or more and the team serves; else "pool", one per
    :data:`MIN_VALUES`, where that is two or more; else "thread", the calling thread alone."""
    count = torch.get_num_threads()
    threads = min(count, items, values // max(TEAM_VALUES, 1))
    if threads >= 2 and _TEAM.serves():
        return "team", threads
    threads = min(count, items, values // max(MIN_VALUES, 1))
    return ("pool", threads) if threads >= 2 else ("thread", 1)


def _launch(
    kernel: str,
    dtype: np.dtype,
    words: np.ndarray,
    data: int,
    outputs: tuple[np.ndarray, ...],
    items: int,
    values: int,
) -> bool:
    """Run ``kernel``'s call that ``words`` (at address ``data``) describes, its shape, scalar
    and addresses filled in, where :func:`_place` says; it writes ``outputs``. False (and the
    kernels off, with a warning) where the entry fails to compile or a thread's entry fails."""
    try:
        address, call, _ = _entry(kernel, dtype)
        place, threads = _place(items, values)
        words[0] = words[7] = 0  # no chunk taken, none done
        words[1], words[2] = min(items, CHUNKS * threads), items
        if place == "team":
            _TEAM.run(address, data, threads)
        elif place == "pool":
            pool = _POOL.get(threads - 1)
            futures = [pool.submit(call, data) for _ in range(threads - 1)]
            try:
                call(data)
            finally:
                wait(futures)  # no thread may still write into the outputs after a return
            for future in futures:
                future.result()  # raises a thread's failure
        else:
            call(data)
        if words[7] != words[1]:  # an entry's failure cannot raise through a foreign call
            raise RuntimeError(f"{kernel} did {words[7]} of its {words[1]} chunks")
    except Exception as e:  # noqa: BLE001 -- a compiler or runtime failure: torch serves
        global _failed
        _failed = True
        _warn_failed("one-pass statistics kernels", e)
        return False
    return True


def _warn_failed(kernels: str, e: Exception) -> None:
    """Say once that ``kernels`` failed with ``e`` and torch's formulas serve from now on (the
    caller turns its kernels off); shared with the CUDA kernels (probe.probes.onepass_cuda)."""
    warnings.warn(
        f"The {kernels} failed ({type(e).__name__}: {e}); torch's formulas serve from now on in "
        f"this process (the same quantities, slower). Set {ENV}=0 to skip the kernels.",
        OnePassWarning,
        stacklevel=4,
    )


def _describe(words: np.ndarray, shape: tuple, limit: float, addresses: list[int]) -> None:
    """Fill in a call's shape, its variance limit (word 6, a float64's bits) and the addresses
    of its arrays, inputs then outputs, in the order of its kernel's arguments."""
    words[3:6] = shape
    words[6:7].view(np.float64)[0] = limit
    words[_ARRAYS : _ARRAYS + len(addresses)] = addresses


def _tensors(out: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Each row of a kernel's output as a tensor of its own: numpy's rows and ``from_numpy``
    cost a fraction of torch's ``unbind`` in a model's pass, whose views go through autograd's
    bookkeeping."""
    return tuple(torch.from_numpy(row) for row in out)


def block_sums(
    f: torch.Tensor, s: torch.Tensor, y: torch.Tensor, axis: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
    """A block's statistics from one read of F(x), S(x) and y (one shape, channel axis ``axis``):
    ((||F||, ||S||, ||y||, ||y - S||, cos(y, S), cos(F, S)) [N] each, (mean y, var y, mean F,
    var F) [N, C] each), in the tensors' dtype; None where the kernels do not serve them.

    Example:
        >>> f, s = torch.ones(1, 1, 4), torch.zeros(1, 1, 4)
        >>> out = block_sums(f, s, f + s, 1)
        >>> out is None or [float(q) for q in out[0][:4]] == [2.0, 0.0, 2.0, 2.0]
        True
    """
    found = None if _kernels() is None else _layout((y, f, s), axis)
    if found is None:
        return None
    rows, shape, dtype, inputs = found
    n = shape[0]
    c, positions = (shape[1], shape[2]) if rows else (shape[2], shape[1])
    kind, nc = _NUMPY[dtype], n * c
    # rows: each row's six sums, added per sample by the call's last chunk
    memory = _buffers(6 * nc if rows else 0, 4 * nc + 6 * n, kind)
    words, part, out, data, part_at, out_at = memory
    moments, sample = out[: 4 * nc].reshape(4, n, c), out[4 * nc :].reshape(6, n)
    sample_at = out_at + 4 * nc * kind.itemsize  # the per-sample quantities follow the moments
    outputs = [out_at, part_at, sample_at] if rows else [out_at, sample_at]
    _describe(words, shape, _limit(dtype, positions), inputs + outputs)
    kernel, items = ("block_rows", nc) if rows else ("block_columns", n)
    if not _launch(kernel, kind, words, data, (out, part), items, 3 * nc * positions):
        return None
    return _tensors(sample), _tensors(moments)


_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def moments(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample, per-channel mean and population variance of ``t`` (channel axis ``axis``, at
    least one axis besides the sample's and the channel's) from one read, each [N, C] in ``t``'s
    dtype; None where the kernels do not serve it.

    Example:
        >>> out = moments(torch.tensor([[[1.0, 3.0, 1.0, 3.0]]]), 1)
        >>> out is None or [float(q) for q in out] == [2.0, 1.0]
        True
    """
    found = None if _kernels() is None else _layout((t,), axis)
    if found is None:
        return None
    rows, shape, dtype, inputs = found
    n = shape[0]
    c, positions = (shape[1], shape[2]) if rows else (shape[2], shape[1])
    kind = _NUMPY[dtype]
    words, _, out, data, _, out_at = _buffers(0, 2 * n * c, kind)
    _describe(words, shape, _limit(dtype, positions), [*inputs, out_at])
    kernel, items = ("moments_rows", n * c) if rows else ("moments_columns", n)
    if not _launch(kernel, kind, words, data, (out,), items, n * c * positions):
        return None
    mean, var = _tensors(out.reshape(2, n, c))
    return mean, var


def _rows_in_memory(tensors: tuple[torch.Tensor, ...]) -> tuple | None:
    """(N, M, dtype, addresses) of ``tensors`` (one shape, dtype and strides) where each
    sample's M values lie together in memory, in the same order for all (a channels-last map:
    H, W, C); None otherwise."""
    found = _views(tensors, 2)
    if found is None:
        return None
    shape, strides, dtype, addresses = found
    if not _in_memory_order(shape, strides):
        return None
    return shape[0], math.prod(shape) // shape[0], dtype, addresses


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per-sample a.b from one read of ``a`` and ``b`` (one shape, dtype and memory order), [N] in
    their dtype, summed in float64 (GradNorms' F.dL/dx); None where the kernels do not serve
    them.

    Example:
        >>> out = dot(torch.full((1, 4), 2.0), torch.ones(1, 4))
        >>> out is None or float(out[0]) == 8.0
        True
    """
    found = None if _kernels() is None else _rows_in_memory((a, b))
    if found is None:
        return None
    return _products(*found, root=False)


def norm(t: torch.Tensor) -> torch.Tensor | None:
    """Per-sample L2 norm of ``t`` [N, ...] from one read, summed and rooted in float64 and
    rounded once to ``t``'s dtype, [N]; None where the kernels do not serve it (see
    :func:`dot`). The block kernels' norms are taken the same way, so a norm of the same tensor
    is the same number whichever took it.

    Example:
        >>> out = norm(torch.full((1, 4), 2.0))
        >>> out is None or float(out[0]) == 4.0
        True
    """
    found = None if _kernels() is None else _rows_in_memory((t,))
    if found is None:
        return None
    n, m, dtype, (address,) = found
    return _products(n, m, dtype, [address, address], root=True)


def _products(
    n: int, m: int, dtype: torch.dtype, addresses: list[int], root: bool
) -> torch.Tensor | None:
    """Per-sample sum of a * b of the [N, M] rows in memory at ``addresses`` (a's, b's) in
    ``dtype``, its square root where ``root``, [N]; by pieces of a row (a batch of one still
    splits); None where the kernel failed."""
    pieces = -(-m // _module().PIECE)
    kind = _NUMPY[dtype]
    words, part, out, data, part_at, out_at = _buffers(n * pieces, n, kind)
    _describe(words, (n, m, pieces), 0.0, [*addresses, part_at, out_at])
    words[6] = int(root)  # no limit: products read word 6 as the root flag
    if not _launch("products", kind, words, data, (out, part), n * pieces, n * m * (2 - root)):
        return None
    return torch.from_numpy(out)
