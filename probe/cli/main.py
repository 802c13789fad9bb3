"""The ``probe`` command line: train, capture, inspect, analyze, study, models.

Each command is a thin shell over one library function. A :class:`ProbeError` becomes a clean
message and exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import click

from probe.errors import ProbeError
from probe.sigterm import Terminated, launched, raise_on_sigterm

__all__ = ["cli"]


class _Group(click.Group):
    """The one error boundary: anticipated failures (ProbeError, an OS error such as a full disk
    or an unwritable path) print their message, anything else one line with a pointer to
    ``--debug``; both exit 1 without a traceback. Under torchrun a failure every rank shares
    (RankFailed) is printed by rank 0 alone; a rank's own failure by that rank, tagged."""

    def invoke(self, ctx: click.Context):
        sigterm = None
        try:
            with raise_on_sigterm() as sigterm:
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Terminated as e:
            raise click.ClickException(_tagged(str(e))) from e
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if sigterm is not None and sigterm.message:  # the signal, come out as another error
                raise click.ClickException(_tagged(sigterm.message)) from e
            group = _process_group()
            if group is not None and isinstance(e, group.RankFailed) and not group.ranks().is_main:
                raise click.exceptions.Exit(1) from e
            raise click.ClickException(_tagged(_one_line(e))) from e
        finally:
            group = _process_group()
            if group is not None:
                group.shutdown()


def _process_group():
    """:mod:`probe.distributed.group` if the command loaded it, else None. Only a command that
    loaded it can have joined a process group or raised its RankFailed; importing it here would
    load torch (~2 s) for every ``--help`` and argument error."""
    return sys.modules.get("probe.distributed.group")


def _tagged(message: str) -> str:
    """``message``, prefixed with this process's rank when it is one of several."""
    group = _process_group()
    r = group.ranks() if group is not None else None
    return f"[rank {r.rank}/{r.world}] {message}" if r is not None and r.world > 1 else message


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Deprecation notices raised inside other packages (torch, torchvision) are for their
    # maintainers, not for someone running a capture: shown with --debug only.
    if issubclass(category, (DeprecationWarning, FutureWarning)) and not str(filename).startswith(
        _PACKAGE
    ):
        return
    click.echo(f"warning: {message}", err=True)


def _one_line(e: Exception) -> str:
    if isinstance(e, ProbeError):
        return str(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return f"{e.strerror or e}{where}. Check the path, its permissions and the free disk space."
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (
        f"unexpected {type(e).__name__}: {first[:300]} -- run with --debug for the traceback, "
        "and please report it."
    )


# Commands that run models: they get a thread count and say which.
_COMPUTE = {"train", "capture", "analyze", "study"}
# Commands that run on the ranks torchrun starts (docs/distributed.md); the others run once.
_DISTRIBUTED = {"train", "capture", "study"}


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option(
    "--threads",
    default="auto",
    show_default=True,
    help="CPU threads for torch: a number, or auto = the cores not busy with other processes.",
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Deterministic kernels (bit-identical reruns at the same thread count); recorded.",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int, threads: str, deterministic: bool) -> None:
    """resprobe: measure why deep plain networks degrade and residual networks do not."""
    ctx.obj = {"debug": debug, "threads": threads, "deterministic": deterministic}
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # library warnings as one line each, without the source line they came from
        warnings.showwarning = _show_warning
    if launched() and ctx.invoked_subcommand not in _DISTRIBUTED:
        raise ProbeError(
            f"probe {ctx.invoked_subcommand} runs in one process; start it without torchrun "
            f"(torchrun runs {', '.join(sorted(_DISTRIBUTED))})."
        )


def _prepare_compute(settings: dict) -> None:
    """Join torchrun's process group and set torch's threads: what a command that runs models
    needs, done once its own arguments are parsed, so that ``--help`` and argument errors answer
    without loading torch."""
    from probe.distributed import init_from_env
    from probe.runtime import available_cores, configure, tune_allocator

    ranks = init_from_env() if launched() else None
    tune_allocator()  # reuse freed tensor memory instead of page-faulting it in again
    share = ranks.local_world if ranks else 1
    try:
        n = configure(settings["threads"], settings["deterministic"], processes=share)
    except ProbeError as e:
        raise click.BadParameter(str(e), param_hint="--threads") from e
    where = f" per rank ({share} ranks on this node)" if share > 1 else ""
    if ranks is None or ranks.is_main:
        click.echo(
            f"using {n} CPU thread{'s' * (n != 1)}{where} of {available_cores()} cores"
            f"{' (deterministic)' if settings['deterministic'] else ''}; --threads N to change",
            err=True,
        )


def _computing(callback: Callable) -> Callable:
    """``callback`` (a command's body) preceded by :func:`_prepare_compute`."""

    @functools.wraps(callback)
    def run(*args, **kwargs):
        _prepare_compute(click.get_current_context().find_root().obj)
        return callback(*args, **kwargs)

    return run


def _register() -> None:
    from probe.cli import commands_analyze, commands_capture, commands_study, commands_train

    for module in (commands_train, commands_capture, commands_analyze, commands_study):
        for command in module.COMMANDS:
            if command.name in _COMPUTE:
                command.callback = _computing(command.callback)
            cli.add_command(command)


_register()
