"""Seconds per epoch of the trainer for ResNet-56 (He et al. CIFAR net) at batch 512.

Usage:
    python benchmarks/bench_train.py [--data PATH_OR_NAME] [--epochs 3] [--compile-mode none|default|reduce-overhead]
Without --data it trains on synthetic CIFAR-shaped data (50,000 images), which costs the same per
epoch. On the GPU the target is <= 1.0 s/epoch (a naive eager loop measured 2.9 s/epoch on an H100).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from benchmarks.common import device, header
from probe.data import ImageArrays, load_dataset
from probe.train import TrainConfig, train


def synthetic(n: int = 50_000) -> ImageArrays:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return ImageArrays(
        "synthetic-cifar",
        x,
        rng.integers(0, 10, n),
        x[:1000],
        rng.integers(0, 10, 1000),
        [str(i) for i in range(10)],
        augment=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only this many training images (CPU smoke runs)",
    )
    ap.add_argument(
        "--compile-mode",
        default="none",
        choices=["none", "default", "reduce-overhead", "max-autotune"],
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the inputs")
    args = ap.parse_args()
    torch.manual_seed(args.seed)  # the same model, inputs and sample on every run
    header(f"trainer speed: {args.model}, batch {args.batch_size}, compile={args.compile_mode}")
    data = load_dataset(args.data) if args.data else synthetic()
    data = data.subset(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            model=args.model,
            dataset=args.data or "synthetic",
            recipe="fast",
            save_at="last",
            out=tmp,
            recipe_overrides={"epochs": args.epochs, "batch_size": args.batch_size},
            device=str(device()),
            compile=args.compile_mode != "none",
            compile_mode=None if args.compile_mode in ("none", "default") else args.compile_mode,
        )
        res = train(cfg, data=data)
    secs = [h["seconds"] for h in res.history if "seconds" in h]
    steady = secs[1:] or secs
    print(
        f"images/epoch {len(data.y_train)}; s/epoch: first {secs[0]:.2f} (includes warm-up/compile), "
        f"steady median {float(np.median(steady)):.2f}"
    )
    print(f"final train error {res.final['train_error']:.4f}")


if __name__ == "__main__":
    main()
