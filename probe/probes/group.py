"""Calls of one pass taken together: a statistic computed once for many blocks of equal shape.

Each operation of an eager statistic is a kernel launch and some microseconds of Python, whatever
the size of the tensor. On a GPU the launches of ~40 small reductions per block, not their
arithmetic, bound a probed pass (docs/performance.md). A ResNet's blocks come in runs of equal
shapes (nine per stage in a ResNet-56), so a probe that declares ``groupable = True`` is given a
:class:`CallGroup` of consecutive calls whose tensors share shape, dtype and device: their
tensors stacked along the sample axis ([G * N, ...]) are reduced once, and each call gets its
rows back. The formulas are the per-call ones, applied to more rows.

:func:`group_key` says which calls may share a group; the session (``HookSession(grouped=...)``)
holds them until the key changes, a byte budget is reached or the forward pass ends.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from probe.errors import ProbeError
from probe.probes.base import Call

__all__ = [
    "CallGroup",
    "check_grouped",
    "group_key",
    "group_tensors",
    "f_of",
    "grad_input_of",
    "grad_output_of",
    "input_of",
    "output_of",
    "s_of",
    "takes_groups",
    "x_of",
    "y_of",
]

_Stacked = tuple[torch.Tensor, int, "int | None", torch.Tensor]


def check_grouped(grouped: object) -> None:
    """Refuse a ``grouped`` setting that is not True, False or None (the default: every call on
    an accelerator; on the CPU the statistics of calls with small tensors).

    Example:
        >>> check_grouped(None)
    """
    if grouped is not None and not isinstance(grouped, bool):
        raise ProbeError(
            f"grouped must be True, False or None (the default: every call on an accelerator, "
            f"on the CPU the statistics of calls with small tensors); got {grouped!r}."
        )


def takes_groups(probe: object, phase: str = "forward") -> bool:
    """Whether ``probe`` computes its ``phase`` half ("forward" or "backward") for a group of
    calls: it says it is ``groupable``, and its ``forward_group`` (``backward_group``) is its own
    class's or a subclass's, not an ancestor's that a subclass's ``forward`` would be bypassed by.

    Example:
        >>> from probe.probes import ResidualNorms
        >>> class Mine(ResidualNorms):
        ...     def forward(self, call):
        ...         return super().forward(call)
        >>> takes_groups(ResidualNorms()), takes_groups(Mine())
        (True, False)
    """
    if not getattr(probe, "groupable", False):
        return False
    mro = type(probe).__mro__

    def home(name: str) -> type:
        return next(c for c in mro if name in c.__dict__)

    single = "forward" if phase == "forward" else "backward"
    return issubclass(home(f"{single}_group"), home(single))


def group_tensors(call: Call, phase: str = "forward") -> tuple[torch.Tensor | None, ...]:
    """The tensors a grouped statistic may read: in the forward phase a block's x, F, S, y, else
    the output and input; in the backward phase dL/dy, dL/dx and a block's F.

    Example:
        >>> t = torch.ones(2, 3)
        >>> group_tensors(Call("fc", torch.nn.Identity(), None, t, 0))[0] is t
        True
    """
    b = call.block
    if phase == "backward":
        return (call.grad_output, call.grad_input, None if b is None else b.f)
    return (call.output, call.input) if b is None else (b.x, b.f, b.s, b.y)


def group_key(call: Call, phase: str = "forward") -> Hashable:
    """Calls with equal keys may be stacked: the same kind of call (block or layer, identity
    shortcut or not) and, for each tensor of :func:`group_tensors`, the same shape, dtype and
    device (a missing tensor counts as such).

    Example:
        >>> a, b = Call("a", torch.nn.Identity(), None, torch.ones(2, 3), 0), Call("b", torch.nn.Identity(), None, torch.zeros(2, 3), 0)
        >>> group_key(a) == group_key(b), group_key(a) == group_key(Call("c", torch.nn.Identity(), None, torch.ones(4, 3), 0))
        (True, False)
    """
    b = call.block
    kind = "layer" if b is None else ("identity" if b.s is b.x else "block")
    return (
        phase,
        kind,
        tuple(
            None if t is None else (t.shape, t.dtype, t.device) for t in group_tensors(call, phase)
        ),
    )


class CallGroup:
    """Consecutive calls of one pass with equal :func:`group_key`, and their tensors stacked.

    ``stacked(get)`` is ``get(call)`` of every call stacked along the sample axis, [G * N, ...]
    (row ``g * N + n`` is call g's sample n), built once per group whichever probe asks first:
    a block's y is also its output, and in a chain of blocks each x is the previous block's y,
    so the x's and y's of a chain are one stack of G + 1 tensors read as two overlapping views.
    So are the gradients of a chain taken in backward order, where each block's dL/dy is the
    dL/dx of the block after it.
    ``split(t)`` hands each call its rows of a stacked result.

    Example:
        >>> calls = [Call(str(i), torch.nn.Identity(), None, torch.full((2, 3), float(i)), 0) for i in range(3)]
        >>> group = CallGroup(calls)
        >>> [tuple(r.tolist()) for r in group.split(group.stacked(lambda c: c.output).sum(1))]
        [(0.0, 0.0), (3.0, 3.0), (6.0, 6.0)]
    """

    def __init__(self, calls: Sequence[Call]) -> None:
        if not calls:
            raise ValueError("a CallGroup needs at least one call")
        self.calls = list(calls)
        self.rows = calls[0].batch_size
        self.peers = calls[0].peers  # the session's probes (Call.peers)
        self.memo: dict[str, object] = {}  # work its probes share, as Call.memo
        # the calls' tensors' ids -> (stack, first row, end row, the stack's view of those rows)
        self._stacks: dict[tuple[int, ...], _Stacked] = {}
        self._chains: dict[tuple, torch.Tensor] = {}  # a chain's x-and-y stack
        self._reduced: dict[tuple[int, object], torch.Tensor] = {}

    def stacked(self, get: Callable[[Call], torch.Tensor]) -> torch.Tensor:
        """``get(call)`` of every call, stacked: [G * N, ...]."""
        return self._stack_of(get)[3]

    def rowwise(
        self,
        get: Callable[[Call], torch.Tensor],
        fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``fn(stacked(get))`` for a ``fn`` that reduces each row on its own (a per-sample
        norm), computed once per stack: a chain's x's and y's share one."""
        base, start, stop, _ = self._stack_of(get)
        key = (id(base), fn)
        out = self._reduced.get(key)
        if out is None:
            out = self._reduced[key] = fn(base)
        return out[start:stop]

    def _stack_of(self, get: Callable[[Call], torch.Tensor]) -> _Stacked:
        """(stack, first row, end row, the view of those rows): one view object per tensors, so
        that a tensor read twice (S = x) is the same object stacked, as it was unstacked."""
        tensors = [get(c) for c in self.calls]
        key = tuple(id(t) for t in tensors)
        found = self._stacks.get(key)
        if found is None:
            base, start, stop = self._chained(tensors) or (_stack(tensors), 0, None)
            found = self._stacks[key] = (base, start, stop, base[start:stop])
        return found

    def _chained(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, int, int | None] | None:
        """Where ``tensors`` are the firsts or the seconds of a chain (each call's first is the
        previous call's second: x and y forward, dL/dy and dL/dx backward), their rows of the
        chain's one stack (None otherwise)."""
        calls = self.calls
        if len(calls) < 2:
            return None
        for first, second in _CHAINS:
            firsts, seconds = [first(c) for c in calls], [second(c) for c in calls]
            if any(t is None for t in firsts) or any(
                a is not b for a, b in zip(firsts[1:], seconds)
            ):
                continue  # not a chain of these two
            if not (_same(tensors, firsts) or _same(tensors, seconds)):
                continue
            key = (id(first), *(id(t) for t in (firsts[0], *seconds)))
            both = self._chains.get(key)
            if both is None:
                both = self._chains[key] = _stack([firsts[0], *seconds])
            n = len(calls) * self.rows
            return (both, 0, n) if _same(tensors, firsts) else (both, self.rows, n + self.rows)
        return None

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each call's rows of a stacked result [G * N, ...]: G views [N, ...]."""
        return t.view(len(self.calls), self.rows, *t.shape[1:]).unbind(0)

    def per_call(self, results: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Stacked results {quantity: [G * N, ...]} as each call's {quantity: [N, ...]}."""
        parts = {q: self.split(t) for q, t in results.items()}
        return [{q: rows[g] for q, rows in parts.items()} for g in range(len(self.calls))]


def output_of(call: Call) -> torch.Tensor:
    """A call's output: ``group.stacked(output_of)`` stacks a group's outputs."""
    return call.output


def input_of(call: Call) -> torch.Tensor | None:
    """A call's input x."""
    return call.input


def grad_output_of(call: Call) -> torch.Tensor | None:
    """A call's dL/dy (backward groups)."""
    return call.grad_output


def grad_input_of(call: Call) -> torch.Tensor | None:
    """A block call's dL/dx (backward groups)."""
    return call.grad_input


def _block_part(part: str) -> Callable[[Call], torch.Tensor | None]:
    def get(call: Call) -> torch.Tensor | None:
        return None if call.block is None else getattr(call.block, part)

    get.__name__ = f"{part}_of"
    get.__doc__ = f"A block call's {part} (None for a call that is no block)."
    return get


# a block's x, F(x), S(x) and y
x_of, f_of, s_of, y_of = (_block_part(part) for part in ("x", "f", "s", "y"))


# (first, second) of each call, where a chain's firsts are the previous calls' seconds
_CHAINS = ((x_of, y_of), (grad_output_of, grad_input_of))


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(s is t for s, t in zip(a, b))


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` [N, ...] stacked along their first axis, [G * N, ...], in the memory layout
    they have: one copy, and a view of the one tensor when there is one."""
    first = tensors[0]
    if len(tensors) == 1:
        return first
    if first.is_contiguous():
        return torch.cat(tensors)
    # A dense layout other than the default (channels-last maps): cat reads the tensors through
    # the permutation that makes them contiguous, so it stays one copy (on CUDA, cat of
    # channels-last inputs copied each input with a launch of its own), and the result is
    # permuted back: the same values at the same indices, in the tensors' own layout.
    order = sorted(range(first.ndim), key=lambda d: -first.stride(d))
    dense = order[0] == 0 and all(t.stride() == first.stride() for t in tensors)
    if not dense or not first.permute(order).is_contiguous():
        return torch.cat(tensors)
    inverse = [order.index(d) for d in range(first.ndim)]
    return torch.cat([t.permute(order) for t in tensors]).permute(inverse)
