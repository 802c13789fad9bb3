"""The one exception type of the library and helpers that build helpful messages.

Every message says what was wrong, what was given, what is allowed and, where possible, a hint.
The CLI turns a :class:`ProbeError` into a clean message and a non-zero exit.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ProbeError", "did_you_mean", "check_option"]


class ProbeError(Exception):
    """Raised for every invalid input or unusable file the library detects.

    Example:
        >>> try:
        ...     check_option("shortcut", "C", ["A", "B"])
        ... except ProbeError as e:
        ...     "allowed: A, B" in str(e)
        True
    """


def did_you_mean(given: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ' Did you mean ...?' suffix for ``given`` among ``choices`` ('' when nothing is close).

    Example:
        >>> did_you_mean("resnet65", ["resnet56", "plain56"])
        " Did you mean 'resnet56'?"
    """
    close = difflib.get_close_matches(given, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def check_option(what: str, given: object, allowed: Iterable[object], hint: str = "") -> None:
    """Raise :class:`ProbeError` unless ``given`` is one of ``allowed``.

    Example:
        >>> check_option("dtype", "fp16", ["fp32", "fp16", "bf16"])
    """
    allowed = list(allowed)
    if given in allowed:
        return
    suggestion = did_you_mean(str(given), [str(a) for a in allowed])
    msg = f"Invalid {what}: {given!r}; allowed: {', '.join(str(a) for a in allowed)}.{suggestion}"
    if hint:
        msg += f" {hint}"
    raise ProbeError(msg)
