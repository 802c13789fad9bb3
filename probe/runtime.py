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

import os

import torch

from probe.errors import ProbeError

__all__ = ["choose_threads", "configure", "runtime_settings", "available_cores"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int | str = "auto") -> int:
    """The intra-op thread count: ``requested``, or for ``"auto"`` the cores left idle by other
    processes (available cores minus the 1-minute load average, at least 1).

    An oversubscribed CPU is far worse than an idle core: on a loaded 2-core machine torch's
    default (one thread per core) ran a study ~29x slower per step than one thread.
    """
    if requested == "auto":
        cores = available_cores()
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
        return max(1, min(cores, round(cores - load)))
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


def configure(threads: int | str = "auto", deterministic: bool = False) -> int:
    """Set torch's intra-op threads (see :func:`choose_threads`) and, with ``deterministic``,
    deterministic algorithms and no cuDNN autotuning. Returns the thread count."""
    n = choose_threads(threads)
    torch.set_num_threads(n)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic results; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return n


def runtime_settings() -> dict:
    """The settings a result depends on beyond code and data: threads and determinism."""
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores": available_cores(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
