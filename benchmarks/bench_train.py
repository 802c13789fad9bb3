"""Seconds per epoch of the trainer for ResNet-56 (He et al. CIFAR net) at batch 512, one run per
way of executing the steps, side by side, from the same seed and data.

Usage:
    python -m benchmarks.bench_train [--data PATH_OR_NAME] [--epochs 3] [--modes eager,graph]
Modes: ``eager``; ``graph`` (``--cuda-graph``: forward + backward replayed as CUDA graphs);
``compile`` and ``reduce-overhead`` (torch.compile modes; the first epoch pays the compilation).
Without --data it trains on synthetic CIFAR-shaped data (50,000 images), which costs the same per
epoch. GPU target: <= 0.7 s/epoch (a naive eager loop measured 2.9 s/epoch on an H100).
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
        "--modes",
        default="eager,graph" if torch.cuda.is_available() else "eager",
        help="comma-separated: eager, graph, compile, reduce-overhead",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the inputs")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(_MODES))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; allowed: {', '.join(_MODES)}")
    header(f"trainer speed: {args.model}, batch {args.batch_size}, modes {', '.join(modes)}")
    data = load_dataset(args.data) if args.data else synthetic()
    data = data.subset(args.limit)
    print(f"images/epoch {len(data.y_train)}")
    steady = {}
    for mode in modes:
        torch.manual_seed(args.seed)  # the same model, inputs and sample order in every mode
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                model=args.model,
                dataset=args.data or "synthetic",
                recipe="fast",
                save_at="last",
                out=tmp,
                recipe_overrides={"epochs": args.epochs, "batch_size": args.batch_size},
                device=str(device()),
                seed=args.seed,
                **_MODES[mode],
            )
            res = train(cfg, data=data)
        secs = [h["seconds"] for h in res.history if "seconds" in h]
        steady[mode] = float(np.median(secs[1:] or secs))
        ratio = f" ({steady[mode] / steady[modes[0]]:.2f}x {modes[0]})" if mode != modes[0] else ""
        print(
            f"{mode:16s} s/epoch: first {secs[0]:6.2f} (includes warm-up/recording/compile), "
            f"steady median {steady[mode]:.2f}{ratio}; final train error "
            f"{res.final['train_error']:.4f}, batch loss of the last epoch "
            f"{res.history[-1]['batch_loss']:.4f}"
        )


_MODES = {
    "eager": {},
    "graph": {"cuda_graph": True},
    "compile": {"compile": True},
    "reduce-overhead": {"compile": True, "compile_mode": "reduce-overhead"},
}


if __name__ == "__main__":
    main()
