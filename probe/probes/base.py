"""The probe protocol: what a hook sees (:class:`Call`) and what a probe returns.

A probe is a small dataclass. Its ``forward(call)`` returns a dict of per-sample tensors (sample
axis first, ``[N, ...]``); the store writes each under ``layers/<layer>/<quantity>`` with no extra
code. Probes with ``needs_grad = True`` also get ``backward(call)`` after the loss gradient has
been propagated, with ``call.grad_output`` (dL/dy) and, for blocks, ``call.grad_input`` (dL/dx).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from probe.errors import ProbeError
from probe.validation import validate_fields

if TYPE_CHECKING:
    from probe.probes.group import CallGroup

__all__ = [
    "Probe",
    "Call",
    "BlockTensors",
    "input_slot",
    "input_tensor",
    "first_tensor",
    "logits_of",
    "in_parameter_precision",
]


@dataclass
class BlockTensors:
    """The four tensors of a residual block (or a plain pseudo-block), all ``[N, ...]``.

    ``s`` is S(x), the shortcut's output; in a plain block the shortcut is not part of the forward
    pass, but S(x) is still computed so that both nets are measured against the same map.
    """

    x: torch.Tensor  # block input
    f: torch.Tensor  # branch output F(x)
    s: torch.Tensor  # shortcut output S(x)
    y: torch.Tensor  # block output
    residual: bool  # whether the block adds S(x)


def input_slot(args: tuple, kwargs: dict) -> int | str | None:
    """Where a module call's input x is: the index of the first positional tensor, else the name of
    its only tensor keyword; None when neither (no tensor, or several tensor keywords).

    Example:
        >>> input_slot((3, torch.ones(1)), {}), input_slot((), {"hidden": torch.ones(1), "k": 2})
        (1, 'hidden')
    """
    slot = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    if slot is not None:
        return slot
    tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


def input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A module call's input x, at :func:`input_slot` (None when there is no such slot).

    Example:
        >>> input_tensor((3, torch.ones(1)), {})
        tensor([1.])
    """
    slot = input_slot(args, kwargs)
    if slot is None:
        return None
    return args[slot] if isinstance(slot, int) else kwargs[slot]


def first_tensor(obj: object) -> torch.Tensor | None:
    """A module's output as the probes see it: the tensor itself, or the first tensor of a tuple
    or list (None when there is none).

    Example:
        >>> first_tensor((None, torch.ones(1), torch.zeros(1)))
        tensor([1.])
    """
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        return next((o for o in obj if isinstance(o, torch.Tensor)), None)
    return None


