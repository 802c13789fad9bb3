"""The ``probe`` command line: train, capture, inspect, analyze, study, models.

Each command is a thin shell over one library function. A :class:`ProbeError` becomes a clean
message and exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging

import click

from probe.errors import ProbeError

__all__ = ["cli"]


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ProbeError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """resprobe: measure why deep plain networks degrade and residual networks do not."""
    ctx.obj = {"debug": debug}
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from probe.cli import commands_analyze, commands_capture, commands_study, commands_train

    for module in (commands_train, commands_capture, commands_analyze, commands_study):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()
