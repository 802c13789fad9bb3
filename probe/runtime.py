"""CPU threads and determinism: chosen once per process, recorded in every result's provenance.

Floating-point reductions run in a different order with a different number of threads, so a
training run on 1 thread and on 2 threads diverges step by step (digits plain-32, seed 0: 1.18 %
and 3.90 % final training error). What is reproducible: the same code, machine type, thread count
and seed, with ``deterministic=True`` (deterministic kernels, no cuDNN autotuning), give the same
numbers bit for bit on the CPU; GPU runs also need the same GPU model and CUDA version. What is
not: results across thread counts or devices -- they differ like another seed would.

Example:
    >>> from probe.runtime import choose_threads
    >>> choose_threads(1)
    1
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from probe.errors import ProbeError
from probe.provenance import FORMULA_KEYS

__all__ = [
    "choose_threads",
    "configure",
    "runtime_settings",
    "statistics_formulas",
    "settled_formulas",
    "FORMULA_KEYS",
    "available_cores",
    "tune_allocator",
]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int | str = "auto", processes: int = 1) -> int:
    """The intra-op thread count: ``requested``, or for ``"auto"`` this process's share of the
    cores left idle by other processes (available cores minus the 1-minute load average, divided
    among ``processes`` started together, e.g. the ranks torchrun starts on one node; at least 1).

    An oversubscribed CPU is far worse than an idle core: on a loaded 2-core machine torch's
    default (one thread per core) ran a study ~29x slower per step than one thread.
    """
    if requested == "auto":
        cores = available_cores()
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
        return max(1, min(cores, round(cores - load)) // max(1, processes))
    try:
        n = int(requested)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(requested, bool):
        raise ProbeError(
            f"Invalid thread count {requested!r}; give a positive integer or 'auto' "
            f"(this machine has {available_cores()} cores)."
        )
    return n


def configure(threads: int | str = "auto", deterministic: bool = False, processes: int = 1) -> int:
    """Set torch's intra-op threads (see :func:`choose_threads`) and, with ``deterministic``,
    deterministic algorithms and no cuDNN autotuning. Returns the thread count."""
    n = choose_threads(threads, processes)
    torch.set_num_threads(n)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic results; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return n


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_allocator: dict = {"tuned": False}


def tune_allocator() -> bool:
    """Keep freed CPU tensor memory in the process instead of returning it to the OS (glibc only).

    By default glibc serves every allocation above a threshold that floats up to 32 MB with a
    fresh ``mmap`` and returns freed memory at the top of the heap to the OS, so each new
    activation tensor is page-faulted in again; probes add temporaries and make it worse. With the
    mmap threshold pinned at its 32 MB maximum and trimming only above 1 GB, freed tensors are
    reused: ResNet-56 forward+backward with statistics and gradient norms went from 2.0x to 1.45x
    an unprobed pass, and the unprobed pass itself got faster (docs/performance.md). Peak memory
    is unchanged; the process keeps up to 1 GB of freed memory for reuse. The CLI calls this for
    every command that runs a model; call it yourself in a notebook. Returns whether it applied
    (False off glibc, e.g. macOS, Windows, musl).
    """
    if _allocator["tuned"]:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    _allocator["tuned"] = bool(ok)
    return _allocator["tuned"]


def runtime_settings() -> dict:
    """The settings a result depends on beyond code and data: threads and determinism."""
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores": available_cores(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        # TF32 convolutions (on by default on CUDA) change float32 results at ~1e-3 relative
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "allocator_tuned": _allocator["tuned"],
        **statistics_formulas(),
    }


def statistics_formulas() -> dict[str, str]:
    """Which formulas the statistics probes take, per device: ``cpu_statistics`` is "one-pass"
    (float64 sums of one read, probe.probes.onepass) or "torch" (torch's formulas);
    ``cuda_statistics`` the same for CUDA tensors (Triton, probe.probes.onepass_cuda), or "none"
    in a process without a CUDA device, where no CUDA statistics are taken.

    Example:
        >>> sorted(statistics_formulas())
        ['cpu_statistics', 'cuda_statistics']
    """
    # imported here: the probes package imports this module's users
    from probe.probes import onepass, onepass_cuda

    cuda = onepass_cuda.mode() if torch.cuda.is_available() else "none"
    return dict(zip(FORMULA_KEYS, (onepass.mode(), cuda)))


def settled_formulas(recorded: dict) -> dict[str, str]:
    """The statistics formulas of a run whose ``recorded`` runtime settings were read at its
    start, where a kernel failed during the run: that turned its device's kernels off, so the
    run's earlier statistics took the kernels and its later ones torch's formulas ("one-pass,
    then torch"). Kernels that never loaded (a broken numba or triton) took nothing: "torch".
    Empty where nothing changed.

    Example:
        >>> settled_formulas(runtime_settings())
        {}
    """
    from probe.probes import onepass, onepass_cuda

    # a kernel failed in this process: torch's formulas took that device's statistics since
    failed = dict(zip(FORMULA_KEYS, (onepass._failed, onepass_cuda._failed)))
    return {
        key: f"{recorded[key]}, then {now}" if failed[key] else now
        for key, now in statistics_formulas().items()
        if key in recorded and recorded[key] != now
    }
