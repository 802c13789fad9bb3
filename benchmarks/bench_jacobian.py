"""Cost of the Jacobian estimators on a ResNet-56 first-stage block (d = 16 x 32 x 32 = 16384).

Prints per-sample milliseconds for: the bare ``vmap(jvp)`` Hutchinson estimate of ||J - I||_F^2 (the
reference figure), resprobe's ``hutchinson`` (||J||^2, ||J - P||^2, tr J with standard errors), and an
exact ``jacrev`` Jacobian of one sample; then the wall time of the ``jacobian`` probe swept over all
27 blocks of ResNet-56 on N images. The bare estimate and resprobe's run in turns, one call each
per round (``--repeats`` rounds), so that their ratio is taken round by round, with its 95 %
bootstrap interval; the allocator is tuned as the CLI tunes it.

Usage: python -m benchmarks.bench_jacobian [--batch 64] [--probes 16] [--images 1000] [--width 16]
GPU targets (H100): ||J - P||^2 within 1.2x of 0.047 ms/sample, >= 300x faster than jacrev per
sample, the 27-block sweep on 1000 images in <= 30 s. On a CPU use a smaller --width/--images.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import jacrev, jvp, vmap

import probe
import probe.runtime
from benchmarks.common import device, header, in_turns, median_ms
from benchmarks.compare import ratio_ci
from probe.jacobian import JacobianNorms, hutchinson


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--images", type=int, default=1000 if gpu else 64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20 if gpu else 15)
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the inputs")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1; got {args.repeats}.")
    probe.runtime.tune_allocator()  # as the CLI runs
    torch.manual_seed(args.seed)  # the same model, inputs and sample on every run
    dev = device()
    header(
        f"Jacobian estimators, first-stage block, width {args.width}, batch {args.batch}, {args.probes} probes"
    )
    model = probe.zoo.create("resnet56", width=args.width).to(dev).eval()
    block = model.stages[0][1]
    x = torch.randn(args.batch, args.width, 32, 32, device=dev)
    v = torch.randint(0, 2, (args.probes, *x.shape), device=dev).float() * 2 - 1

    @torch.no_grad()
    def bare():
        jv = vmap(lambda t: jvp(block, (x,), (t,))[1], chunk_size=args.probes)(v)
        return (jv - v).pow(2).flatten(2).sum(-1).mean(0)

    @torch.no_grad()
    def ours():
        return hutchinson(
            block, x, args.probes, identity_shortcut=True, chunk_size=args.probes, v=v
        )

    times = in_turns({"bare": bare, "ours": ours}, args.repeats)
    t_bare, t_ours = (statistics.median(times[k]) * 1e3 / args.batch for k in ("bare", "ours"))
    x1 = x[:1]
    t_exact = median_ms(lambda: jacrev(lambda z: block(z[None])[0])(x1[0]), repeats=1, warmup=1)
    print(f"bare vmap(jvp) ||J-I||^2       {t_bare:9.4f} ms/sample")
    print(f"resprobe hutchinson (all three) {t_ours:9.4f} ms/sample  ({t_ours / t_bare:.2f}x bare)")
    if args.repeats >= 2:  # an interval needs two rounds
        med, lo, hi = ratio_ci(times["ours"], times["bare"])
        print(f"  resprobe / bare, round by round: {med:.3f} [{lo:.3f}, {hi:.3f}] (95 %)")
    print(
        f"exact jacrev, one sample        {t_exact:9.1f} ms/sample  ({t_exact / t_ours:.0f}x resprobe)"
    )
    with torch.no_grad():
        exact = jacrev(lambda z: block(z[None])[0])(x1[0]).reshape(x1[0].numel(), -1)
        ref = ((exact - torch.eye(exact.shape[0], device=dev)) ** 2).sum().item()
        est = ours()
    print(
        f"sample 0: exact ||J-I||^2 = {ref:.1f}, estimate = {est.dev2[0]:.1f} +- {est.dev2_se[0]:.1f}"
    )

    data = [
        (torch.randn(min(args.batch, args.images - i), 3, 32, 32, device=dev), None)
        for i in range(0, args.images, args.batch)
    ]
    t0 = time.perf_counter()
    probe.capture(
        model,
        [d[0] for d in data],
        probes=[JacobianNorms(n_probes=args.probes, max_samples=None, chunk_size=args.probes)],
    )
    if gpu:
        torch.cuda.synchronize()
    print(f"jacobian probe, all 27 blocks, {args.images} images: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
