"""What each probe costs on its own: a ResNet-56 pass with one probe (or one set) at a time, each
paired with the unprobed pass it is like for like with, timed right after it.

A forward-only probe is paired with a bare forward; one with gradients with a forward plus the
gradient w.r.t. the input (a capture computes no weight gradient). The unprobed pass is timed
right before and right after each probed one, with no hook on the model. On a GPU the model runs
channels-last under bf16 autocast, as in ``bench_hooks``; there the host's issue time (until the
call returns, before the device is waited for) is printed beside the wall time: where the two
are equal the pass is bound by the host's dispatch, not by the device.

Usage: python -m benchmarks.bench_breakdown [--batch 512] [--repeats 20]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import probe
from benchmarks.common import device, graphed, header, one_read_kernels_off
from probe.conformance import RawSites
from probe.runtime import tune_allocator


def _times(fn: Callable[[], object], repeats: int, dev: torch.device) -> tuple[float, float]:
    """Median wall and host-issue milliseconds of ``fn`` after three warm-up calls."""

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    wall, issue = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        wall.append((time.perf_counter() - t0) * 1e3)
        issue.append((t1 - t0) * 1e3)
    return statistics.median(wall), statistics.median(issue)


_FORMULAS_OFF = object()  # a row's last field: run it with the one-read kernels off


def _formulas_off(opened: Callable) -> Callable:
    """``opened`` (a context giving a probed pass) run with ``RESPROBE_ONEPASS=0``."""

    @contextlib.contextmanager
    def run():
        with one_read_kernels_off(), opened() as fn:
            yield fn

    return run


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512 if cuda else 64)
    ap.add_argument("--repeats", type=int, default=20 if cuda else 5)
    args = ap.parse_args()
    dev = device()
    tune_allocator()  # as the CLI does: glibc's page faults made the passes noisy
    header(f"what each probe costs, ResNet-56, batch {args.batch}")
    torch.manual_seed(0)
    model = probe.zoo.create("resnet56").to(dev).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def forward():
        with torch.no_grad(), autocast():
            model(x)

    def forward_backward():
        inp = x.detach().requires_grad_(True)
        with autocast():
            loss = F.cross_entropy(model(inp).float(), y, reduction="sum")
        torch.autograd.grad(loss, [inp])

    def report(name: str, probed: Callable, base: Callable[[], object]) -> None:
        """``probed()`` is a context holding the hooks, giving the probed pass; the unprobed
        pass is timed before it is entered and after it is left, without the hooks (their mean;
        the distance between the two is this row's noise)."""
        before, _ = _times(base, args.repeats, dev)
        with probed() as fn:
            wall, issue = _times(fn, args.repeats, dev)
        after, _ = _times(base, args.repeats, dev)
        base_wall = (before + after) / 2
        print(
            f"{name:56s} {wall:8.2f} ms  issue {issue:8.2f} ms  unprobed {base_wall:8.2f} ms "
            f"(+-{abs(after - before) / 2 / base_wall:4.0%})  {wall / base_wall:5.2f}x",
            flush=True,
        )

    @contextlib.contextmanager
    def clone_hooks():
        kept: list[torch.Tensor] = []
        handles = [
            b.register_forward_hook(lambda m, a, o: kept.append(o.detach().clone()))
            for b in model.blocks()
        ]
        try:
            yield lambda: (forward(), kept.clear())
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def session(probes: list, grouped: bool | None, cuda_graph: bool = False):
        with probe.HookSession(model, "auto", probes, grouped=grouped, cuda_graph=cuda_graph) as s:

            def run():
                with autocast():
                    s.run_batch(x, y)

            yield run

    report("hand-written hooks, clone each output", clone_hooks, forward)
    stats = [probe.ResidualNorms(), probe.ChannelStats()]
    fused = [probe.ResidualNorms(fused=True), probe.ChannelStats(fused=True)]
    all_three, all_fused = [*stats, probe.GradNorms()], [*fused, probe.GradNorms()]
    rows = [
        ("Activations (block outputs)", [probe.Activations()]),
        ("RawSites (input, branch, output)", [RawSites()]),
        ("ResidualNorms", stats[:1]),
        ("ChannelStats", stats[1:]),
        ("ResidualNorms + ChannelStats", stats),
        ("  the same, fused", fused),
        ("GradNorms", [probe.GradNorms()]),
        ("all three", all_three),
        ("  the same, fused", all_fused),
    ]
    # statistics grouped across equally shaped blocks (the default on an accelerator) and each
    # block's at its own call (the CPU's default), side by side: the rows above run the device's
    # default, these the other way
    other = "per call" if cuda else "grouped"
    rows += [(f"{name}, {other}", probes, not cuda) for name, probes in rows if probes[0].groupable]
    if cuda:  # recorded once and replayed (probe.replay); _times' warm-up records. Eager and
        # compiled statistics alike: recorded, only their kernels' GPU time is left to compare
        recorded = {
            "ResidualNorms + ChannelStats": stats,
            "  the same, fused": fused,
            "all three": all_three,
            "  the same (all three), fused": all_fused,
        }
        rows += [(f"{name}, cuda graph", probes, None, True) for name, probes in recorded.items()]
        # recorded, launches cost nothing, while grouping copies each group's tensors into one
        # stack: with the one-read kernels, per call may read less
        rows += [
            (f"{name}, cuda graph, per call", probes, False, True)
            for name, probes in recorded.items()
            if not name.startswith(" ")
        ]
    # the eager statistics with the one-read kernels off (torch's formulas), in the same process:
    # numba's on the CPU, Triton's on a CUDA device (probe.probes.onepass, onepass_cuda)
    rows += [
        (f"{name}, torch's formulas", probes, *how, _FORMULAS_OFF)
        for name, probes, *how in list(rows)
        if name.startswith(("ResidualNorms + ChannelStats", "all three"))
    ]
    for name, probes, *how in rows:
        grads = any(p.needs_grad for p in probes)
        off = bool(how) and how[-1] is _FORMULAS_OFF
        how = how[:-1] if off else how
        opened = functools.partial(session, probes, *(how or [None]))
        report(
            name, _formulas_off(opened) if off else opened, forward_backward if grads else forward
        )
    if cuda:  # the unprobed passes recorded as graphs: the device's own time
        inp = x.detach().requires_grad_(True)

        def forward_step():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                model(x)

        def input_grad_step():
            with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                loss = F.cross_entropy(model(inp).float(), y, reduction="sum")
            torch.autograd.grad(loss, [inp])

        for name, step in (("forward", forward_step), ("forward + gradient", input_grad_step)):
            wall, _ = _times(graphed(step), args.repeats, dev)
            print(f"unprobed {name}, recorded as a graph: {wall:8.2f} ms", flush=True)


if __name__ == "__main__":
    main()
