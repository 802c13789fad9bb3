"""Seconds per epoch of the trainer for ResNet-56 (He et al. CIFAR net) at batch 512, one run per
way of executing the steps, side by side, from the same seed and data.

Usage:
    python -m benchmarks.bench_train [--data PATH_OR_NAME] [--epochs 3] [--modes eager,graph]
        [--repeats 3]
Modes: ``eager``; ``graph`` (``--cuda-graph``: forward + backward replayed as CUDA graphs);
``compile`` and ``reduce-overhead`` (torch.compile modes; the first epoch pays the compilation);
``minimal`` and ``minimal-noaug``: a minimal hand-written loop on the same data, with and without
the trainer's crops and flips, against which the trainer's own cost is read. The allocator is
tuned as ``probe train`` tunes it. With ``--repeats R`` every mode runs R times, in turns whose
order rotates each repeat (no mode always runs after the same one, so a machine that drifts
favours none), and each mode's steady s/epoch is given against the first mode's, repeat by
repeat, with a 95 % interval.
Without --data it trains on synthetic CIFAR-shaped data (50,000 images), which costs the same per
epoch. GPU target: <= 0.7 s/epoch (a naive eager loop measured 2.9 s/epoch on an H100).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import probe.runtime
from benchmarks.common import device, header, rotations
from probe.data import DeviceLoader, ImageArrays, load_dataset
from probe.train import TrainConfig, TrainResult, get_recipe, train
from probe.zoo import create, parse_name


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
        help="comma-separated: eager, graph, compile, reduce-overhead; minimal, minimal-noaug "
        "(a hand-written loop, with and without the trainer's augmentation)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the inputs")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every mode, in turns whose order rotates each repeat; from 2 on, each "
        "mode against the first, repeat by repeat, with a 95%% interval",
    )
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(_MODES))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; allowed: {', '.join(_MODES)}")
    if not modes or len(set(modes)) != len(modes):
        ap.error(f"--modes must name each mode once; got {args.modes!r}")
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1; got {args.repeats}")
    # as `probe train` runs: with glibc's default the heap's trimming made CPU passes page-fault
    # their activations in again, by how the heap happened to lie (docs/performance.md)
    probe.runtime.tune_allocator()
    header(f"trainer speed: {args.model}, batch {args.batch_size}, modes {', '.join(modes)}")
    data = load_dataset(args.data) if args.data else synthetic()
    data = data.subset(args.limit)
    print(f"images/epoch {len(data.y_train)}")
    steady = steady_in_turns(args, data, modes)
    if args.repeats > 1 and len(modes) > 1:
        from benchmarks.compare import ratio_ci

        print(f"steady s/epoch against {modes[0]}, repeat by repeat (median [95 %]):")
        for mode in modes[1:]:
            med, lo, hi = ratio_ci(steady[mode], steady[modes[0]])
            print(f"{mode:16s} {med:.3f} [{lo:.3f}, {hi:.3f}]")


def steady_in_turns(
    args: argparse.Namespace, data: ImageArrays, modes: list[str]
) -> dict[str, list]:
    """Each mode's steady seconds per epoch (the median past the first epoch), once per repeat,
    the modes run in an order that rotates every repeat; each run printed as it ends."""
    steady: dict[str, list[float]] = {mode: [] for mode in modes}
    for r, order in rotations(modes, args.repeats):
        for mode in order:
            torch.manual_seed(args.seed)  # the same model, inputs and sample order in every mode
            secs, first, outcome = run_mode(args, data, mode)
            steady[mode].append(float(np.median(secs[1:] or secs)))
            if args.repeats == 1 and mode != modes[0]:
                outcome = f"{steady[mode][-1] / steady[modes[0]][-1]:.2f}x {modes[0]}; {outcome}"
            turn = f"repeat {r + 1}: " if args.repeats > 1 else ""
            print(
                f"{turn}{mode:16s} s/epoch: first {secs[0]:6.2f}{first}, steady median "
                f"{steady[mode][-1]:.2f}; {outcome}"
            )
    return steady


def run_mode(args: argparse.Namespace, data: ImageArrays, mode: str) -> tuple[list, str, str]:
    """One run of ``mode``: (seconds per epoch, a note on the first epoch, its outcome)."""
    if mode.startswith("minimal"):
        secs, loss = minimal_loop(args, data, augment=mode == "minimal")
        return secs, "", f"loss of the last batch {loss:.4f}"
    res = trainer_run(args, data, mode)
    secs = [h["seconds"] for h in res.history if "seconds" in h]
    outcome = (
        f"final train error {res.final['train_error']:.4f}, batch loss of the last epoch "
        f"{res.history[-1]['batch_loss']:.4f}"
    )
    return secs, " (includes warm-up/recording/compile)", outcome


def trainer_run(args: argparse.Namespace, data: ImageArrays, mode: str) -> TrainResult:
    """The trainer in ``mode`` (``_MODES``), the fast recipe, in a throw-away run directory."""
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
        return train(cfg, data=data)


def minimal_loop(args: argparse.Namespace, data: ImageArrays, augment: bool) -> tuple[list, float]:
    """The loop a researcher would write by hand: the same model, data, batch size, optimizer
    settings and precision, none of the trainer's schedule, bookkeeping or checkpoints. With
    ``augment`` it draws batches from the trainer's loader (the same crops and flips); without,
    from the normalised images in a random order. Returns seconds per epoch, last batch's loss."""
    dev, cuda = device(), device().type == "cuda"
    recipe = get_recipe(
        "fast", depth=parse_name(args.model)[1], epochs=args.epochs, batch_size=args.batch_size
    )
    model = create(args.model, num_classes=data.num_classes, in_channels=data.image_shape[0])
    model = model.to(dev, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )
    kw = dict(mean=data.mean, std=data.std, device=dev, channels_last=cuda, seed=args.seed)
    loader = DeviceLoader(
        data.x_train, data.y_train, args.batch_size, shuffle=True, augment=data.augment, **kw
    )
    x_all = torch.cat([x for x, _, _ in DeviceLoader(data.x_train, data.y_train, 4096, **kw)])
    y_all = loader.labels
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda
        else torch.autocast("cpu", enabled=False)
    )
    secs, loss = [], torch.zeros(())
    for epoch in range(1, args.epochs + 1):
        model.train()
        if augment:
            loader.set_epoch(epoch)
            batches = ((x, y) for x, y, _ in loader)
        else:
            order = torch.randperm(len(y_all), device=dev)
            batches = (
                (x_all[order[i : i + args.batch_size]], y_all[order[i : i + args.batch_size]])
                for i in range(0, len(y_all), args.batch_size)
            )
        t0 = time.perf_counter()
        for x, y in batches:
            with autocast:
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        last = loss.item()  # waits for the epoch's last step, as the trainer's record does
        secs.append(time.perf_counter() - t0)
    return secs, last


_MODES = {
    "eager": {},
    "graph": {"cuda_graph": True},
    "compile": {"compile": True},
    "reduce-overhead": {"compile": True, "compile_mode": "reduce-overhead"},
    "minimal": None,  # minimal_loop, with the trainer's augmentation
    "minimal-noaug": None,  # minimal_loop, normalised images only
}


if __name__ == "__main__":
    main()