def logits_of(out: object, model: object = None) -> torch.Tensor:
    """The logits [N, classes] in what a model returned: the tensor itself, or the ``logits`` of
    a mapping or of an output object (HuggingFace's outputs, torchvision's ``InceptionOutputs``).
    Anything else (a plain tuple does not say which element is the logits) is a ProbeError
    naming ``model``.

    Example:
        >>> logits_of({"logits": torch.ones(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(out, torch.Tensor):
        return out
    found = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    raise ProbeError(
        f"{type(model).__name__ if model is not None else 'The model'} returned a "
        f"{type(out).__name__}, where the capture needs its logits [N, classes] (for the loss of "
        "gradient probes, or for model-level probes). Return them as a tensor, or as 'logits' "
        "of a mapping or an output object; or pass loss_fn=... that takes what the model returns."
    )


@dataclass
class Call:
    """One call of one hooked module during a captured forward pass."""

    name: str  # layer key: the dotted module name, plus '@k' for the k-th repeated call
    module: nn.Module
    input: torch.Tensor | None  # first positional input, [N, ...]
    output: torch.Tensor  # [N, ...]
    sample_offset: int  # samples captured before this batch
    block: BlockTensors | None = None
    grad_output: torch.Tensor | None = None  # dL/d(output), set before backward()
    grad_input: torch.Tensor | None = None  # dL/d(input), blocks only
    labels: torch.Tensor | None = None  # [N] the batch's labels (model-level probes)
    # the capture's loss_fn (model level; None: the default cross-entropy on the logits): takes
    # what the model returned and the labels, and sums per-sample losses
    loss: Callable[[object, torch.Tensor], torch.Tensor] | None = None
    next_input: torch.Tensor | None = None  # [1, ...] the sample after this batch (model level)
    args: tuple = ()  # the module's positional arguments in this call (x among them)
    kwargs: dict = field(default_factory=dict)  # its keyword arguments in this call
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> y when not the module itself
    own_map: bool = True  # False: no map x -> y of this key alone (a site inside a larger block)
    identity_shortcut: bool = False  # the block's shortcut map is the identity
    shortcut: Callable[[torch.Tensor], torch.Tensor] | None = None  # else x -> S(x), if known
    # The probes of the session that this call is shown to, in order, and a place for work they
    # share: probes that can compute their quantities together look for each other here
    # (ResidualNorms and ChannelStats, fused, read a block's tensors in one kernel).
    peers: Sequence[Probe] = field(default=(), repr=False, compare=False)
    memo: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return int(self.output.shape[0])

    def function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The module as a map of its input alone, x -> y, with every other argument of this call
        held fixed (masks, scales, keyword options). Tensor arguments with one row per sample are
        cut to the rows of the x given, so ``f(x[:k])`` is the first k samples' output. Jacobian
        probes differentiate this map.

        Example:
            >>> lin = nn.Linear(3, 2)
            >>> call = Call("l", lin, torch.ones(4, 3), lin(torch.ones(4, 3)), 0, args=(torch.ones(4, 3),))
            >>> call.function()(torch.zeros(1, 3)).shape
            torch.Size([1, 2])
        """
        if self.fn is not None:
            return self.fn
        args, kwargs, module, n = self.args, self.kwargs, self.module, self.batch_size
        slot = input_slot(args, kwargs)
        if slot is None:
            return module

        def rows(v: object, k: int) -> object:
            if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n:
                return v[:k]
            return v

        def f(z: torch.Tensor) -> torch.Tensor:
            k = z.shape[0]
            a = [rows(v, k) for v in args]
            kw = {name: rows(v, k) for name, v in kwargs.items()}
            if isinstance(slot, int):
                a[slot] = z
            else:
                kw[slot] = z
            out = module(*a, **kw)
            return (
                out
                if isinstance(out, torch.Tensor)
                else next(o for o in out if isinstance(o, torch.Tensor))
            )

        return f

    def rows_within(self, max_samples: int | None, rows: int | None = None) -> int:
        """How many of this batch's first ``rows`` (default: all) fall within a capture-wide cap of
        ``max_samples`` samples (``None``: no cap) -- the sample cap every costly probe offers."""
        rows = self.batch_size if rows is None else rows
        return rows if max_samples is None else max(0, min(rows, max_samples - self.sample_offset))


