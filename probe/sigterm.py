"""SIGTERM as an exception, and whether a launcher started this process as one of several ranks.

torchrun stops every rank when one fails by sending SIGTERM; :func:`raise_on_sigterm` turns it
into :class:`Terminated` so that the process unwinds and deletes its partial files. Kept apart
from :mod:`probe.distributed` (and free of torch) because every command of the CLI runs inside
it, ``--help`` and argument errors included, which should answer without loading torch.

Example:
    >>> with raise_on_sigterm() as seen:
    ...     pass
    >>> seen.message is None, launched()
    (True, False)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "Sigterm",
    "Terminated",
    "env_int",
    "launched",
    "raise_if_terminated",
    "raise_on_sigterm",
]


class Terminated(BaseException):
    """The launcher stopped this process (SIGTERM), usually because another rank failed.

    A BaseException, like KeyboardInterrupt: it unwinds through ``except Exception`` clean-up
    code (partial files are deleted on the way) instead of being handled as a failed step."""


def env_int(name: str, default: int) -> int:
    """An integer the launcher set in the environment (``default`` when unset or not a number).

    Example:
        >>> env_int("RESPROBE_UNSET_VARIABLE", 1)
        1
    """
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process as
    one of several ranks."""
    return "RANK" in os.environ and env_int("WORLD_SIZE", 1) > 1


@dataclass
class Sigterm:
    """What :func:`raise_on_sigterm` saw: ``message`` is set once SIGTERM arrived."""

    message: str | None = None


@contextlib.contextmanager
def raise_on_sigterm() -> Iterator[Sigterm]:
    """Turn SIGTERM into :class:`Terminated` while the block runs, so that a process torchrun
    stops (after another rank failed) unwinds and deletes its partial files. Main thread only;
    elsewhere a no-op.

    The exception is raised at whatever line is running. Inside a C callback (h5py's type
    conversions) it can come out as another error, so the yielded :class:`Sigterm` records
    that the signal came, and the caller reports the signal rather than its side effect."""
    seen = Sigterm()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    why = (
        "torchrun stops every rank when one fails; see that rank's error"
        if launched()
        else "partial files were removed"
    )

    def _raise(signum, frame):
        seen.message = f"stopped by SIGTERM ({why})"
        raise Terminated(seen.message)

    previous = signal.signal(signal.SIGTERM, _raise)
    previous_hook = sys.unraisablehook

    def _unraisable(report) -> None:
        # Python drops an exception raised in a weakref callback or a __del__ and prints it
        # with a traceback ("Exception ignored in ..."). Ours is not lost: seen.message keeps
        # it and raise_if_terminated raises it at the next safe point, so nothing is printed.
        if not isinstance(report.exc_value, Terminated):
            previous_hook(report)

    sys.unraisablehook = _unraisable
    _watched.append(seen)
    try:
        yield seen
    finally:
        _watched.remove(seen)
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous)


# The Sigterm records of the raise_on_sigterm blocks running now (innermost last).
_watched: list[Sigterm] = []


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived inside a :func:`raise_on_sigterm` block.

    The handler's exception is raised at whatever line runs, and Python drops an exception
    raised inside a weakref callback or a ``__del__`` ("Exception ignored in ..."): the signal
    would be lost and the job would run to the end. Long loops call this at safe points (each
    batch, before a file is committed) so that a dropped signal still stops them there.

    Example:
        >>> raise_if_terminated()  # no SIGTERM: nothing happens
    """
    for seen in _watched:
        if seen.message:
            raise Terminated(seen.message)
