"""``probe analyze``."""

from __future__ import annotations

import click

__all__ = ["COMMANDS"]


@click.command("analyze")
@click.argument("captures", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Directory for figures and CSVs."
)
@click.option(
    "--lesions/--no-lesions",
    default=True,
    show_default=True,
    help="Delete blocks of the captured checkpoints and re-measure test error.",
)
@click.option("--device", default="cpu", show_default=True)
def analyze_cmd(captures, out, lesions, device):
    """Compute every applicable measure for CAPTURES and write figures (PNG + SVG) and CSVs."""
    from analyses import analyze

    res = analyze(
        list(captures),
        out,
        lesions=lesions,
        device=device,
        progress=lambda m: click.echo(m, err=True),
    )
    figs = sorted({p.stem for p in res.files if p.suffix == ".png"})
    noun = "figure" if len(figs) == 1 else "figures"
    click.echo(f"{len(res.table)} measure rows; {len(figs)} {noun} in {out}: {', '.join(figs)}")
    for name, why in res.skipped.items():
        click.echo(f"skipped {name}: {why}")
    if res.earlier:
        n, names = len(res.earlier), ", ".join(p.stem for p in res.earlier)
        click.echo(
            f"note: {out} also holds {n} {'figure' if n == 1 else 'figures'} of an earlier "
            f"analysis, not of these captures: {names}. Use an empty --out to keep analyses apart."
        )


COMMANDS = [analyze_cmd]
