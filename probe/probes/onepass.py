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
first call (about a second; numba caches it on disk, so later processes load it).

**Threads.** The kernels are serial and release the GIL. Where torch runs on several threads, a
call runs on torch's own OpenMP team (:class:`_Team`), one thread per :data:`TEAM_VALUES` values
it reads up to torch's count: ``GOMP_parallel`` of the runtime torch loaded, each thread
taking chunks of the call's rows or samples until none is left
(:func:`probe.probes._onepass_kernels.team_entries`). That team spins between torch's
operations, so it starts on a block's sub-millisecond call in time, and none of its settings is
touched. Where it does not serve (not OpenMP, not Linux,
``RESPROBE_ONEPASS_TEAM=0``, a forked child), a call that reads :data:`MIN_VALUES` values per
thread is cut into spans on the calling thread and a small pool of this module's. A row is always
summed whole by one thread, so the numbers do not depend on the thread count or the place. numba's
own threading layers are not used: the one it picks first on Linux, GNU OpenMP, binds to the
OpenMP runtime torch loaded and, when it starts, sets that runtime's thread count to every core
and its nesting to 255 levels, overriding ``torch.set_num_threads`` (a rank given one thread ran
torch's ops on two).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
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
# torch's spinning OpenMP team (docs/performance.md, "The kernels' threads")
MIN_VALUES = 1 << 21
TEAM_ENV = "RESPROBE_ONEPASS_TEAM"  # "0": the kernels never run on torch's OpenMP team
# the values a call reads per thread of torch's OpenMP team it takes: under it, a thread's start
# costs about what it saves (a ResNet-56 block at batch 64, 0.8-3 M values, takes two threads)
TEAM_VALUES = 1 << 16
CHUNKS = 4  # chunks per thread of a call on the team: a thread that starts late takes fewer


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
    if _off():
        return "torch"
    if _module.cache_info().currsize:  # tried already: whether it loaded
        return "one-pass" if _module() is not None else "torch"
    return "one-pass" if importlib.util.find_spec("numba") is not None else "torch"


def serves(t: torch.Tensor) -> bool:
    """Whether the kernels take statistics of tensors like ``t`` in this process (float32 or
    float64 on the CPU, kernels on); their layout is checked at the call.

    Example:
        >>> serves(torch.ones(2, 3, dtype=torch.bfloat16))
        False
    """
    return t.dtype in _DTYPES and t.is_cpu and mode() == "one-pass"


def _numpy_views(tensors: tuple[torch.Tensor, ...], min_ndim: int) -> list[np.ndarray] | None:
    """numpy views of ``tensors`` as they lie: one supported dtype and shape, on the CPU, at
    least ``min_ndim`` axes, not empty; None otherwise, or where numpy cannot view one (a
    negated view, ...): torch's formulas serve those."""
    first = tensors[0]
    dtype, shape = first.dtype, first.shape
    if dtype not in _DTYPES or len(shape) < min_ndim or not first.is_cpu or first.numel() == 0:
        return None
    for t in tensors[1:]:
        if t.dtype != dtype or t.shape != shape or not t.is_cpu:
            return None
    try:
        return [(t.detach() if t.requires_grad else t).numpy() for t in tensors]
    except (RuntimeError, TypeError):
        return None


def _arrays(
    tensors: tuple[torch.Tensor, ...], axis: int
) -> tuple[bool, list, tuple[int, int, int]] | None:
    """(rows?, numpy views [N, C, P] if rows else [N, P, C], (N, C, P)) of ``tensors`` with
    channel axis ``axis``, all of one supported dtype, shape and memory layout; None where a
    kernel does not serve them. Taken with numpy's views: each torch view op costs a dispatch,
    and in a model's pass, with Python's caches cold, those added up to ~1/5 of the kernels' own
    time."""
    arrays = _numpy_views(tensors, 3)
    if arrays is None:
        return None
    shape = tensors[0].shape
    n, c = shape[0], shape[axis]
    if axis != 1:  # the channel axis second: a view
        order = (0, axis, *(d for d in range(1, len(shape)) if d != axis))
        arrays = [a.transpose(order) for a in arrays]
    dims = (n, c, arrays[0].size // (n * c))
    if all(a.flags.c_contiguous for a in arrays):
        return True, [a.reshape(n, c, -1) for a in arrays], dims
    last = (0, *range(2, len(shape)), 1)  # channels last
    moved = [a.transpose(last) for a in arrays]
    if all(a.flags.c_contiguous for a in moved):
        return False, [a.reshape(n, -1, c) for a in moved], dims
    return None


def _limit(dtype: torch.dtype, positions: int) -> float:
    """The largest E[x^2]/var of a row whose one-pass variance is kept (see the module)."""
    return _FLOAT64_LIMIT if dtype == torch.float64 else 2.0**27 / (3 * positions)


class _Pool:
    """The threads that take the spans of a split call after the calling thread's, where torch's
    OpenMP team cannot (:class:`_Team`): made at the first split call, grown when torch's count
    grows, and made anew in a forked child (a fork keeps the executor but not its threads, whose
    queue nobody would empty)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._size = 0
        self._executor: ThreadPoolExecutor | None = None

    def get(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid() or self._size < workers:
                # the old executor is dropped, not shut down: a call on another thread may still
                # be handing it spans; its threads end once the last reference to it goes
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
    """torch's own OpenMP team, where this process may hand it a kernel's chunks: its threads
    spin between torch's operations, so they start on a block's 0.2-0.6 ms call in time, where a
    thread woken from a futex does not (docs/performance.md, "The kernels' threads").

    Only ``GOMP_parallel`` is called, with the thread count given per call: the runtime's own
    settings (torch's thread count, its nesting) are left as they are. Never used in a forked
    child: there the parent's team is gone while the runtime still counts on it (torch's own
    parallel operations hang in such a child), so the child's calls take :class:`_Pool`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._entries: dict | None = None
        self._parallel = None
        self._tried = False
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._pid = -1

    def entry(self, kernel, dtype: np.dtype) -> int | None:
        """The address of ``kernel``'s team entry for inputs of ``dtype``; None where the team
        does not serve this process (see the class)."""
        if self._pid != os.getpid():
            return None
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._load()
        return None if self._entries is None else self._entries.get((kernel, dtype))

    def _load(self) -> None:
        runtime = None if os.environ.get(TEAM_ENV, "1").strip() == "0" else _openmp_runtime()
        if runtime is not None:
            kernels = _module()
            try:
                entries = None if kernels is None else kernels.team_entries()
            except Exception as e:  # noqa: BLE001 -- entries that fail to build: the pool serves
                log.debug("one-pass kernels: no team entries (%s)", e)
            else:
                self._parallel, self._entries = runtime.GOMP_parallel, entries
        self._tried = True

    def run(self, entry: int, args: tuple, items: int, threads: int) -> None:
        """``entry``'s kernel over ``items`` work items of ``args`` (arrays, the variance limit)
        in chunks on ``threads`` threads of the team, the calling thread one of them."""
        words = np.zeros(_module().WORDS, dtype=np.int64)
        words[1], words[2] = min(items, CHUNKS * threads), items
        shape = args[0].shape  # [N, C, P] or [N, P, C]; [N, M] and its pieces per row
        words[3:6] = shape if len(shape) == 3 else (*shape, items // shape[0])
        k = 7
        for a in args:
            if isinstance(a, np.ndarray):
                words[k] = a.ctypes.data
                k += 1
            else:
                words[6:7].view(np.float64)[0] = a
        self._parallel(entry, words.ctypes.data, threads, 0)


_TEAM = _Team()


def _spans(items: int, values: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` spans of ``items`` work items, one per thread that a call reading ``values``
    values repays (:data:`MIN_VALUES` each), up to torch's intra-op count."""
    parts = max(1, min(torch.get_num_threads(), items, values // MIN_VALUES))
    bounds = [items * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _on_team(kernel, args: tuple, items: int, values: int) -> bool:
    """Whether ``kernel`` ran on torch's OpenMP team: on one thread of torch's count for every
    :data:`TEAM_VALUES` values the call reads (at most one per item), where that is two or more,
    the team serves this process and the arrays are contiguous."""
    threads = min(torch.get_num_threads(), items, values // max(TEAM_VALUES, 1))
    if threads < 2:
        return False
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    entry = _TEAM.entry(kernel, arrays[0].dtype)
    if entry is None or not all(a.flags.c_contiguous for a in arrays):
        return False
    _TEAM.run(entry, args, items, threads)
    return True


def _run(
    kernel, args: tuple, items: int, values: int, finish: Callable[[], None] | None = None
) -> bool:
    """``kernel(*args, lo, hi)`` over ``items`` work items: on torch's OpenMP team where it
    serves (:func:`_on_team`), else in spans on as many threads as :func:`_spans` gives, then
    ``finish()``; False (and the kernels off, with a warning) where a kernel fails to compile or
    run."""
    try:
        if not _on_team(kernel, args, items, values):
            spans = _spans(items, values)
            if len(spans) == 1:
                kernel(*args, 0, items)
            else:
                pool = _POOL.get(len(spans) - 1)
                futures = [pool.submit(kernel, *args, lo, hi) for lo, hi in spans[1:]]
                try:
                    kernel(*args, *spans[0])
                finally:
                    wait(futures)  # no span may still write into the outputs after a return
                for future in futures:
                    future.result()  # raises a span's failure
        if finish is not None:
            finish()
    except Exception as e:  # noqa: BLE001 -- a compiler or runtime failure: torch serves
        global _failed
        _failed = True
        warnings.warn(
            f"The one-pass statistics kernels failed ({type(e).__name__}: {e}); the torch "
            f"formulas serve from now on (the same quantities, slower). Set {ENV}=0 to skip them.",
            OnePassWarning,
            stacklevel=3,
        )
        return False
    return True


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
    kernels = _kernels()
    found = None if kernels is None else _arrays((y, f, s), axis)
    if found is None:
        return None
    rows, (ya, fa, sa), (n, c, positions) = found
    moments_out = np.empty((4, n, c), dtype=ya.dtype)
    sample = np.empty((6, n), dtype=ya.dtype)
    limit, values = _limit(y.dtype, positions), 3 * ya.size
    if rows:
        part = np.empty((6, n * c))
        finish = functools.partial(kernels.block_samples, part, sample)
        done = _run(
            kernels.block_rows, (ya, fa, sa, limit, moments_out, part), n * c, values, finish
        )
    else:
        done = _run(kernels.block_columns, (ya, fa, sa, limit, moments_out, sample), n, values)
    if not done:
        return None
    return _tensors(sample), _tensors(moments_out)


def moments(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample, per-channel mean and population variance of ``t`` (channel axis ``axis``, at
    least one axis besides the sample's and the channel's) from one read, each [N, C] in ``t``'s
    dtype; None where the kernels do not serve it.

    Example:
        >>> out = moments(torch.tensor([[[1.0, 3.0, 1.0, 3.0]]]), 1)
        >>> out is None or [float(q) for q in out] == [2.0, 1.0]
        True
    """
    kernels = _kernels()
    found = None if kernels is None else _arrays((t,), axis)
    if found is None:
        return None
    rows, (a,), (n, c, positions) = found
    out = np.empty((2, n, c), dtype=a.dtype)
    kernel = kernels.moments_rows if rows else kernels.moments_columns
    if not _run(kernel, (a, _limit(t.dtype, positions), out), n * c if rows else n, a.size):
        return None
    mean, var = _tensors(out)
    return mean, var


def _rows_in_memory(tensors: tuple[torch.Tensor, ...]) -> list[np.ndarray] | None:
    """numpy views [N, M] of ``tensors`` (one shape and dtype) with each sample's values in the
    order of memory, the same order for all; None where a sample's values are not one block of
    memory or the tensors lie in different orders."""
    arrays = _numpy_views(tensors, 2)
    if arrays is None:
        return None
    shape = tensors[0].shape
    # the trailing axes outermost first by the first tensor's strides (a channels-last map: H, W,
    # C); the sample axis stays first
    order = (0, *sorted(range(1, len(shape)), key=lambda d: -arrays[0].strides[d]))
    rows = [a.transpose(order) for a in arrays]
    if not all(a.flags.c_contiguous for a in rows):
        return None
    return [a.reshape(shape[0], -1) for a in rows]


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per-sample a.b from one read of ``a`` and ``b`` (one shape, dtype and memory order), [N] in
    their dtype, summed in float64 (GradNorms' F.dL/dx); None where the kernels do not serve
    them.

    Example:
        >>> out = dot(torch.full((1, 4), 2.0), torch.ones(1, 4))
        >>> out is None or float(out[0]) == 8.0
        True
    """
    kernels = _kernels()
    found = None if kernels is None else _rows_in_memory((a, b))
    if found is None:
        return None
    return _products(kernels, *found, root=False)


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
    kernels = _kernels()
    found = None if kernels is None else _rows_in_memory((t,))
    if found is None:
        return None
    return _products(kernels, found[0], found[0], root=True)


def _products(kernels: ModuleType, a: np.ndarray, b: np.ndarray, root: bool) -> torch.Tensor | None:
    """Per-sample sum of a * b of ``a``, ``b`` [N, M] (its square root where ``root``) in their
    dtype, by pieces of a row (a batch of one still splits); None where the kernel failed."""
    n, m = a.shape
    part = np.empty(n * -(-m // kernels.PIECE))
    out = np.empty(n, dtype=a.dtype)
    values = a.size if root else 2 * a.size
    finish = functools.partial(kernels.products_samples, part, root, out)
    if not _run(kernels.products, (a, b, part), part.shape[0], values, finish):
        return None
    return torch.from_numpy(out)