@dataclass
class Probe:
    """Base class of every probe; subclass it as a dataclass.

    Class attributes:
        name: short identifier used by the CLI (``--probe name:key=value``).
        needs_grad: whether ``backward`` must run (forces a backward pass in the capture).
        dims: dimension labels per quantity (sample axis first) written to the HDF5 file.

    Example:
        >>> @dataclass
        ... class MeanAbs(Probe):
        ...     name: ClassVar[str] = "mean_abs"
        ...     def forward(self, call):
        ...         return {"mean_abs": call.output.abs().flatten(1).mean(1)}
        >>> MeanAbs().forward(Call("fc", nn.Identity(), None, torch.ones(2, 3), 0))["mean_abs"]
        tensor([1., 1.])
    """

    name: ClassVar[str] = "probe"
    needs_grad: ClassVar[bool] = False
    # Whether forward() needs autograd (it differentiates something itself). A probe that only
    # reduces tensors sets False: the session then runs it under no_grad, so a capture with
    # gradients does not record a graph of every statistic next to the model's.
    forward_grad: ClassVar[bool] = True
    # Whether backward() may run inside autograd's tensor hooks, as soon as the call's gradients
    # are all computed (it only reduces or copies them; it starts no autograd of its own). The
    # session then frees each dL/dy during the backward pass instead of holding them all to its end.
    eager_backward: ClassVar[bool] = False
    # Whether forward() and backward() may be taken for several calls at once (forward_group,
    # backward_group): they only reduce the call's tensors, read no state that changes during
    # the pass and record no graph. The session may then hold a run of equally shaped calls and
    # stack them (probe.probes.group); for backward() this needs eager_backward too.
    groupable: ClassVar[bool] = False
    # Whether a groupable probe's results are a few numbers per sample (norms, moments) rather
    # than copies of the call's tensors. On a CPU only such a probe is grouped by default, and
    # only for calls with small tensors: there its dozens of small ops per call cost more than
    # the stack's copy, which a copying probe would add to its own (HookSession's ``grouped``).
    reduces: ClassVar[bool] = False
    dims: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        # Types and ranges of every field (PositiveInt, ...), from Python and --probe specs alike.
        validate_fields(self)

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        return {}

    def backward(self, call: Call) -> dict[str, torch.Tensor]:
        return {}

    def forward_group(self, group: CallGroup) -> list[dict[str, torch.Tensor]]:
        """``forward`` of each call of ``group`` (consecutive calls of one pass with equal shapes,
        :class:`probe.probes.group.CallGroup`), in order. A ``groupable`` probe computes them
        together from ``group.stacked(...)``; the default takes the calls one at a time.

        Example:
            >>> from probe.probes.group import CallGroup
            >>> calls = [Call(str(i), nn.Identity(), None, torch.ones(2, 3), 0) for i in range(2)]
            >>> Probe().forward_group(CallGroup(calls))
            [{}, {}]
        """
        return [self.forward(call) for call in group.calls]

    def backward_group(self, group: CallGroup) -> list[dict[str, torch.Tensor]]:
        """``backward`` of each call of ``group``, whose gradients have equal shapes, in the
        order their gradients completed; see :meth:`forward_group`."""
        return [self.backward(call) for call in group.calls]

    def dim_labels(self, quantity: str, value: torch.Tensor) -> tuple[str, ...] | None:
        """Axis labels of ``quantity`` (sample axis first) for the HDF5 file; default: ``dims``."""
        return type(self).dims.get(quantity)

    def applies_to(self, call: Call) -> bool:
        """Whether this probe has anything to say about ``call`` (default: every call)."""
        return True

    def output_only(self) -> bool:
        """Whether ``forward`` and ``backward`` read nothing of a call but ``output`` and
        ``grad_output`` (default: False, they may read anything).

        When every probe of a session says so, a traced block whose one residual site yields the
        block's output is read from a hook on the block's module instead of tracing its code,
        which costs every op of the block a Python call. Its ``input``, ``block`` and
        ``grad_input`` are then None (the output is the same tensor either way), so a probe
        that says True must not read them.

        Example:
            >>> Probe().output_only()  # a probe may read anything unless it says otherwise
            False
        """
        return False

    def replayable(self) -> bool:
        """Whether a probed pass recorded as a CUDA graph may replay this probe (default: False).

        Say True only when ``forward`` and ``backward`` are a fixed sequence of device operations
        on the call's tensors: no host sync (``.item()``, ``bool(t)``, ``nonzero``), nothing
        decided by the batch's place in the capture (``sample_offset``, sample caps, per-sample
        random seeds), no state kept from one batch to the next. A replay repeats the recorded
        kernels without running the probe's Python (:mod:`probe.replay`).

        Example:
            >>> Probe().replayable()
            False
        """
        return False

    def config(self) -> dict:
        """The probe's parameters, recorded in the capture's provenance."""
        import dataclasses

        return {"probe": self.name, **dataclasses.asdict(self)}


@contextlib.contextmanager
def in_parameter_precision(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """``x`` in the dtype of ``module``'s parameters, with autocast off while the block runs.

    Under autocast a block's input arrives in bf16 or fp16 while its weights stay float32: the
    Jacobian products then failed (functorch's dual tensors are not cast, so a convolution met a
    float32 input and bf16 weights), and in bf16 they would carry three significant digits, the
    size of the deviations from the identity being measured. The estimates are taken of the
    block in its parameters' precision at the input the pass produced. Per-sample parameter
    gradients (``vmap(grad)``) failed the same way and are taken the same way.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> with in_parameter_precision(lin, torch.ones(3, 2, dtype=torch.bfloat16)) as x:
        ...     print(x.dtype, lin(x).dtype)
        torch.float32 torch.float32
    """
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is not None and x.is_floating_point() and x.dtype != param.dtype:
        x = x.to(param.dtype)
    with torch.autocast(x.device.type, enabled=False):
        yield x
