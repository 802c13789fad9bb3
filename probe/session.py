"""The hook engine: install forward hooks (and tensor gradient hooks), run probes, remove hooks.

:class:`HookSession` is a context manager. While it is open, every forward pass of the model runs
the probes on the selected modules; :meth:`HookSession.run_batch` performs one forward (and, when
a probe needs gradients, one backward through ``torch.autograd.grad``, so parameters' ``.grad``
are untouched) and returns the per-sample results. On exit -- normal or by exception -- every hook
is removed and the modules' training flags and buffers (BN running statistics) are restored.

Gradients are recorded with ``Tensor.register_hook`` on the hooked outputs (not with full
backward hooks, which break when a later op modifies a tensor in place).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from probe.errors import ProbeError
from probe.hooks.residual import ResidualSpec, find_blocks, inplace_modules, residual_spec
from probe.hooks.select import LayerSpec, select_modules
from probe.losses import exact_cross_entropy
from probe.probes.base import BlockTensors, Call, Probe, input_slot
from probe.probes.registry import as_probes

__all__ = ["HookSession", "InPlaceWarning", "LayerInfo", "NonFiniteWarning", "resolve_layers"]

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteWarning(UserWarning):
    """Some probe results were NaN or infinite (overflowing weights, a diverged run)."""


class InPlaceWarning(UserWarning):
    """The hooked subtree contains in-place modules; captured tensors are cloned where needed."""


@dataclass
class LayerInfo:
    """What the capture knows about one hooked module."""

    name: str
    module: nn.Module
    spec: ResidualSpec | None  # residual adapter, if the module is a block
    index: int  # position in the selection (forward-definition order)

    @property
    def is_block(self) -> bool:
        return self.spec is not None

    @property
    def residual(self) -> bool | None:
        if self.spec is None:
            return None
        return bool(getattr(self.module, "residual", True))


def resolve_layers(model: nn.Module, layers: LayerSpec | None) -> tuple[list[LayerInfo], list[str]]:
    """Selected modules with their residual adapters, plus names of unclassified block-like modules.

    ``layers=None`` or ``"auto"`` selects every residual block found automatically.
    """
    blocks, unknown = find_blocks(model)
    if layers is None or layers == "auto":
        if not blocks:
            raise ProbeError(
                f"No residual blocks recognised in {type(model).__name__}"
                + (
                    f" (block-like modules without an adapter: {', '.join(unknown[:4])})"
                    if unknown
                    else ""
                )
                + ". Pass layers explicitly (e.g. 'features.*') or declare your block with "
                "probe.register_residual(BlockClass, ResidualSpec(branch=..., shortcut=...))."
            )
        chosen = [(n, m) for n, m, _ in blocks]
    else:
        chosen = select_modules(model, layers)
    infos = [LayerInfo(n, m, residual_spec(m), i) for i, (n, m) in enumerate(chosen)]
    return infos, unknown


def _version(t: torch.Tensor | None) -> int | None:
    """The tensor's in-place version counter (None for no tensor / inference-mode tensors)."""
    try:
        return None if t is None else t._version
    except RuntimeError:
        return None


def _first_tensor(obj: object) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        return next((o for o in obj if isinstance(o, torch.Tensor)), None)
    return None


