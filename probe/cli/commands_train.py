"""``probe train`` and ``probe models``."""

from __future__ import annotations

import click

from probe.cli.options import parse_overrides
from probe.cli.progress import say, train_callback
from probe.errors import ProbeError

__all__ = ["COMMANDS"]


@click.command("train")
@click.option(
    "--model",
    "-m",
    default="plain20",
    show_default=True,
    help="Registry name, e.g. resnet56, plain20.",
)
@click.option(
    "--data",
    "dataset",
    default="digits",
    show_default=True,
    help="digits, cifar10, cifar100, or a path to an image tree / .tar.gz.",
)
@click.option(
    "--train-limit",
    type=click.IntRange(min=1),
    default=None,
    help="Train on the first N training images only (e.g. CIFAR-10 on a CPU).",
)
@click.option("--recipe", default="digits", show_default=True, help="he2016, fast or digits.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option(
    "--epochs",
    type=click.IntRange(min=0),
    default=None,
    help="Override the recipe's number of epochs (0: only the initialisation checkpoint).",
)
@click.option(
    "--save-at",
    default="0,last",
    show_default=True,
    help="Epochs to checkpoint, e.g. 0,1,5,20,last.",
)
@click.option(
    "--eval-at",
    default="",
    help="Extra epochs with eval-mode train/test metrics but no checkpoint, e.g. all.",
)
@click.option(
    "--init",
    default="he",
    show_default=True,
    help="he, dirac, identity (every block the identity at step 0), or construct:CHECKPOINT "
    "(a trained shallower net copied in, extra blocks identities; docs/training.md).",
)
@click.option(
    "--opt",
    "model_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Model option (shortcut=B, zero_init=true, width=8, shortcut_scale=0.5).",
)
@click.option(
    "--set",
    "recipe_sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Recipe override (lr=0.05, batch_size=256).",
)
@click.option(
    "--out", default="", help="Run directory (default data/runs/<model>-<data>-<recipe>-s<seed>)."
)
@click.option("--device", default="auto", show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option(
    "--compile-mode",
    default=None,
    type=click.Choice(["default", "reduce-overhead", "max-autotune"]),
    help="torch.compile mode (reduce-overhead uses CUDA graphs); implies --compile.",
)
@click.option(
    "--cuda-graph",
    is_flag=True,
    help="On one CUDA GPU: replay each full batch's forward and backward as CUDA graphs "
    "(same kernels, less CPU time per step; see docs/performance.md).",
)
@click.option(
    "--sync-bn",
    is_flag=True,
    help="Under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm) "
    "instead of each rank's part.",
)
def train_cmd(
    model,
    dataset,
    train_limit,
    recipe,
    seed,
    epochs,
    save_at,
    eval_at,
    init,
    model_opts,
    recipe_sets,
    out,
    device,
    compile_,
    compile_mode,
    cuda_graph,
    sync_bn,
):
    """Train a zoo model; an interrupted run resumes from its last epoch."""
    from probe.train import TrainConfig, train

    overrides = parse_overrides(recipe_sets, "--set")
    if epochs is not None:
        overrides["epochs"] = epochs
    cfg = TrainConfig(
        model=model,
        dataset=dataset,
        train_limit=train_limit,
        recipe=recipe,
        seed=seed,
        model_options=parse_overrides(model_opts, "--opt"),
        recipe_overrides=overrides,
        save_at=save_at,
        eval_at=eval_at,
        init=init,
        out=out,
        device=device,
        compile=compile_ or compile_mode is not None,
        compile_mode=None if compile_mode in (None, "default") else compile_mode,
        cuda_graph=cuda_graph,
        sync_bn=sync_bn,
    )
    result = train(cfg, callback=train_callback(f"train {model}"))
    f = result.final
    if result.resumed_from is not None:
        say(f"resumed after epoch {result.resumed_from}")
    ranks = f.get("ranks", 1) if isinstance(f, dict) else 1
    say(
        f"{model} seed {seed}: train error {f['train_error']:.4f} (loss {f['train_loss']:.4f}), "
        f"test error {f['test_error']:.4f} after {f['epoch']} epochs in {result.wall_s:.1f} s"
        + (f" on {ranks} ranks" if ranks > 1 else "")
    )
    say(f"run directory: {result.run_dir}")
    for epoch, path in result.checkpoints.items():
        say(f"  checkpoint epoch {epoch}: {path}")


@click.command("models")
@click.argument("pattern", default="*")
def models_cmd(pattern):
    """List registered model names matching a glob PATTERN (any depth 6n+2 also works)."""
    from probe.zoo import list_models

    names = list_models(pattern)
    if not names:
        raise ProbeError(
            f"No model matches {pattern!r}; models are family+depth, e.g. 'resnet*', 'plain2*' "
            "(families: plain, resnet, preplain, preresnet). Models of torchvision, timm or a "
            "file of your own are not listed here: capture them with --model torchvision:NAME, "
            "timm:NAME or path/to/file.py:FUNCTION."
        )
    for name in names:
        click.echo(name)


COMMANDS = [train_cmd, models_cmd]
