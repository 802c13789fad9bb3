"""The CUDA statistics' Triton kernels alone: GPU time per block against torch's formulas and
against the floor of reading the block's tensors once.

For each block shape of a ResNet-56 at batch 512 (bf16, channel-first and channels-last maps),
``probe.probes.onepass_cuda.block_sums`` (the kernels) and the same statistics by torch's formulas
(``RESPROBE_ONEPASS=0``: ``_block_quantities`` and two ``channel_moments``) are each recorded as a
CUDA graph of ``--calls`` calls and replayed, so that only the device's time counts. The floor is
a copy of the same three tensors (a read and a write each, so its bytes are twice the kernels'):
kernels' GB/s = bytes read / time, copy GB/s = bytes moved / time. Then the kernels at other tiles
and warps (``--tiles``, ``--warps``), the numbers checked against the default's.

Usage: python -m benchmarks.bench_onepass_cuda [--batch 512] [--calls 20] [--repeats 20]
       TRITON_INTERPRET=1 python -m benchmarks.bench_onepass_cuda --smoke   (CPU: runs, no timing)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics as stats
from collections.abc import Callable

import torch

from benchmarks.common import graphed, header, one_read_kernels_off, seconds
from probe.probes import onepass_cuda
from probe.probes.statistics import (
    _block_quantities,
    channel_moments,
    per_sample_norm,
)

# ResNet-56's block maps at CIFAR size: (channels, height, width) of its three stages
SHAPES = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def _replayed_ms(step: Callable[[], object], calls: int, repeats: int, cuda: bool) -> float:
    """Median milliseconds of one ``step``: ``calls`` of it recorded as one graph and replayed
    (on the CPU, called; for the smoke run only)."""

    def many():
        for _ in range(calls):
            step()

    run = graphed(many) if cuda else many
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        times.append(seconds(run, cuda) * 1e3 / calls)
    return stats.median(times)


def _torchs(f: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
    norms = tuple(per_sample_norm(t) for t in (s, f, s, y))
    _block_quantities(s, f, s, y, norms)
    channel_moments(y)
    channel_moments(f)


@contextlib.contextmanager
def _tiled(tile: int, warps: int):
    kept = onepass_cuda._TILE, onepass_cuda._WARPS
    onepass_cuda._TILE, onepass_cuda._WARPS = tile, warps
    try:
        yield
    finally:
        onepass_cuda._TILE, onepass_cuda._WARPS = kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tiles", default="1024,2048,4096")
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, interpreted")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not onepass_cuda._interpreted():
        raise SystemExit("needs a CUDA device, or --smoke with TRITON_INTERPRET=1 set")
    dev = torch.device("cuda" if cuda else "cpu")
    batch, calls, repeats = (args.batch, args.calls, args.repeats) if cuda else (2, 1, 1)
    shapes = SHAPES if cuda else [(3, 4, 4)]
    header(f"the CUDA statistics' kernels, ResNet-56 block maps, batch {batch}, bf16")
    print(
        f"{'map':>22s} {'layout':>13s} {'kernels ms':>11s} {'GB/s':>7s} {'copy GB/s':>10s} "
        f"{'torch ms':>9s} {'torch/kernels':>14s}"
    )
    g = torch.Generator(device=dev).manual_seed(0)
    for c, h, w in shapes:
        for layout in ("channel-first", "channels-last"):
            maps = [
                torch.randn(batch, c, h, w, generator=g, device=dev).to(torch.bfloat16)
                for _ in range(3)
            ]
            if layout == "channels-last":
                maps = [t.contiguous(memory_format=torch.channels_last) for t in maps]
            _report(maps, f"{str((batch, c, h, w)):>22s} {layout:>13s}", args, calls, repeats, cuda)


def _report(
    maps: list[torch.Tensor], label: str, args: argparse.Namespace, calls: int, repeats: int,
    cuda: bool,
) -> None:  # fmt: skip
    """One block map's row: the kernels, a copy and torch's formulas, then the tile sweep."""
    f, s, y = maps
    found = onepass_cuda.block_sums(f, s, y, 1)
    if found is None:
        raise SystemExit("the kernels did not serve the block (see the warning above)")

    def kernels() -> object:
        return onepass_cuda.block_sums(f, s, y, 1)

    copies = [torch.empty_like(t) for t in maps]
    kernel = _replayed_ms(kernels, calls, repeats, cuda)
    copy = _replayed_ms(lambda: [o.copy_(t) for o, t in zip(copies, maps)], calls, repeats, cuda)
    with one_read_kernels_off():
        formulas = _replayed_ms(lambda: _torchs(f, s, y), calls, repeats, cuda)
    read = sum(t.numel() * t.element_size() for t in maps)
    print(
        f"{label} {kernel:11.4f} {read / kernel / 1e6:7.0f} {2 * read / copy / 1e6:10.0f} "
        f"{formulas:9.4f} {formulas / kernel:14.1f}",
        flush=True,
    )
    for tile in (int(v) for v in args.tiles.split(",")):
        for warps in (int(v) for v in args.warps.split(",")):
            with _tiled(tile, warps):
                other = kernels()
                same = all(
                    torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
                    for part, ref in zip(other, found)
                    for a, b in zip(part, ref)
                )
                ms = _replayed_ms(kernels, calls, repeats, cuda)
            print(
                f"{'':>36s}   tile {tile:5d}, {warps:2d} warps: {ms:8.4f} ms "
                f"{read / ms / 1e6:7.0f} GB/s{'' if same else '  NUMBERS DIFFER'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
