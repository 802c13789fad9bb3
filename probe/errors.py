"""The one exception type of the library and helpers that build helpful messages.

Every message says what was wrong, what was given, what is allowed and, where possible, a hint.
The CLI turns a :class:`ProbeError` into a clean message and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator

__all__ = ["ProbeError", "check_option", "did_you_mean", "explain_autograd_refusal"]


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


# torch's refusals to differentiate a construct of the model itself, in its words, and what
# that construct is; its messages name calls (.grad(), torch.func.grad) the user never made
_AUTOGRAD_REFUSALS = (
    (
        "use_reentrant",
        "activation checkpointing with use_reentrant=True (torch.utils.checkpoint), whose "
        "backward pass gives no gradients to torch.autograd.grad",
    ),
    (
        "saved tensor hooks",
        "saved-tensor hooks (activation checkpointing with use_reentrant=False, or activation "
        "offloading), which torch.func's transforms do not run through",
    ),
    (
        "setup_context",
        "a torch.autograd.Function without setup_context (activation checkpointing with "
        "use_reentrant=True is one), which torch.func's transforms cannot differentiate",
    ),
)


@contextlib.contextmanager
def explain_autograd_refusal(what: str) -> Iterator[None]:
    """Turn torch refusing to differentiate ``what`` through a construct of the model
    (activation checkpointing, a custom autograd Function) into a clear :class:`ProbeError`;
    any other error passes unchanged.

    Example:
        >>> try:
        ...     with explain_autograd_refusal("Gradient probes"):
        ...         raise RuntimeError("When use_reentrant=True, torch.utils.checkpoint is ...")
        ... except ProbeError as e:
        ...     "set_grad_checkpointing(False)" in str(e)
        True
    """
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        for marker, construct in _AUTOGRAD_REFUSALS:
            if marker in text:
                # torch.autograd.grad runs through non-reentrant checkpointing
                other = (
                    " or checkpoint(..., use_reentrant=False)" if marker == "use_reentrant" else ""
                )
                raise ProbeError(
                    f"{what} cannot differentiate this model: it runs {construct}. Capture with "
                    "activation checkpointing off (timm: model.set_grad_checkpointing(False); "
                    f"your own code: call the blocks directly){other}; probes without gradients "
                    "(residual, channel, activations) need no change."
                ) from e
        raise
