"""How far the largest stochastic-Lanczos node falls below sigma_max^2, per step count.

For every block of a checkpoint, on the first test images, the exact top squared singular value of
the block Jacobian (``jacrev`` in float64) is compared with the largest SLQ node after k steps.
Prints the median and worst relative underestimate per k.

    python -m benchmarks.slq_bias data/runs/resnet20-digits-digits-s0 --images 4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from probe.jacobian.estimators import exact_jacobian, lanczos_spectrum
from probe.jacobian.segments import chain
from probe.loading import capture_loader, dataset_for, load_for_capture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a run directory or checkpoint .json")
    ap.add_argument("--images", type=int, default=4, help="test images per block")
    ap.add_argument("--steps", default="10,20,40", help="Lanczos step counts to compare")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    model, meta, _ = load_for_capture(args.checkpoint, "cpu")
    model = model.double()
    x = next(
        iter(capture_loader(dataset_for(meta, None), "test", args.images, "cpu", args.images))
    )[0]
    h = x.double()
    gaps: dict[int, list[float]] = {k: [] for k in steps}
    with torch.no_grad():
        for name, part in chain(model)[:-1]:
            if name != "stem":
                exact = torch.linalg.svdvals(exact_jacobian(part, h).detach())[:, 0] ** 2
                for k in steps:
                    gen = torch.Generator().manual_seed(0)
                    nodes, _ = lanczos_spectrum(part, h, steps=k, n_vectors=2, gen=gen)
                    gaps[k] += (1 - nodes.max(1).values / exact).tolist()
            h = part(h)
    print(f"{args.checkpoint}: {len(gaps[steps[0]])} (block, image) pairs")
    print("steps | median underestimate | worst underestimate")
    for k in steps:
        g = np.array(gaps[k])
        print(f"{k:5d} | {100 * np.median(g):19.2f} % | {100 * g.max():18.2f} %")


if __name__ == "__main__":
    main()