class HookSession:
    """Hooks on the selected layers of ``model`` running ``probes``; use as a context manager.

    Example:
        >>> from probe.zoo import create
        >>> from probe.probes import ResidualNorms
        >>> model = create("resnet20")
        >>> with HookSession(model, probes=[ResidualNorms()]) as s:
        ...     results, logits = s.run_batch(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
        >>> sorted(results["stages.0.0"])[:3], len(model._forward_hooks)
        (['cos_fs', 'cos_ys', 'dev_norm'], 0)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | None = "auto",
        probes: Sequence[Probe] = (),
        *,
        mode: str = "eval",
        loss_fn: LossFn | None = None,
    ) -> None:
        if mode not in ("eval", "train", "keep"):
            raise ProbeError(f"Invalid mode {mode!r}; allowed: eval, train, keep.")
        probes = as_probes(probes)
        if not probes:
            raise ProbeError("No probes given; pass e.g. probes=[probe.ResidualNorms()].")
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ProbeError(f"Each probe may be given once; got {names}.")
        self.model, self.probes, self.mode = model, list(probes), mode
        # Summed per-sample losses: row n of every gradient is then sample n's own (eval mode).
        self.loss_fn = loss_fn or exact_cross_entropy
        self.layers, self.unclassified = resolve_layers(model, layers)
        self.needs_grad = any(p.needs_grad for p in probes)
        # Model-scope probes (e.g. shattered gradients) see the whole network once per batch.
        self.layer_probes = [p for p in probes if getattr(p, "scope", "layer") == "layer"]
        self.model_probes = [p for p in probes if getattr(p, "scope", "layer") == "model"]
        self._model_info = LayerInfo("model", model, None, -1)
        self.inplace = sorted({n for info in self.layers for n in inplace_modules(info.module)})
        self._handles: list = []
        self._flags: dict[nn.Module, bool] = {}
        self._saved_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._suspended = False
        self._open = False
        self.dim_labels: dict[tuple[str, str], tuple[str, ...]] = {}  # (key, quantity) -> axes
        self._nonfinite: dict[str, torch.Tensor] = {}  # key -> samples with a NaN/inf result
        self.shapes: dict[
            str, tuple
        ] = {}  # key -> (output, branch or None, input or None) shapes per sample
        self._reset_batch(0)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> HookSession:
        if self.inplace:
            warnings.warn(
                f"In-place modules in the hooked layers ({', '.join(self.inplace[:4])}"
                f"{' ...' if len(self.inplace) > 4 else ''}): captured tensors are cloned where a later "
                "in-place op could overwrite them.",
                InPlaceWarning,
                stacklevel=2,
            )
        self._flags = {m: m.training for m in self.model.modules()}
        if self.mode != "keep":
            self.model.train(self.mode == "train")
        # A training-mode forward updates BN running statistics (and batch counters); keep copies
        # of the buffers of every module that will run in training mode and restore them on close,
        # so a capture leaves the model exactly as it found it.
        self._saved_buffers = [
            (buf, buf.detach().clone())
            for m in self.model.modules()
            if m.training
            for buf in m.buffers(recurse=False)
        ]
        try:
            for info in self.layers:
                self._install(info)
        except BaseException:
            self.close()
            raise
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook, restore every module's training flag and the buffers of modules that
        ran in training mode (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m, flag in self._flags.items():
            m.training = flag
        self._flags = {}
        with torch.no_grad():
            for buf, saved in self._saved_buffers:
                buf.copy_(saved)
        self._saved_buffers = []
        self._open = False

    # -- hooks -------------------------------------------------------------------------------
    def _install(self, info: LayerInfo) -> None:
        if info.spec is not None:
            branch, shortcut = info.spec.resolve(info.module)
            clone = info.spec.clone_branch or bool(self.inplace)
            self._handles.append(
                info.module.register_forward_pre_hook(self._on_entry(info), with_kwargs=True)
            )
            self._handles.append(
                branch.register_forward_hook(self._stash("_branch_out", info.name, clone))
            )
            if shortcut is not None:
                self._handles.append(
                    shortcut.register_forward_hook(self._stash("_shortcut_out", info.name, clone))
                )
        self._handles.append(
            info.module.register_forward_hook(self._on_forward(info), with_kwargs=True)
        )

    def _stash(self, store: str, name: str, clone: bool):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not self._suspended:
                t = _first_tensor(output)
                t = t.clone() if clone and t is not None else t
                getattr(self, store)[name] = t
                # Version counters tell, at the block's output, whether the stored tensor was
                # overwritten in place since (a functional ``out += x`` without clone_branch).
                self._versions[(store, name)] = _version(t)
                if store == "_branch_out":
                    self._branch_calls[name] += 1

        return hook

    def _on_entry(self, info: LayerInfo):
        """Pre-hook of a block: its input x (positional, or the one tensor keyword) and x's version."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._suspended:
                return
            slot = input_slot(args, kwargs)  # the same rule Call.function() differentiates by
            if slot is None:
                tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
                raise ProbeError(
                    f"Block {info.name!r} ({type(module).__name__}) was called without a "
                    f"positional tensor and with {len(tensors)} tensor keywords "
                    f"({', '.join(tensors) or 'none'}), so its input x is ambiguous. Call it "
                    "with x first, or select its submodules with layers=... instead."
                )
            x = args[slot] if isinstance(slot, int) else kwargs[slot]
            self._entry[info.name] = (x, _version(x))
            self._branch_calls[info.name] = 0

        return hook

    def _key(self, name: str) -> str:
        k = self._counts[name]
        self._counts[name] += 1
        return name if k == 0 else f"{name}@{k}"

    def _block_tensors(self, info: LayerInfo, y: torch.Tensor) -> BlockTensors:
        branch, shortcut = info.spec.resolve(info.module)
        x, x_version = self._entry.pop(info.name, (None, None))
        f = self._branch_out.pop(info.name, None)
        s = self._shortcut_out.pop(info.name, None)
        where = f"block {info.name!r} ({type(info.module).__name__})"
        if f is None:
            raise ProbeError(
                f"Branch {type(branch).__name__} of {where} did not run during its forward."
            )
        calls = self._branch_calls.pop(info.name, 0)
        if calls > 1:
            raise ProbeError(
                f"The branch {type(branch).__name__} of {where} ran {calls} times in one forward, "
                "so F(x) is ambiguous (only one output could be stored). Point the adapter's "
                "branch at a module that runs once per call (probe.register_residual)."
            )
        if _version(x) != x_version:
            raise ProbeError(
                f"{where} modified its input in place (e.g. 'x += f(x)'), so S(x) = x cannot be read "
                "after its forward. Use an out-of-place add ('x = x + f(x)') in the block."
            )
        if _version(f) != self._versions.get(("_branch_out", info.name)):
            raise ProbeError(
                f"The branch output F(x) of {where} was modified in place after it was computed "
                "(e.g. 'out += identity'). Declare the block with "
                "ResidualSpec(..., clone_branch=True) so the capture copies F(x) first."
            )
        if s is None:
            if shortcut is None or isinstance(shortcut, nn.Identity):
                s = x
            else:  # plain pseudo-block: the shortcut is not in the forward pass; evaluate it here.
                with self._suspend(), torch.no_grad():
                    s = shortcut(x)
        return BlockTensors(x=x, f=f, s=s, y=y, residual=bool(info.residual), shortcut=shortcut)

    def _on_forward(self, info: LayerInfo):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if self._suspended:
                return
            y = _first_tensor(output)
            if y is None:
                return
            key = self._key(info.name)
            block = self._block_tensors(info, y) if info.spec is not None else None
            x = block.x if block is not None else _first_tensor(args)
            self.shapes.setdefault(
                key,
                (
                    tuple(y.shape[1:]),
                    tuple(block.f.shape[1:]) if block else None,
                    tuple(x.shape[1:]) if x is not None else None,
                ),
            )
            call = Call(key, module, x, y, self._offset, block, args=args, kwargs=kwargs)
            self._info[key] = info
            results = self._results[key]
            with self._suspend():
                for p in self.layer_probes:
                    if p.applies_to(call):
                        self._merge(results, p.forward(call), p, key, call.batch_size)
            if self.needs_grad and y.requires_grad:
                self._calls.append(call)
                y.register_hook(self._grad_setter(call, "grad_output"))
                if block is not None and x is not None and x.requires_grad:
                    x.register_hook(self._grad_setter(call, "grad_input"))
            return None  # a forward hook that returns a value would replace the output

        return hook

    @staticmethod
    def _grad_setter(call: Call, attr: str):
        def hook(grad: torch.Tensor) -> None:
            setattr(call, attr, grad.detach())

        return hook

    def _merge(self, results: dict, new: dict, probe: Probe, key: str, n: int) -> None:
        for q, t in new.items():
            if not isinstance(t, torch.Tensor) or t.ndim == 0:
                raise ProbeError(
                    f"Probe {probe.name!r} returned {q!r} that is not a per-sample tensor [N, ...]."
                )
            if t.shape[0] > n:
                raise ProbeError(
                    f"Probe {probe.name!r} returned {q!r} with {t.shape[0]} rows for a batch of {n} "
                    f"at layer {key!r}; the sample axis must come first."
                )
            if q in results:
                raise ProbeError(
                    f"Quantity {q!r} at layer {key!r} is produced by two probes; rename one."
                )
            results[q] = t.detach()
            labels = probe.dim_labels(q, t)
            if labels is not None:
                self.dim_labels.setdefault((key, q), tuple(labels))

    @contextlib.contextmanager
    def _suspend(self):
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    def _reset_batch(self, offset: int) -> None:
        self._offset = offset
        self._counts: dict[str, int] = defaultdict(int)
        self._results: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self._info: dict[str, LayerInfo] = {}
        self._calls: list[Call] = []
        self._branch_out: dict[str, torch.Tensor] = {}
        self._shortcut_out: dict[str, torch.Tensor] = {}
        self._entry: dict[str, tuple[torch.Tensor | None, int | None]] = {}
        self._versions: dict[tuple[str, str], int | None] = {}
        self._branch_calls: dict[str, int] = defaultdict(int)

    # -- running -----------------------------------------------------------------------------
    def run_batch(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        sample_offset: int = 0,
        next_input: torch.Tensor | None = None,
    ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        """Forward (and backward if needed) one batch; returns ({layer: {quantity: [N, ...]}}, logits).

        ``next_input`` [1, ...] is the sample that follows this batch in capture order (model-level
        probes that pair each sample with its successor need it; :func:`probe.capture` passes it).
        The logits are detached and equal to an unhooked forward pass.
        """
        if not self._open:
            raise ProbeError("HookSession.run_batch called outside its 'with' block.")
        self._reset_batch(sample_offset)
        try:
            if self.needs_grad:
                if y is None:
                    raise ProbeError("Probes that need gradients require labels y for the loss.")
                inp = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = self.model(inp)
                    loss = self.loss_fn(out, y)
                    torch.autograd.grad(loss, [inp], allow_unused=True)
                for call in self._calls:
                    with self._suspend():
                        for p in self.layer_probes:
                            if p.needs_grad and p.applies_to(call):
                                self._merge(
                                    self._results[call.name],
                                    p.backward(call),
                                    p,
                                    call.name,
                                    call.batch_size,
                                )
            else:
                with torch.no_grad():
                    out = self.model(x)
            if self.model_probes:
                call = Call(
                    "model",
                    self.model,
                    x.detach(),
                    out.detach(),
                    sample_offset,
                    labels=y,
                    next_input=None if next_input is None else next_input.detach(),
                )
                self._info["model"] = self._model_info
                self.shapes.setdefault("model", (tuple(out.shape[1:]), None, tuple(x.shape[1:])))
                with self._suspend():
                    for p in self.model_probes:
                        if p.applies_to(call):
                            self._merge(
                                self._results["model"], p.forward(call), p, "model", call.batch_size
                            )
            self._count_nonfinite()
            return dict(self._results), out.detach()
        finally:
            self._calls = []  # drop references to the graph and activations
            self._branch_out.clear()
            self._shortcut_out.clear()
            self._entry.clear()

    def _count_nonfinite(self) -> None:
        """Per layer key: samples of this batch with a NaN/inf in any result (a few small
        tensors per layer, already on the device: no pass over the activations)."""
        for key, qs in self._results.items():
            floats = [t for t in qs.values() if t.is_floating_point()]
            if not floats:
                continue
            bad = torch.zeros(
                max(len(t) for t in floats), dtype=torch.bool, device=floats[0].device
            )
            for t in floats:  # capped quantities cover the first rows only
                bad[: len(t)] |= ~torch.isfinite(t.reshape(len(t), -1)).all(1)
            # Summed on the device: reading the count here would sync the GPU once per layer.
            self._nonfinite[key] = self._nonfinite.get(key, 0) + bad.sum()

    @property
    def nonfinite(self) -> dict[str, int]:
        """Layer key -> samples so far with a NaN or infinite result (layers with none omitted)."""
        counts = {k: int(v) for k, v in self._nonfinite.items()}
        return {k: v for k, v in counts.items() if v}

    def layer_info(self, key: str) -> LayerInfo:
        """The :class:`LayerInfo` behind a result key (``name`` or ``name@k``)."""
        if key == "model":
            return self._model_info
        return self._info.get(key) or next(i for i in self.layers if i.name == key.split("@")[0])
