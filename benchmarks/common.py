"""Shared helpers for the benchmark scripts: device choice, timing (CUDA events or perf_counter)."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "device",
    "graphed",
    "median_ms",
    "seconds",
    "rotations",
    "in_turns",
    "header",
    "one_read_kernels_off",
]


def device() -> torch.device:
    """The GPU when there is one, with cuDNN's autotuner on: the fast unprobed pass the reference
    measurement used (docs/performance.md), so that ratios are not flattered by a slow one."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA-synchronised on the GPU)."""
    dev = device()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def seconds(fn: Callable[[], object], cuda: bool) -> float:
    """Wall time of one call of ``fn`` (the GPU's queue drained before and after it)."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def rotations(names: list[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """(round, the order of ``names`` in it) for ``rounds`` rounds, the order rotating by one each
    round: no name always comes after the same one.

    Example:
        >>> [order for _, order in rotations(["a", "b"], 3)]
        [['a', 'b'], ['b', 'a'], ['a', 'b']]
    """
    for r in range(rounds):
        k = r % len(names)
        yield r, names[k:] + names[:k]


def in_turns(
    methods: dict[str, Callable[[], object]], rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds of each of ``methods``, one call each per round in an order that rotates every
    round (no method always runs after the same one), after ``warmup`` rounds: round-by-round
    ratios of two methods are then immune to the machine's drift between rounds
    (CUDA-synchronised on the GPU).

    Example:
        >>> times = in_turns({"a": lambda: None, "b": lambda: None}, rounds=2)
        >>> sorted(times), [len(t) for t in times.values()]
        (['a', 'b'], [2, 2])
    """
    cuda = device().type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r, order in rotations(list(methods), rounds + warmup):
        for name in order:
            took = seconds(methods[name], cuda)
            if r >= warmup:
                times[name].append(took)
    return times


def graphed(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` recorded as a CUDA graph, after three warm-up calls on a side stream; returns its
    replay. ``step`` must read and write the same tensors at every call (and use autocast with
    ``cache_enabled=False``): the unprobed pass at its fastest, bound by the device alone."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def header(title: str) -> None:
    dev = device()
    name = (
        torch.cuda.get_device_name()
        if dev.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"# {title}\n# device: {name}; torch {torch.__version__}")


@contextlib.contextmanager
def one_read_kernels_off() -> Iterator[None]:
    """The one-read statistics kernels off (``RESPROBE_ONEPASS=0``: torch's formulas, numba's
    kernels on the CPU and Triton's on a GPU alike) inside the block, as they were after it."""
    from probe.probes import onepass

    before = os.environ.get(onepass.ENV)
    os.environ[onepass.ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[onepass.ENV]
        else:
            os.environ[onepass.ENV] = before
