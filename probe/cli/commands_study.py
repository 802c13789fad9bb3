"""``probe study``: the main job."""

from __future__ import annotations

import click

from probe.cli.options import parse_overrides
from probe.cli.progress import train_callback

__all__ = ["COMMANDS"]


@click.command("study")
@click.option(
    "--preset",
    default="default",
    show_default=True,
    help="default (offline digits, CPU), interventions (every intervention arm on digits) or "
    "he2016 (CIFAR-10, GPU).",
)
@click.option(
    "--arm",
    "arms",
    default=None,
    metavar="ARM[,ARM...]",
    help="Intervention arms to run beside the grid: constructed, skipinit, shortcut_scale, lr, "
    "matched_loss, toy, or all (docs/study.md).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override any preset field, e.g. depths=8,20,32 seeds=0,1,2 recipe=fast capture_limit=500.",
)
@click.option("--data", "dataset", default=None, help="Dataset override (name or path).")
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Study directory (default data/studies/<preset>).",
)
@click.option("--device", default=None, help="auto, cpu, cuda ...")
@click.option(
    "--cuda-graph",
    is_flag=True,
    help="On one CUDA GPU: train with each full batch's forward and backward replayed as CUDA "
    "graphs (docs/training.md).",
)
def study_cmd(preset, sets, dataset, out, device, arms, cuda_graph):
    """Train plain and residual nets, capture along training, analyse and write a report.

    An interrupted study continues where it stopped; finished work is not recomputed.
    """
    from probe.study import get_preset, run_study

    overrides = parse_overrides(sets, "--set")
    if dataset:
        overrides["dataset"] = dataset
    if device:
        overrides["device"] = device
    if arms:
        overrides["arms"] = arms
    if cuda_graph:
        overrides["cuda_graph"] = True
    from probe.distributed import ranks

    cfg = get_preset(preset, **overrides)
    draw_training = train_callback("  train")
    r = ranks()
    tag = f"[rank {r.rank}/{r.world}] " if r.world > 1 else ""

    def cb(event, info):
        if event == "stage":  # every rank says what it works on
            click.echo(f"· {tag}{info['text']}", err=True)
        else:  # trainer events: one progress bar per training run (rank 0's)
            draw_training(event, info)

    res = run_study(cfg, out, callback=cb)
    if res is None:  # another rank than 0: rank 0 reports
        return
    t = res.timings
    parts = ["train", "interventions", "capture", "analysis", "figures"]
    click.echo(
        f"\nstudy '{cfg.name}' finished in {res.wall_s:.0f} s ("
        + ", ".join(f"{k} {t[k]:.0f} s" for k in parts if k in t)
        + ")"
    )
    click.echo("\ndegradation (final training error, eval mode; mean over seeds):")
    for r in res.degradation.itertuples():
        click.echo(
            f"  {r.family:>10s}-{r.depth:<4d} train {100 * r.train_error:6.2f}%   test {100 * r.test_error:6.2f}%"
        )
    click.echo("\nverdicts:")
    for v in res.verdicts:
        click.echo(f"  {v.verdict:>14s}  {v.explanation}")
    if res.arm_verdicts:
        click.echo("\ninterventions:")
        for v in res.arm_verdicts:
            click.echo(f"  {v.verdict:>14s}  {v.explanation}")
    click.echo(f"\nreport: {res.report}\nsummary: {res.summary}")


COMMANDS = [study_cmd]
