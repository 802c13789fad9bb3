"""What reading residual sites at the add costs, against an unprobed pass and against module
adapters, side by side in one run.

The same zoo ResNet is captured twice with ``probe.ResidualNorms``: through its registered
adapter (hooks on the branch and shortcut modules) and through the site tracer (the adapter
removed for the run, so the sites are found by tracing the add). Also a hand-built transformer
(two sites per block). Prints median ms per batch and the ratios.

Usage: python -m benchmarks.bench_sites [--batch 128] [--depth 56]
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

import probe
from benchmarks.common import device, header, median_ms
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=56)
    args = ap.parse_args()
    dev = device()
    header("residual sites: tracer vs adapters vs unprobed")
    model = probe.zoo.create(f"resnet{args.depth}").to(dev).eval()
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.zeros(args.batch, dtype=torch.long, device=dev)

    def unprobed():
        with torch.no_grad():
            model(x)

    def probed(session):
        return lambda: session.run_batch(x, y)

    base = median_ms(unprobed)
    with probe.HookSession(model, "auto", [probe.ResidualNorms()]) as s:
        adapter = median_ms(probed(s))
    with (
        without_adapter("probe.zoo.cifar_resnet.BasicBlock"),
        probe.HookSession(model, "auto", [probe.ResidualNorms()]) as s,
    ):
        traced = median_ms(probed(s))
        n_sites = len(s.layers)
    print(f"resnet{args.depth} batch {args.batch}: {n_sites} sites")
    print(f"  unprobed forward   {base:8.2f} ms")
    print(f"  adapter hooks      {adapter:8.2f} ms  {adapter / base:.3f}x unprobed")
    print(
        f"  site tracer        {traced:8.2f} ms  {traced / base:.3f}x unprobed, "
        f"{traced / adapter:.3f}x adapter"
    )
    tiny = Tiny().to(dev).eval()
    t = torch.randn(args.batch, 16, 64, device=dev)
    with torch.no_grad():
        base_t = median_ms(lambda: tiny(t))
    with probe.HookSession(tiny, "auto", [probe.ResidualNorms()]) as s:
        traced_t = median_ms(lambda: s.run_batch(t, y))
        n_t = sum(1 for i in s.layers if i.kind == "site")
    print(f"transformer (6 blocks, {n_t} sites), batch {args.batch} x 16 tokens:")
    print(f"  unprobed forward   {base_t:8.2f} ms")
    print(f"  site tracer        {traced_t:8.2f} ms  {traced_t / base_t:.3f}x unprobed")


if __name__ == "__main__":
    main()
