"""What reading residual sites at the add costs, against an unprobed pass and against module
adapters, side by side in one run.

The same zoo ResNet is captured with ``probe.ResidualNorms`` through its registered adapter
(hooks on the branch and shortcut modules) and through the site tracer (the adapter removed
while the session finds its sites), each session on its own copy of the model, beside an
unprobed copy; also a hand-built transformer (two sites per block). The methods run in turns,
one pass each per round in an order that rotates every round, so that the machine's drift falls
on all alike; printed are each method's median ms and the round-by-round ratios with their 95 %
bootstrap intervals. The allocator is tuned as the CLI tunes it: with glibc's default, how the
heap happened to lie moved an unprobed ResNet-56 pass by ~2 x (docs/performance.md).

Usage: python -m benchmarks.bench_sites [--batch 128] [--depth 56] [--rounds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics

import torch
from torch import nn

import probe
import probe.runtime
from benchmarks.common import device, header, in_turns
from benchmarks.compare import ratio_ci
from probe.hooks import residual


@contextlib.contextmanager
def without_adapter(key: str):
    saved = residual._ADAPTERS.pop(key)
    try:
        yield
    finally:
        residual._ADAPTERS[key] = saved


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Tiny(nn.Module):
    def __init__(self, d: int = 64, depth: int = 6) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d) for _ in range(depth)))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def _report(times: dict[str, list[float]], pairs: list[tuple[str, str]]) -> None:
    for name, ts in times.items():
        print(f"  {name:18s} {statistics.median(ts) * 1e3:8.2f} ms")
    for a, b in pairs:
        med, lo, hi = ratio_ci(times[a], times[b])
        print(f"  {a} / {b}: {med:.3f} [{lo:.3f}, {hi:.3f}] (round by round, 95 %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if args.rounds < 2:  # a round-by-round interval needs two rounds
        ap.error(f"--rounds must be at least 2; got {args.rounds}.")
    probe.runtime.tune_allocator()  # as the CLI runs
    dev = device()
    header("residual sites: tracer vs adapters vs unprobed")
    model = probe.zoo.create(f"resnet{args.depth}").to(dev).eval()
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.zeros(args.batch, dtype=torch.long, device=dev)
    tiny = Tiny().to(dev).eval()
    t = torch.randn(args.batch, 16, 64, device=dev)
    with contextlib.ExitStack() as stack:
        adapter = stack.enter_context(
            probe.HookSession(copy.deepcopy(model), "auto", [probe.ResidualNorms()])
        )
        with without_adapter("probe.zoo.cifar_resnet.BasicBlock"):
            # made, entered and run once with the adapter away: its first batch finds the sites
            tracer = stack.enter_context(
                probe.HookSession(copy.deepcopy(model), "auto", [probe.ResidualNorms()])
            )
            tracer.run_batch(x, y)
        tiny_tracer = stack.enter_context(
            probe.HookSession(copy.deepcopy(tiny), "auto", [probe.ResidualNorms()])
        )
        tiny_tracer.run_batch(t, y)
        n_sites, n_tiny = (sum(i.kind == "site" for i in s.layers) for s in (tracer, tiny_tracer))

        def unprobed(net, inputs):
            def run():
                with torch.no_grad():
                    net(inputs)

            return run

        print(f"resnet{args.depth} batch {args.batch}: {n_sites} sites, {args.rounds} rounds")
        times = in_turns(
            {
                "unprobed forward": unprobed(model, x),
                "adapter hooks": lambda: adapter.run_batch(x, y),
                "site tracer": lambda: tracer.run_batch(x, y),
            },
            args.rounds,
        )
        _report(
            times,
            [
                ("adapter hooks", "unprobed forward"),
                ("site tracer", "unprobed forward"),
                ("site tracer", "adapter hooks"),
            ],
        )
        print(f"transformer (6 blocks, {n_tiny} sites), batch {args.batch} x 16 tokens:")
        times = in_turns(
            {
                "unprobed forward": unprobed(tiny, t),
                "site tracer": lambda: tiny_tracer.run_batch(t, y),
            },
            args.rounds,
        )
        _report(times, [("site tracer", "unprobed forward")])


if __name__ == "__main__":
    main()
