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
import gc
import logging
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from probe.errors import ProbeError, explain_autograd_refusal
from probe.hooks.residual import ResidualSpec, find_blocks, inplace_modules, residual_spec
from probe.hooks.select import LayerSpec, named_root, outline, select_modules, select_sites
from probe.hooks.sites import (
    OwnerCall,
    Site,
    SiteRecord,
    SiteTracer,
    discover_sites,
    shortcut_map,
    site_keys,
    storage_ptr,
)
from probe.losses import check_labels, exact_cross_entropy
from probe.nonfinite import NonFiniteCounter
from probe.probes import onepass
from probe.probes.base import BlockTensors, Call, Probe, first_tensor, input_tensor, logits_of
from probe.probes.group import CallGroup, check_grouped, group_key, group_tensors, takes_groups
from probe.probes.layout import check_auto_axes
from probe.probes.registry import as_probes
from probe.replay import (
    MAX_RECORDINGS,
    GraphFallbackWarning,
    Packed,
    Recording,
    check_cuda_graph,
    check_device,
    check_replayable,
    pass_key,
    record_graph,
    recording_autocast,
    same_results,
    side_stream,
    static_copy,
)

__all__ = [
    "HookSession",
    "InPlaceWarning",
    "LayerInfo",
    "NoResidualWarning",
    "NonFiniteWarning",
    "resolve_layers",
]

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteWarning(UserWarning):
    """Some probe results were NaN or infinite (overflowing weights, a diverged run)."""


class NoResidualWarning(UserWarning):
    """Selected modules contain no residual site: residual quantities are not recorded there."""


class InPlaceWarning(UserWarning):
    """The hooked subtree contains in-place modules; captured tensors are cloned where needed."""


class NothingRecordedWarning(UserWarning):
    """A probe recorded nothing over a whole capture: none of its calls gave it anything to
    measure (a model it does not apply to, data without labels, a selection without blocks)."""


@dataclass
class LayerInfo:
    """What the capture knows about one result key.

    ``kind`` is ``"adapter"`` (a block read through a registered :class:`ResidualSpec`),
    ``"site"`` (one residual add found by tracing, see :mod:`probe.hooks.sites`), ``"block"``
    (a module with several sites, as a whole: its Jacobian, its input and output) or ``"layer"``
    (any other module).
    """

    name: str  # the result key
    module: nn.Module
    spec: ResidualSpec | None  # residual adapter, if the module is a block read through one
    index: int  # position in the selection (forward-definition order)
    kind: str = "layer"
    module_name: str | None = None  # dotted name of the module that computes it (default: name)
    site: int | None = None  # index among its owner's residual sites

    def __post_init__(self) -> None:
        if self.spec is not None:
            self.kind = "adapter"
        if self.module_name is None:
            self.module_name = self.name

    @property
    def is_block(self) -> bool:
        return self.kind in ("adapter", "site")

    @property
    def residual(self) -> bool | None:
        if self.kind == "adapter":
            return bool(getattr(self.module, "residual", True))
        return True if self.kind in ("site", "block") else None


@dataclass
class _Owner:
    """A traced module and what its sites are keyed by."""

    module: nn.Module
    sites: list[Site]
    keys: list[str]  # one per site
    block: LayerInfo | None  # the whole-module entry (modules with several non-loop sites)
    selected: dict[int, LayerInfo]  # site index -> its entry, for the selected sites


def _needs_tracing(model: nn.Module, layers: LayerSpec | None) -> bool:
    """Whether the selection can only be resolved by tracing a forward pass: ``auto`` without any
    registered adapter block, an explicit selection with modules no adapter describes, or one
    naming sites by key."""
    if layers is None or layers == "auto":
        return not find_blocks(model)[0]
    modules, sites = _site_patterns(layers)
    return bool(sites) or any(residual_spec(m) is None for _, m in select_modules(model, modules))


def _site_patterns(layers: LayerSpec) -> tuple[LayerSpec | None, list[str]]:
    """(the selection's module patterns, its patterns of site keys): a pattern with a ``#``
    names sites of a module with several (``blocks.*#1``), matched against their keys."""
    if callable(layers) and not isinstance(layers, str):
        return layers, []
    patterns = [layers] if isinstance(layers, str) else list(layers)
    sites = [p for p in patterns if "#" in p]
    if not sites:
        return layers, []
    modules = [p for p in patterns if "#" not in p]
    return modules or None, sites


def resolve_layers(
    model: nn.Module,
    layers: LayerSpec | None,
    sites: dict[str, list[Site]] | None = None,
) -> tuple[list[LayerInfo], dict[str, _Owner], list[str]]:
    """Result entries of a selection, the traced owners behind them, and the names of selected
    modules without any residual site. A pattern with a ``#`` selects sites by key
    (:func:`~probe.hooks.select.select_sites`): ``blocks.*#1`` the second site of each block,
    without the block as a whole or its first.

    ``layers=None`` or ``"auto"`` selects every block a registered adapter describes or, when none
    does, every residual site ``sites`` (from :func:`~probe.hooks.sites.discover_sites`) holds.
    """
    adapters = {n: (m, spec) for n, m, spec in find_blocks(model)[0]}
    sites = sites or {}
    inside = tuple(n + "." for n in adapters)
    owners_all = {o: v for o, v in sites.items() if o not in adapters and not o.startswith(inside)}
    taken = set(owners_all)
    keys = {o: site_keys(o, v, taken) for o, v in owners_all.items()}
    by_key = {k: (o, i) for o, ks in keys.items() for i, k in enumerate(ks)}
    auto = layers is None or layers == "auto"
    if auto:
        if adapters:
            chosen = [(n, m) for n, (m, _) in adapters.items()]
        else:
            chosen = [(o, model.get_submodule(o)) for o in owners_all]
        if not chosen:
            raise ProbeError(
                f"No residual sites found in {type(model).__name__}: no module adds two tensors "
                "of the same shape that are both computed from its input (y = S(x) + F(x), or "
                "y = S(x) − F(x)). "
                "Models that concatenate features instead (DenseNet, Inception, ShuffleNet) or "
                "have no shortcuts (VGG) have none. Select modules explicitly to probe them as "
                "layers (e.g. layers='features.*', --layers 'features.*' in the CLI; "
                f"{outline(model)}), or declare a block with probe.register_residual(BlockClass, "
                "ResidualSpec(branch=..., shortcut=...))."
            )
    else:
        modules, site_specs = _site_patterns(layers)
        chosen = select_modules(model, modules) if modules is not None else []
        if site_specs:
            picked = select_sites(site_specs, list(by_key))
            place = {n: i for i, (n, _) in enumerate(model.named_modules())}

            def where(name: str) -> tuple[int, int]:
                """A module's place in the model; a site's is its module's, then its index."""
                if name in place:
                    return place[name], -1
                owner, i = by_key[name]
                return place[owner], i

            named = dict(chosen) | {k: model.get_submodule(by_key[k][0]) for k in picked}
            chosen = sorted(named.items(), key=lambda nm: where(nm[0]))
    infos: list[LayerInfo] = []
    owners: dict[str, _Owner] = {}
    plain: list[str] = []

    def owner(o: str) -> _Owner:
        if o not in owners:
            owners[o] = _Owner(
                model.get_submodule(o) if o else model, owners_all[o], keys[o], None, {}
            )
        return owners[o]

    def add_site(o: str, i: int) -> None:
        own = owner(o)
        if i in own.selected:
            return
        module_name = own.sites[i].child if own.keys[i] == own.sites[i].child else o
        info = LayerInfo(
            own.keys[i], own.module, None, len(infos), "site", module_name or "model", i
        )
        own.selected[i] = info
        infos.append(info)

    for name, m in chosen:
        spec = adapters.get(name, (None, None))[1] or residual_spec(m)
        if spec is not None:
            infos.append(LayerInfo(name, m, spec, len(infos)))
        elif name in owners_all:
            own = owner(name)
            # the whole-module entry; the model itself is no block (x and y would be its
            # input and logits), and its name '' would be no layer key
            if len(own.sites) > 1 and own.keys[0] != own.sites[0].child and name:
                own.block = LayerInfo(name, m, None, len(infos), "block")
                infos.append(own.block)
            for i in range(len(own.sites)):
                add_site(name, i)
        elif name in by_key:
            add_site(*by_key[name])
        else:
            infos.append(LayerInfo(name, m, None, len(infos)))
            plain.append(name)
    return infos, owners, plain


def _version(t: torch.Tensor | None) -> int | None:
    """The tensor's in-place version counter (None for no tensor / inference-mode tensors)."""
    try:
        return None if t is None else t._version
    except RuntimeError:
        return None


def _storages(call: Call, phase: str = "forward") -> set[int]:
    """The memory behind a call's tensors of one ``phase``: in the forward, its input, output,
    the block's split and arguments; in the backward, its gradients."""
    if phase == "forward":
        tensors = [call.input, call.output, *call.args]
        if call.block is not None:
            b = call.block
            tensors += [b.x, b.f, b.s, b.y]
    else:
        tensors = [call.grad_output, call.grad_input]
    ptrs = {storage_ptr(t) for t in tensors if isinstance(t, torch.Tensor)}
    ptrs.discard(None)
    return ptrs


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration of a batch (restored after).

    A probed pass allocates thousands of tracked objects (calls, result dicts, tensor views) that
    all live until the batch ends, so the collections the allocations trigger mid-pass traverse
    them and find nothing to free: ~13 ms of a 200 ms ResNet-56 statistics pass. Once the batch
    ends they are freed by reference counting, and the next collection has little to visit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state and, for a CUDA batch, its device's (to run a batch again)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# Small CPU results are copied into one block per dtype once the batch's activations are freed.
# Left where the probes allocated them -- between activations -- the results a capture keeps
# (in memory, or queued for HDF5 until a chunk fills) split glibc's heap so that later batches
# could not reuse it: ResNet-56 at batch 64 with statistics grew ~100 MB per batch without bound.
_COMPACT_BYTES = 256 << 10


def _compactable(t: torch.Tensor) -> bool:
    """Whether :func:`_compacted` copies ``t`` into its dtype's block."""
    return t.is_cpu and t.nbytes <= _COMPACT_BYTES


def _compacted(
    results: dict[str, dict[str, torch.Tensor]], nonfinite: NonFiniteCounter
) -> dict[str, dict[str, torch.Tensor]]:
    """``results`` with every small CPU tensor replaced by an equal view of a fresh block; the
    floating-point blocks are handed to ``nonfinite``, which checks them whole."""
    # dtype -> shape -> the results of that shape: a statistics batch holds ~380 small results of
    # a handful of shapes ([N], [N, C] per stage), and each call on one costs microseconds (a
    # view ~8 us), so each run of one shape is copied by cat and handed out by one unbind
    groups: dict[torch.dtype, dict[torch.Size, list[tuple[str, str, torch.Tensor]]]] = {}
    for key, qs in results.items():
        for q, t in qs.items():
            if _compactable(t):
                groups.setdefault(t.dtype, {}).setdefault(t.shape, []).append((key, q, t))
    for dtype, runs in groups.items():
        sizes = {shape: math.prod(shape) for shape in runs}
        total = sum(len(items) * sizes[shape] for shape, items in runs.items())
        # on the CPU, whatever the default device (a user's torch.set_default_device)
        block = torch.empty(total, dtype=dtype, device="cpu")
        start = 0
        # Autocast off: this is bookkeeping, and a capture inside the user's CPU autocast made
        # cat refuse fp16 results (fp16 activations under bf16 autocast failed).
        with torch.autocast("cpu", enabled=False):
            for shape, items in runs.items():
                end = start + len(items) * sizes[shape]
                run = block[start:end].view(len(items), *shape)
                _serial_cat([t for _, _, t in items], sizes[shape], run.flatten(0, 1))
                for (key, q, _), piece in zip(items, run.unbind(0)):
                    results[key][q] = piece
                start = end
        if block.is_floating_point():  # read one by one only if the block holds a NaN or an inf
            pieces = ((key, results[key][q]) for items in runs.values() for key, q, _ in items)
            nonfinite.add_block(block, pieces)
    return results


# CPU torch.cat copies a result of fewer elements than this in one serial loop; a larger one input
# by input, a TensorIterator each (~1 us apiece): 270 us against 65 us for the ~300 results of a
# ResNet-56 statistics batch on 2 threads (torch.internal GRAIN_SIZE).
_SERIAL_CAT = 32768


def _serial_cat(tensors: list[torch.Tensor], size: int, out: torch.Tensor) -> None:
    """``torch.cat(tensors, out=out)`` along the first axis for CPU tensors of one shape and
    ``size`` elements each (at least one axis), in runs of under _SERIAL_CAT elements."""
    rows = tensors[0].shape[0]
    per_run = max(1, (_SERIAL_CAT - 1) // size) if size else len(tensors)
    for first in range(0, len(tensors), per_run):
        part = tensors[first : first + per_run]
        torch.cat(part, out=out[first * rows : (first + len(part)) * rows])


def _output_site(own: _Owner) -> bool:
    """Whether the one selected site of ``own`` has the owner's output as its y: the owner has a
    single site, not a loop site (x + child(x), whose y is the add inside a parent), whose add has
    the owner's output shape (see _on_owner). Its add's result itself is then never read."""
    if own.block is not None or len(own.sites) != 1:
        return False
    site = own.sites[0]
    return site.as_output and own.keys[0] != site.child and 0 in own.selected


def _kept_out(rec: SiteRecord, where: str) -> torch.Tensor:
    """A site's add result, where it is read; never one an in-place op changed uncopied."""
    if not rec.out_kept:
        raise ProbeError(
            f"The result of the residual add in {where} was changed in place and is needed, but "
            "the module's output was expected to stand for it (its output no longer has the "
            "add's shape). Capture it with layers= selecting its submodules instead."
        )
    return rec.out


# Calls held for grouped statistics are computed once their tensors reach this many bytes: the
# stack copies them, so a group costs about twice this at its peak (ResNet-56 at batch 512 in
# bf16: a stage's nine blocks, ~450 MB).
_GROUP_BYTES = 512 << 20

# On a CPU, by default, only calls whose tensors (a block's distinct x, F, S, y) take at most
# this many bytes are grouped: there a probe's ~50 small ops per call, not its arithmetic, bound
# the pass, and the stack's copy is small. A larger call is computed at once, while the cache
# still holds its tensors; stacked later, they would be read back from memory, and copied
# (ResNet-56, 2 threads: every block grouped took 0.75-0.78 x the per-call time at batch 1,
# 1.10-1.14 x at batch 64; docs/performance-log.md, "Small blocks grouped on the CPU"). Blocks whose
# statistics the one-pass kernels take are not grouped: with a handful of ops per call, a stack's
# copy costs more than it shares (1.00 x at batch 1, 0.93-0.96 x per call at batch 8-16;
# "The eager statistics in one read").
_CPU_GROUP_CALL_BYTES = 2 << 20
# Those small calls are computed once they hold this much: their small ops are already shared
# many ways, and a deep model's chain of small blocks is not all held at once.
_CPU_GROUP_BYTES = 32 << 20


def _distinct_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct tensors among ``tensors`` (S is x for an identity shortcut)."""
    distinct = {id(t): t for t in tensors if t is not None}
    return sum(t.nbytes for t in distinct.values())


@dataclass
class _Held:
    """A call held for its groupable probes' forward or backward half, with what its results
    are merged with."""

    call: Call
    phase: str  # "forward" or "backward"
    name: str  # the layer's name (the results' view slots are keyed by it)
    probes: tuple[Probe, ...]
    sources: set[int]  # the memory of the call's tensors of this phase (_storages)

    def __post_init__(self) -> None:
        tensors = {id(t): t for t in group_tensors(self.call, self.phase) if t is not None}
        self.tensors = list(tensors.values())
        versions = [_version(t) for t in self.tensors]
        self.versions = None if None in versions else versions
        self.nbytes = _distinct_bytes(self.tensors)

    def changed(self) -> bool:
        """Whether an in-place op changed one of the call's tensors since it was held."""
        return [_version(t) for t in self.tensors] != self.versions


def _refuse_flattened(model: nn.Module, callees: dict[str, tuple[str, ...]]) -> None:
    """A torch.fx GraphModule whose code calls modules below its children is a flattened model
    (``symbolic_trace``, torchvision's ``create_feature_extractor``): every block's code is
    inlined into one function, so an add's input and result are not a block's x and y (the
    ReLU after each add, and the stem before the first, belong to no block)."""
    for owner, called in callees.items():
        module = model.get_submodule(owner) if owner else model
        prefix = f"{owner}." if owner else ""
        deep = [c for c in called if "." in c[len(prefix) :]]
        if isinstance(module, torch.fx.GraphModule) and deep:
            raise ProbeError(
                f"{type(module).__name__} {owner or 'model'!r} is a torch.fx GraphModule whose "
                f"code calls modules inside its blocks ({', '.join(deep[:3])}): a traced or "
                "feature-extractor model, whose blocks were inlined into one function. A "
                "residual add there has no block around it to read x and y from (the ReLU after "
                "each add, the layers before the first, belong to none). Capture the model it "
                "was made from: its layer names are the same."
            )


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
        grouped: bool | None = None,
        cuda_graph: bool = False,
    ) -> None:
        if mode not in ("eval", "train", "keep"):
            raise ProbeError(f"Invalid mode {mode!r}; allowed: eval, train, keep.")
        check_grouped(grouped)
        check_cuda_graph(cuda_graph)
        probes = as_probes(probes)
        if not probes:
            raise ProbeError("No probes given; pass e.g. probes=[probe.ResidualNorms()].")
        if cuda_graph:
            check_replayable(probes)
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ProbeError(f"Each probe may be given once; got {names}.")
        # A wrapped model is captured through the module it wraps, run as it is: its layers keep
        # their names; a torch.compile'd one runs eagerly, so the hooks' Python (version
        # counters, storages, the tracer's mode) runs as written instead of being traced by
        # Dynamo at every call (which broke the graph there, recompiled the probes' own
        # functions to Dynamo's limit, and warned); DataParallel's replicas would run the hooks
        # on threads of their own, and DistributedDataParallel's gradient sync is not a capture's.
        model = named_root(model)
        self.model, self.probes, self.mode = model, list(probes), mode
        # Summed per-sample losses: row n of every gradient is then sample n's own (eval mode).
        self.loss_fn = loss_fn or exact_cross_entropy
        self._default_loss = loss_fn is None
        self.needs_grad = any(p.needs_grad for p in probes)
        # probes that differentiate, in their backward half or their forward one
        self._autograd = self.needs_grad or any(p.forward_grad for p in probes)
        # Gradient probes that only reduce what they are given run inside the tensor hooks.
        self._eager_backward = all(p.eager_backward for p in probes if p.needs_grad)
        # Model-scope probes (e.g. shattered gradients) see the whole network once per batch.
        self.layer_probes = [p for p in probes if getattr(p, "scope", "layer") == "layer"]
        self.model_probes = [p for p in probes if getattr(p, "scope", "layer") == "model"]
        # Probes that read a call's output alone let traced blocks go untraced (_served).
        self._output_only = all(p.output_only() for p in self.layer_probes)
        # probes with a forward or backward half of their own (the others' return nothing)
        self._forward_probes = [
            p for p in self.layer_probes if type(p).forward is not Probe.forward
        ]
        self._grad_probes = [p for p in self.layer_probes if p.needs_grad]
        # the probes whose calls may be held for a group, by phase: every groupable one, and
        # those that reduce (the CPU's default for small calls; see _group_limit_for)
        phases = {"forward": self.layer_probes, "backward": self._grad_probes}
        self._groupable = {
            ph: frozenset(id(p) for p in ps if takes_groups(p, ph)) for ph, ps in phases.items()
        }
        self._reducing = {
            ph: frozenset(id(p) for p in ps if takes_groups(p, ph) and p.reduces)
            for ph, ps in phases.items()
        }
        self._model_info = LayerInfo("model", model, None, -1)
        self._selection = layers
        # Blocks read through adapters are known now; residual sites anywhere else are found by
        # tracing the first batch (run_batch), so the layers are resolved there.
        self._tracing = _needs_tracing(model, layers)
        self.layers: list[LayerInfo] = []
        self.plain_layers: list[str] = []  # selected modules without a residual site
        self.model_sites: int | None = None  # residual adds in the whole model, once traced
        # layer keys whose output got its gradient in some batch, and those whose did not once
        self.with_gradient: set[str] = set()
        self.without_gradient: dict[str, None] = {}
        self._callees: dict[str, tuple[str, ...]] = {}  # modules each owner calls (Site.callees)
        self._owners: dict[str, _Owner] = {}
        if not self._tracing:
            self.layers, self._owners, self.plain_layers = resolve_layers(model, layers)
        self._tracer = SiteTracer(self._on_owner)
        self._tracer.suspended = True  # as the hooks (see _active)
        self._stack = contextlib.ExitStack()
        self.inplace: list[str] = []
        self._handles: list = []
        self._split: dict[str, tuple[nn.Module, nn.Module | None]] = {}  # adapter blocks' F, S
        self._flags: dict[nn.Module, bool] = {}
        self._saved_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The hooks act inside run_batch only: a pass of the caller's own between batches runs
        # the model as it is, instead of running every probe for results no one reads.
        self._suspended = True
        self._open = False
        self.dim_labels: dict[tuple[str, str], tuple[str, ...]] = {}  # (key, quantity) -> axes
        self._axes_checked: set[str] = set()  # layer keys whose layouts were checked
        self.recorded: set[str] = set()  # names of the probes that have returned a result
        self._nonfinite = NonFiniteCounter()  # key -> samples with a NaN/inf result
        self._grad_hooks: list[torch.utils.hooks.RemovableHandle] = []  # this batch's tensor hooks
        # (layer, quantity) -> whether its results may stay views of the pass's own tensors:
        # unknown until a batch has shown that no later in-place op changes them (_guard).
        self._may_alias: dict[tuple[str, str], bool] = {}
        self._in_batch = False
        # Groupable probes' calls held and computed together (probe.probes.group): by default
        # every call where a batch is on an accelerator, whose probed pass is bound by kernel
        # launches, and on the CPU the reducing probes' calls with small tensors (_group_limit_for).
        self.grouped = grouped
        # for the batch being run: the most bytes a grouped call may hold (None: no grouping)
        self._group_limit: float | None = None
        self._group_unsafe = False  # a held call's tensor changed in place before it was computed
        # Some hooked tensor lay off the input's gradient path (a frozen part run under no_grad
        # or detached): the backward differentiates for every hooked tensor from then on.
        self._off_input_path = False
        # Probed passes recorded as CUDA graphs and replayed (probe.replay), by pass_key.
        self.cuda_graph = cuda_graph
        self._recordings: dict[tuple, Recording] = {}
        self._seen_keys: Counter = Counter()  # batches run eagerly per pass key
        self.graph_off: str | None = None  # why recorded passes are no longer used, if so
        self.replayed_batches = 0  # batches whose results came from a replay
        # how passes are recorded, and the device check: replaced off the GPU by check_probe
        self._record_graph, self._check_device = record_graph, check_device
        self._recording = False  # a pass being recorded (or the one before it)
        # replayed batches' label checks, read at the next batch (_queue_label_check)
        self._label_checks: list[tuple[int, torch.Tensor, object, int]] = []
        self.shapes: dict[
            str, tuple
        ] = {}  # key -> (output, branch or None, input or None) shapes per sample
        self._reset_batch(0)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> HookSession:
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
        self._open = True
        if not self._tracing:
            try:
                self._install_all()
            except BaseException:
                self.close()
                raise
        return self

    def _resolve(self, x: torch.Tensor) -> None:
        """Trace a forward of the batch's first two samples to find the residual sites, then
        select the layers and install the hooks (first batch only)."""
        with self._suspend():
            sites = discover_sites(self.model, (x[:2] if len(x) > 1 else x,))
        self.model_sites = sum(len(v) for v in sites.values())
        self._callees = {owner: found[0].callees for owner, found in sites.items()}
        _refuse_flattened(self.model, self._callees)
        self.layers, self._owners, self.plain_layers = resolve_layers(
            self.model, self._selection, sites
        )
        self._tracing = False
        self._install_all()

    def _install_all(self) -> None:
        self.inplace = sorted({n for info in self.layers for n in inplace_modules(info.module)})
        adapters = [info for info in self.layers if info.kind == "adapter"]
        if self.inplace and adapters:
            warnings.warn(
                f"In-place modules in the hooked layers ({', '.join(self.inplace[:4])}"
                f"{' ...' if len(self.inplace) > 4 else ''}): captured tensors are cloned where a later "
                "in-place op could overwrite them.",
                InPlaceWarning,
                stacklevel=4,
            )
        if self.plain_layers and any(p.name in ("residual", "jacobian") for p in self.probes):
            warnings.warn(
                f"{len(self.plain_layers)} selected module(s) hold no residual site "
                f"({', '.join(self.plain_layers[:4])}{' ...' if len(self.plain_layers) > 4 else ''}):"
                " residual quantities (F, S, jac_dev2) are recorded only at residual sites. "
                "layers='auto' selects every site. To measure a plain block against the identity "
                "it lacks (a plain counterpart of a residual net), declare its branch: "
                "probe.register_residual(BlockClass, probe.ResidualSpec(branch='f')) with "
                "residual = False on the block (docs/probes.md, 'Adapters').",
                NoResidualWarning,
                stacklevel=4,
            )
        for info in self.layers:
            if info.kind in ("adapter", "layer"):
                self._install(info)
        traced = {}
        for name, own in self._owners.items():
            if self._served(own):
                hook = self._on_served(own)
                self._handles.append(own.module.register_forward_hook(hook, with_kwargs=True))
            else:
                traced[name] = own.module
        if traced:
            self._tracer.spare = frozenset(n for n in traced if _output_site(self._owners[n]))
            self._stack.enter_context(self._tracer.attach(traced, callees=self._callees))

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook, restore every module's training flag and the buffers of modules that
        ran in training mode (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._release_batch()
        self._recordings.clear()  # their graphs and memory pools
        self._stack.close()
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
        # A block's split (x, F, S) is read by hooks on its entry and its branch; probes that
        # read outputs alone need neither (two hooked calls and the split's checks per block,
        # ~1 % of a ResNet-56 pass whose block outputs are kept).
        if info.spec is not None and not self._output_only:
            branch, shortcut = self._split[info.name] = info.spec.resolve(info.module, info.name)
            clone = info.spec.clone_branch or bool(self.inplace)
            self._handles.append(
                info.module.register_forward_pre_hook(self._on_entry(info), with_kwargs=True)
            )
            self._handles.append(
                branch.register_forward_hook(self._stash("_branch_out", info.name, clone))
            )
            # An nn.Identity returns its input itself: S is the x the entry hook keeps (see
            # _block_tensors), and a hook on it would cost a hooked call per block for nothing.
            if shortcut is not None and type(shortcut) is not nn.Identity:
                self._handles.append(
                    shortcut.register_forward_hook(self._stash("_shortcut_out", info.name, clone))
                )
        self._handles.append(
            info.module.register_forward_hook(self._on_forward(info), with_kwargs=True)
        )

    def _stash(self, store: str, name: str, clone: bool):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not self._suspended:
                t = first_tensor(output)
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
            x = input_tensor(args, kwargs)  # the same rule Call.function() differentiates by
            if x is None:
                tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
                raise ProbeError(
                    f"Block {info.name!r} ({type(module).__name__}) was called without a "
                    f"positional tensor and with {len(tensors)} tensor keywords "
                    f"({', '.join(tensors) or 'none'}), so its input x is ambiguous. Call it "
                    "with x first, or select its submodules with layers=... instead."
                )
            self._entry[info.name] = (x, _version(x))
            self._branch_calls[info.name] = 0

        return hook

    def _key(self, name: str) -> str:
        k = self._counts[name]
        self._counts[name] += 1
        return name if k == 0 else f"{name}@{k}"

    def _block_tensors(
        self, info: LayerInfo, y: torch.Tensor
    ) -> tuple[BlockTensors, nn.Module | None]:
        """The block's split, and the module computing S (None: identity)."""
        branch, shortcut = self._split[info.name]  # resolved once, where the hooks went
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
        return BlockTensors(x=x, f=f, s=s, y=y, residual=bool(info.residual)), shortcut

    def _on_forward(self, info: LayerInfo):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if self._suspended:
                return
            y = first_tensor(output)
            if y is None:
                return
            key = self._key(info.name)
            split = info.spec is not None and not self._output_only
            block, shortcut = self._block_tensors(info, y) if split else (None, None)
            if block is not None:
                x = block.x
            elif info.spec is not None:  # a block read for its output alone (see _install):
                x = input_tensor(args, kwargs)  # _emit records no F shape, F not being seen
            else:
                x = first_tensor(args)
            call = Call(key, module, x, y, self._offset, block, args=args, kwargs=kwargs)
            if block is not None:
                identity = shortcut is None or isinstance(shortcut, nn.Identity)
                call.identity_shortcut, call.shortcut = identity, None if identity else shortcut
            self._emit(info, call)
            return None  # a forward hook that returns a value would replace the output

        return hook

    def _check_axes(self, info: LayerInfo, call: Call) -> None:
        """Refuse an "auto" layout where a layer's three-axis tensors could be read two ways
        (:func:`probe.probes.layout.check_auto_axes`)."""
        auto = [
            p
            for p in self.layer_probes
            if getattr(p, "layout", None) == "auto" and p.applies_to(call)
        ]
        if not auto:
            return
        tensors = {"output": call.output, "F(x)": call.block.f if call.block else None}
        if any(getattr(p, "which", "output") == "input" for p in auto):  # what they read
            tensors["input"] = call.input
        module = info.module
        with contextlib.suppress(AttributeError):  # a site's own branch, where it has one
            module = self.model.get_submodule(info.module_name)
        check_auto_axes(call.name, module, tensors, [p.name for p in auto])

    def _emit(self, info: LayerInfo, call: Call) -> None:
        """Run the layer probes on one call and arrange for their backward half."""
        key = call.name
        self._info[key] = info
        if key not in self.shapes:
            self.shapes[key] = (
                tuple(call.output.shape[1:]),
                tuple(call.block.f.shape[1:]) if call.block else None,
                tuple(call.input.shape[1:]) if call.input is not None else None,
            )
        if key not in self._axes_checked:  # once per layer key, at its first call
            self._axes_checked.add(key)
            self._check_axes(info, call)
        call.peers = self._forward_probes
        results = self._results[key]
        sources = _storages(call)  # the memory a result kept as it is would share
        held: list[Probe] = []
        grouped = self._grouped_probes(call, "forward")
        with self._suspend():
            for p in self._forward_probes:
                if p.applies_to(call):
                    if id(p) in grouped:
                        held.append(p)
                        continue
                    with torch.set_grad_enabled(p.forward_grad and torch.is_grad_enabled()):
                        new = p.forward(call)
                    self._merge(results, new, p, key, call.batch_size, (info.name, sources))
            if held:
                self._hold(_Held(call, "forward", info.name, tuple(held), sources))
        y, x = call.output, call.input
        if self.needs_grad and not y.requires_grad and self._grad_probes:
            # computed without autograd (no_grad, detached, frozen): no gradient can reach it
            self.without_gradient.setdefault(key, None)
        if self.needs_grad and y.requires_grad:
            self._calls.append(call)
            waits = {"grad_output"}
            if call.block is not None and x is not None and x.requires_grad:
                waits.add("grad_input")
            self._waits.append(waits)
            self._grad_hooks.append(y.register_hook(self._grad_setter(call, "grad_output", waits)))
            if "grad_input" in waits:
                self._grad_hooks.append(
                    x.register_hook(self._grad_setter(call, "grad_input", waits))
                )

    def _hold(self, held: _Held) -> None:
        """Keep a call for its groupable probes; first compute the calls held so far, when this
        one cannot join them (another key) or they hold enough memory already."""
        if held.versions is None:  # no version counter to tell an in-place change: compute now
            self._compute([held])
            return
        key = (group_key(held.call, held.phase), tuple(map(id, held.probes)))
        budget = _GROUP_BYTES if self._group_limit == math.inf else _CPU_GROUP_BYTES
        if self._held and (key != self._held_key or self._held_bytes >= budget):
            self.flush_held()
        self._held.append(held)
        self._held_key = key
        self._held_bytes += held.nbytes

    def flush_held(self) -> None:
        """Compute the calls held for groupable probes (the session does at the end of every
        forward pass). Should a held tensor have changed in place since its call, nothing is
        computed and the batch runs again, without holding (:meth:`run_batch`)."""
        held, self._held, self._held_bytes = self._held, [], 0
        if not held:
            return
        if any(h.changed() for h in held):
            log.debug("a tensor held for grouped statistics changed in place; not grouping")
            self._group_unsafe = self._group_changed = True
            return
        self._compute(held)

    def _compute(self, held: list[_Held]) -> None:
        group = CallGroup([h.call for h in held])
        forward = held[0].phase == "forward"
        with self._suspend(), torch.no_grad():
            for p in held[0].probes:
                news = p.forward_group(group) if forward else p.backward_group(group)
                for h, new in zip(held, news):
                    c = h.call
                    where = (h.name, h.sources)
                    self._merge(self._results[c.name], new, p, c.name, c.batch_size, where)
        if not forward:
            for c in group.calls:  # their gradients are not held to the end of the pass
                c.grad_output = c.grad_input = None

    def _served(self, own: _Owner) -> bool:
        """Whether ``own`` is read from a forward hook on its module instead of by tracing its
        code: every layer probe reads outputs only (``Probe.output_only``), and the module's one
        site is not a loop site (x + child(x), whose output is not the module's) and has the
        module's output shape, so that the site's y is the module's output (as in _on_owner)."""
        return self._output_only and _output_site(own)

    def _on_served(self, own: _Owner):
        """Forward hook of a module read without tracing (see _served): the call _on_owner makes
        for its site, less what output-only probes do not read (input, split, function)."""
        info = own.selected[0]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if self._suspended:
                return
            y, x = first_tensor(output), input_tensor(args, kwargs)
            if y is None or x is None or not x.is_floating_point():
                return  # _on_owner has no input stream there either
            key = self._key(info.name)
            # the shapes _on_owner records (F has the add's shape, which is y's): same attributes
            self.shapes.setdefault(
                key, (tuple(y.shape[1:]), tuple(y.shape[1:]), tuple(x.shape[1:]))
            )
            self._emit(info, Call(key, module, None, y, self._offset, args=args, kwargs=kwargs))

        return hook

    def _on_owner(self, owner_call: OwnerCall, output: object) -> None:
        """A traced module returned: one call per selected site (and one for the whole block)."""
        if self._suspended:
            return
        own = self._owners[owner_call.name]
        records = owner_call.sites
        where = f"{type(own.module).__name__} {owner_call.name or 'model'!r}"
        if len(records) != len(own.sites):
            raise ProbeError(
                f"{where} ran {len(records)} residual add(s) in this call but {len(own.sites)} "
                "when its sites were found on the first batch, so its sites cannot be matched. "
                "Its forward takes different paths per call (e.g. a branch skipped at random in "
                "training mode); capture in eval mode, or select it as a plain layer."
            )
        y = first_tensor(output)
        x0 = owner_call.x
        if y is None or x0 is None:
            return
        args, kwargs = owner_call.args, owner_call.kwargs
        whole = Call("", own.module, x0, y, self._offset, args=args, kwargs=kwargs).function()

        def block_shortcut(call: Call, rec) -> None:
            call.identity_shortcut = rec.identity
            if not rec.identity:
                call.shortcut = shortcut_map(own.module, whole)

        if own.block is not None:
            call = Call(
                self._key(own.block.name), own.module, x0, y, self._offset, args=args, kwargs=kwargs
            )
            block_shortcut(call, records[-1])
            self._emit(own.block, call)
        for i, rec in enumerate(records):
            info = own.selected.get(i)
            if info is None:
                continue
            last = i == len(records) - 1
            loop = own.keys[i] == rec.child
            if loop:  # x + k·child(x): the site's map is z -> z + k·child(z)
                child = self.model.get_submodule(rec.child)
                x_k, y_k = rec.s, _kept_out(rec, where)
                fn = lambda z, child=child, k=rec.branch_scale: z + k * first_tensor(child(z))  # noqa: E731
            else:
                x_k = x0 if i == 0 else _kept_out(records[i - 1], where)
                if len(records) > 1 and rec.s_feeds_f:
                    # one of several sites: its x is the stream that enters it, the shortcut
                    # its branch was computed from (a stem or a ReLU may lie before it)
                    x_k = rec.s
                elif i == 0 and len(records) > 1 and rec.source is not None:
                    # the first of several, F and S computed beside each other after a stem
                    # (proj(h) + f(h)): the tensor both were computed from, not the input
                    x_k = rec.source
                y_k = y if last and y.shape == rec.out.shape else _kept_out(rec, where)
                fn = whole if len(records) == 1 else None
            block = BlockTensors(x=x_k, f=rec.f, s=rec.s, y=y_k, residual=True)
            call = Call(
                self._key(info.name),
                own.module,
                x_k,
                y_k,
                self._offset,
                block,
                args=args,
                kwargs=kwargs,
            )
            call.fn, call.own_map = fn, fn is not None
            if loop:
                call.identity_shortcut = True
            elif fn is not None:
                block_shortcut(call, rec)
            self._emit(info, call)

    def _grad_setter(self, call: Call, attr: str, waits: set[str]):
        """A tensor hook that hands ``call`` its gradient; once the call has every gradient it
        waits for, probes that reduce gradients (``eager_backward``) run at once and the gradients
        are dropped, so dL/dy of every block is not held until the whole backward pass ends."""

        def hook(grad: torch.Tensor) -> None:
            # The gradient object itself (it needs no graph here): a block's dL/dy is the next
            # block's dL/dx, and probes recognise the same tensor (statistics.NormMemo).
            setattr(call, attr, grad.detach() if grad.requires_grad else grad)
            waits.discard(attr)
            if attr == "grad_output":
                self.with_gradient.add(call.name)
            if not waits and self._eager_backward:
                self._backward_done.add(id(call))
                probes = [p for p in self._grad_probes if p.applies_to(call)]
                grouped = self._grouped_probes(call, "backward")
                held = [p for p in probes if id(p) in grouped]
                sources = _storages(call, "backward")  # what a raw gradient result would share
                self._run_backward(call, [p for p in probes if id(p) not in grouped], sources)
                if held:  # its gradients are dropped once the group is computed
                    self._hold(_Held(call, "backward", self._layer(call), tuple(held), sources))
                    return
                call.grad_output = call.grad_input = None

        return hook

    def _run_backward(
        self, call: Call, probes: Sequence[Probe] | None = None, sources: set[int] | None = None
    ) -> None:
        """The backward half of ``probes`` (default: every gradient probe that applies);
        ``sources``: the memory of the call's gradients, when already known (see _storages)."""
        if probes is None:
            probes = [p for p in self._grad_probes if p.applies_to(call)]
        if not probes:
            return
        if sources is None:
            sources = _storages(call, "backward")
        shares = (self._layer(call), sources)  # a raw gradient returned as it is: a view
        with self._suspend():
            for p in probes:
                results = self._results[call.name]
                self._merge(results, p.backward(call), p, call.name, call.batch_size, shares)

    def _layer(self, call: Call) -> str:
        """The name of the layer ``call`` is a call of (its results' view slots are keyed by it)."""
        return self._info[call.name].name

    def _merge(
        self,
        results: dict,
        new: dict,
        probe: Probe,
        key: str,
        n: int,
        shares: tuple[str, set[int]] | None = None,
    ) -> None:
        """Add a probe's results to the layer's; ``shares`` = (layer name, the storages of the
        call's tensors of this phase, see ``_storages``) for results that may be views of those
        tensors: an activation or a gradient returned as it is (see :meth:`_guard`)."""
        sources = shares[1] if shares is not None else ()
        if new:
            self.recorded.add(probe.name)
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
            if t.requires_grad:  # a probe that differentiated; detach() costs a dispatch each
                t = t.detach()
            if sources and storage_ptr(t) in sources:
                t = self._guard(key, (shares[0], q), t)
            results[q] = t
            # a small CPU result is checked in the block its batch's results are copied into
            # (_compacted); a recorded pass keeps its results where they are
            if t.is_floating_point() and (self._recording or not _compactable(t)):
                self._nonfinite.add(key, t)
            if (key, q) not in self.dim_labels:  # a quantity's axes: fixed by its first batch
                labels = probe.dim_labels(q, t)
                if labels is not None:
                    self.dim_labels[(key, q)] = tuple(labels)

    def _guard(self, key: str, slot: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        """A result that shares memory with the pass's own tensors (an activation kept as it is):
        kept as a view where no in-place op changes it later in the pass, copied elsewhere.

        A copy of every raw activation cost ResNet-56's block outputs ~6 % of the pass, and most
        models never modify a block's output in place. Which quantities are safe is learnt from
        the data: the first batch copies each one and watches its source's version counter (any
        in-place op bumps it); a quantity whose source stayed unchanged is kept as a view from
        then on and still watched, and :meth:`run_batch` runs a batch again, copying, if a watched
        view did change (an in-place op that only some batches take). Partial views (a
        subsample, a cap) are always copied, so a small result never pins a large activation."""
        version = _version(t)
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        state = (
            self._may_alias.get(slot) if self._in_batch and whole and version is not None else False
        )
        if state is not False:
            self._watched.append((slot, t, version, state is None))
        if state:
            self._views.append((key, slot))
        return t if state else t.clone()

    def _unshared(self, results: dict[str, dict[str, torch.Tensor]]) -> None:
        """Copy the views whose memory anything but the results still holds once the batch is
        over: a buffer the model keeps and refills (preallocated or CUDA-graph outputs), the
        caller's batch (a loader may refill it), the logits. Version counters cannot see a change
        made after the batch, so only memory no one else holds is left shared. Without the
        storage use count (a private torch API), every view is copied."""
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        views = [(key, slot, results[key][slot[1]]) for key, slot in self._views]
        ours = Counter(storage_ptr(t) for _, _, t in views)
        for key, slot, t in views:
            # tensors holding the memory, besides the Python storage object made to ask
            holders = use_count(t.untyped_storage()._cdata) - 1 if use_count else None
            if holders is None or holders > ours[storage_ptr(t)]:
                results[key][slot[1]] = t.clone()
                self._may_alias[slot] = False

    def _aliases_held(self) -> bool:
        """Whether every result kept as a view still holds what its probe saw; learns which
        quantities may be views (first batches) and stops trusting the ones that changed."""
        changed = {slot for slot, t, version, _ in self._watched if _version(t) != version}
        for slot, _, _, trial in self._watched:
            if trial or slot in changed:
                self._may_alias[slot] = slot not in changed
        return not any(slot in changed for slot, _, _, trial in self._watched if not trial)

    def _active(self) -> contextlib.AbstractContextManager[None]:
        """The hooks (and the site tracer) act for the duration: inside :meth:`run_batch`."""
        return self._hooks(suspended=False)

    def _suspend(self) -> contextlib.AbstractContextManager[None]:
        """The hooks stand still for the duration: the session's own passes (tracing, shortcuts
        evaluated, model-level probes)."""
        return self._hooks(suspended=True)

    @contextlib.contextmanager
    def _hooks(self, *, suspended: bool) -> Iterator[None]:
        previous, self._suspended = self._suspended, suspended
        traced, self._tracer.suspended = self._tracer.suspended, suspended
        try:
            yield
        finally:
            self._suspended = previous
            self._tracer.suspended = traced

    def _release_batch(self, keep_counts: bool = False) -> None:
        """Drop the batch's tensors and gradient hooks (and its non-finite entries, unless
        ``keep_counts``: they are counted once its results are compacted). The tensor hooks
        close over their Call, which holds the hooked tensors: a cycle through autograd's C++
        nodes that Python's GC cannot see. Left in place, it kept every block's activations of
        every batch alive (+200 MB per ResNet-56 batch of 64, tests/probe/test_session_memory.py)."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks.clear()
        if not keep_counts:
            self._nonfinite.discard_batch()
        self._watched: list[tuple[tuple[str, str], torch.Tensor, int | None, bool]] = []
        self._calls: list[Call] = []
        self._waits: list[set[str]] = []  # per call of _calls: the gradients still to arrive
        self._branch_out: dict[str, torch.Tensor] = {}
        self._shortcut_out: dict[str, torch.Tensor] = {}
        self._entry: dict[str, tuple[torch.Tensor | None, int | None]] = {}
        self._held: list[_Held] = []  # calls held for groupable probes (_hold)
        self._held_key: object = None
        self._held_bytes = 0
        # the batch's results are the caller's once returned; kept here, they would outlive the
        # batch (and the session: a closed session is cyclic garbage, and tensors freed by the
        # collector instead of by reference counting are a known way to crash torch)
        self._results: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def _reset_batch(self, offset: int) -> None:
        self._release_batch()  # an attempt run again starts from nothing of the first one
        self._offset = offset
        self._counts: dict[str, int] = defaultdict(int)
        self._info: dict[str, LayerInfo] = {}
        self._backward_done: set[int] = set()
        self._versions: dict[tuple[str, str], int | None] = {}
        self._branch_calls: dict[str, int] = defaultdict(int)
        self._views: list[tuple[str, tuple[str, str]]] = []  # results kept as views: key, slot
        self._group_changed = False  # flush_held found a held tensor changed in place

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
        The logits are detached and equal to an unhooked forward pass. Layers without any result
        are left out. Small CPU results are views of one fresh block per dtype (see
        ``_compacted``): keeping any of them keeps that block, about 2 MB for a ResNet-56 batch.

        A raw result that shares memory with the pass's tensors (an activation returned as it is)
        is copied on the first batches while its source's version counter is watched, and kept
        as a view once no in-place op has changed it (see :meth:`_guard`). Should a watched view
        change after all, the batch runs again with the same random draws, copying: a model
        whose forward keeps other state of its own sees that batch twice.
        """
        if not self._open:
            raise ProbeError("HookSession.run_batch called outside its 'with' block.")
        # Autograd back on inside a caller's inference_mode for gradient probes, as enable_grad
        # does inside no_grad (a pass without them runs in the caller's mode, as it did).
        autograd = torch.inference_mode(False) if self._autograd else contextlib.nullcontext()
        with _collector_paused(), autograd, self._active():
            return self._run_batch(x, y, sample_offset, next_input)

    def _run_batch(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        sample_offset: int,
        next_input: torch.Tensor | None,
    ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        if self._tracing:
            self._resolve(x)
        if self.cuda_graph:
            self._check_device(x)
            # recorded, replayed and checked on the batch's GPU, whichever is current
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                replayed = self._replay_or_record(x, y, sample_offset)
            if replayed is not None:
                return replayed
        return self._eager_batch(x, y, sample_offset, next_input)

    def _group_limit_for(self, x: torch.Tensor) -> float | None:
        """The most bytes a call whose statistics are grouped may hold in this batch; None when
        none is grouped. ``grouped=True`` and, by default, a batch on an accelerator group every
        call; by default on the CPU only the small ones (``_CPU_GROUP_CALL_BYTES``), for the
        probes that reduce (``Probe.reduces``)."""
        if self.grouped is False or self._group_unsafe:
            return None
        if self.grouped or x.device.type != "cpu":
            return math.inf
        return _CPU_GROUP_CALL_BYTES

    def _grouped_probes(self, call: Call, phase: str) -> frozenset[int]:
        """The ids of the probes whose ``phase`` half ("forward" or "backward") of ``call``
        waits for its group in the batch being run: every groupable probe, or on the CPU by
        default the reducing ones where the call's tensors are small (none where they are not)."""
        limit = self._group_limit
        if limit is None:
            return frozenset()
        if limit == math.inf:
            return self._groupable[phase]
        reducing = self._reducing[phase]
        if (
            reducing
            and not (call.block is not None and onepass.serves(call.block.y))
            and _distinct_bytes(group_tensors(call, phase)) <= limit
        ):
            return reducing
        return frozenset()

    def _eager_batch(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        sample_offset: int,
        next_input: torch.Tensor | None,
    ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        """The batch run with the hooks calling the probes (see :meth:`run_batch`)."""
        rng = _rng_state(x.device)
        limit = self._group_limit_for(x)
        for attempt in range(2):
            self._reset_batch(sample_offset)
            self._in_batch = attempt == 0  # a second attempt copies every result
            self._group_limit = limit if attempt == 0 else None
            try:
                out = self._forward_backward(x, y)
                # a gradient that never arrived: its tensor lies off the way from the loss to
                # the input
                missed = any(self._waits) and not self._off_input_path
                if self._aliases_held() and not self._group_changed and not missed:
                    break
                # a hooked tensor off the input's gradient path: every hooked tensor is a
                # target of the backward from now on, starting with this batch again
                self._off_input_path = self._off_input_path or missed
            except BaseException:
                self._release_batch()
                raise
            finally:
                self._in_batch, self._group_limit = False, None
            # A result kept as a view was changed later in the pass (an in-place op this batch
            # took and earlier ones did not), or a tensor held for grouped statistics was, or a
            # gradient never arrived: run the batch again, with the same random draws (dropout),
            # copying what it keeps and computing every statistic at its call. Training-mode BN
            # buffers see the batch twice; the session restores them on close.
            log.debug("a view changed in place or a gradient went missing; running the batch again")
            out = None  # the first attempt's graph and activations, not held through the second
            _set_rng_state(x.device, rng)
        for call, waits in zip(self._calls, self._waits):  # even with every hooked tensor a
            if "grad_output" in waits:  # target of the backward (outputs detached after)
                self.without_gradient.setdefault(call.name, None)
        try:
            if self.model_probes:
                call = Call(
                    "model",
                    self.model,
                    x.detach(),
                    out.detach(),
                    sample_offset,
                    labels=y,
                    loss=None if self._default_loss else self.loss_fn,
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
            # layers whose probes all declined (model-level probes only, say) have nothing to say
            results = {k: qs for k, qs in self._results.items() if qs}
            logits = out.detach()
            self._release_batch(keep_counts=True)
        except BaseException:
            self._release_batch()
            raise
        del out  # the last reference to the graph: the batch's activations are all freed now
        self._unshared(results)
        results = _compacted(results, self._nonfinite)
        self._nonfinite.end_batch()  # on the device: no host sync per batch
        return results, logits

    # -- recorded passes (probe.replay) --------------------------------------------------------
    def _replay_or_record(
        self, x: torch.Tensor, y: torch.Tensor | None, sample_offset: int
    ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor] | None:
        """The batch's results from a recorded pass, or by recording one at the second batch of
        its key (checked against the eager pass); None: run it eagerly."""
        self._check_labels()
        if self.graph_off is not None:
            return None
        key = pass_key(self.model, x, y)
        rec = self._recordings.get(key)
        if rec is not None:
            return self._replayed(rec, x, y, sample_offset)
        if len(self._seen_keys) > 64:  # keys that never repeat (ever-changing batch sizes)
            self._seen_keys.clear()
        self._seen_keys[key] += 1
        if self._seen_keys[key] < 2 or len(self._recordings) >= MAX_RECORDINGS:
            return None  # the first batch of a key runs eagerly, as every one does without
        return self._record(key, x, y, sample_offset)

    def _replayed(
        self, rec: Recording, x: torch.Tensor, y: torch.Tensor | None, sample_offset: int
    ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        self._reset_batch(sample_offset)
        self._queue_label_check(y, rec.classes, sample_offset)
        results, logits, counts = rec.replay(x, y)
        self.replayed_batches += 1
        for keys, c in counts:
            self._nonfinite.accumulate(keys, c)
        self._info = dict(rec.info)  # the layers behind the keys (layer_info)
        return results, logits

    def _record(
        self, key: tuple, x: torch.Tensor, y: torch.Tensor | None, sample_offset: int
    ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor] | None:
        """Record the probed pass of this batch's key, replay it on the batch and compare it with
        the batch's eager pass, whose results are returned; None when it cannot be recorded."""
        limit = self._group_limit_for(x)
        # The pass before the recording sees the batch's samples in other rows: a probe that
        # kept a result from it (reused instead of recomputed while recording) is then caught
        # by the comparison below instead of passing as the same batch's numbers.
        sx = static_copy(x.roll(1, 0))
        sy = static_copy(None if y is None else y.roll(1, 0))
        try:
            with recording_autocast(x.device.type):
                with side_stream(x.device):
                    self._recording_pass(sx, sy, sample_offset, limit)
                sx.copy_(x)
                if sy is not None:
                    sy.copy_(y)
                graph, (packed, info) = self._record_graph(
                    lambda: self._recording_pass(sx, sy, sample_offset, limit)
                )
        except Exception as e:  # an operation a recording refuses: the batch runs eagerly
            self._give_up(f"recording the probed pass failed ({type(e).__name__}: {e})")
            return None
        if packed is None:
            self._give_up("a tensor the probes read was changed in place during the pass")
            return None
        rec = Recording(graph, sx, sy, packed, info)
        rng = _rng_state(x.device)
        replayed, logits, _ = rec.replay(x, y)  # its counts: the eager pass counts this batch
        _set_rng_state(x.device, rng)  # the same random draws (dropout) for the eager pass
        results, eager_logits = self._eager_batch(x, y, sample_offset, None)
        diff = same_results(replayed, results) or same_results(
            {"the logits": {"logits": logits}}, {"the logits": {"logits": eager_logits}}
        )
        if diff is not None:
            self._give_up(f"the replayed pass differs from the eager one on the same batch: {diff}")
        else:
            self._recordings[key] = rec
        return results, eager_logits

    def _recording_pass(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        sample_offset: int,
        group_limit: float | None,
    ) -> tuple[Packed | None, dict]:
        """One probed pass whose results are packed (None if a held tensor changed in place).
        Every result is a copy (no views of the pass's memory, which a replay reuses)."""
        self._reset_batch(sample_offset)
        self._in_batch, self._group_limit, self._recording = False, group_limit, True
        try:
            out = self._forward_backward(x, y)
            counts = self._nonfinite.batch_counts()
            if self._group_changed:
                return None, {}
            results = {k: qs for k, qs in self._results.items() if qs}
            return Packed.pack(results, out.detach(), counts), dict(self._info)
        finally:
            self._group_limit, self._recording = None, False
            self._release_batch()

    def _give_up(self, reason: str) -> None:
        self.graph_off = reason
        self._recordings.clear()
        warnings.warn(
            f"cuda_graph: {reason}. Every batch of this session runs eagerly instead (the same "
            "numbers, without the replay's speed).",
            GraphFallbackWarning,
            stacklevel=6,  # the caller of run_batch
        )

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The batch's forward (and backward, for gradient probes) with the hooks on; the logits."""
        if not self.needs_grad:
            with torch.no_grad():
                out = self.model(x)
            self.flush_held()
            return self._logits(out)
        if y is None:
            raise ProbeError("Probes that need gradients require labels y for the loss.")
        # a batch made under inference_mode cannot take part in autograd: normal copies of it
        inp = x.clone() if x.is_inference() else x.detach()
        if inp.is_floating_point() or inp.is_complex():
            inp.requires_grad_(True)
        if y.is_inference():
            y = y.clone()
        with torch.enable_grad():
            out = self.model(inp)
            logits = self._logits(out)
            self.flush_held()  # before the backward pass: the held tensors are freed first
            # a loss of the caller's takes what the model returned; the default, its logits
            loss = self._loss(logits if self._default_loss else out, y)
            with explain_autograd_refusal("Gradient probes"):
                torch.autograd.grad(loss, self._grad_targets(inp), allow_unused=True)
        self.flush_held()
        for call in self._calls:
            if id(call) not in self._backward_done:  # gradients that never all arrived
                self._run_backward(call)
        return logits

    def _grad_targets(self, inp: torch.Tensor) -> list[torch.Tensor]:
        """What the backward pass differentiates for: the input, so that every hooked tensor
        lies on its way and no weight gradient is computed. Token ids (an integer input) take
        no gradient; there the hooked tensors themselves are the targets, and the backward
        stops at the first of them. So they are, beside the input, for a model some of whose
        hooked tensors are not on the way to its input (blocks after a frozen part run under
        ``no_grad`` or detached): the backward to the input alone never reached them."""
        if inp.requires_grad and not self._off_input_path:
            return [inp]
        targets = {id(t): t for c in self._calls for t in (c.output, c.input)}
        targets = [t for t in targets.values() if t is not None and t.requires_grad]
        if inp.requires_grad:
            return [inp, *targets]
        if not targets:
            raise ProbeError(
                f"Gradient probes need gradients through the model, but its input is "
                f"{inp.dtype} (no gradient) and no hooked output requires one: are all its "
                "parameters frozen (requires_grad=False)? Unfreeze them for the capture; "
                "parameters' .grad is left untouched either way."
            )
        return targets

    def _logits(self, out: object) -> torch.Tensor:
        """The logits in what the model returned: the tensor itself, or the ``logits`` of a
        mapping or of an output object (HuggingFace's outputs, torchvision's Inception ones);
        else, where nothing is computed from them (no default loss, no model-level probe), the
        first tensor of a tuple or list or among a mapping's values (a feature extractor's
        {name: features}), returned as the pass's output."""
        try:
            return logits_of(out, self.model)
        except ProbeError:
            needed = (self.needs_grad and self._default_loss) or bool(self.model_probes)
            values = list(out.values()) if isinstance(out, Mapping) else out
            first = None if needed else first_tensor(values)
            if first is None:
                raise
            return first

    def _loss(self, out: object, y: torch.Tensor) -> torch.Tensor:
        if not (self._recording and self._default_loss):
            return self.loss_fn(out, y)
        # Recorded: the labels' check reads them on the host, which a recording refuses; each
        # replayed batch's labels are checked on the device instead (_check_labels), and clamped
        # here so that a bad one cannot index out of the logits before it is reported.
        return exact_cross_entropy(out, y.clamp(0, out.shape[1] - 1), check=False)

    def _queue_label_check(self, y: torch.Tensor | None, classes: int, sample_offset: int) -> None:
        """Start checking a replayed batch's labels on the device, read at the next batch."""
        if y is None or not (self.needs_grad and self._default_loss):
            return
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            check_labels(y, classes)  # its dtype: no device read needed
        bad = ((y < 0) | (y >= classes)).any()
        flag, event = bad, None
        if y.is_cuda:
            flag = torch.empty((), dtype=torch.bool, device="cpu", pin_memory=True)
            flag.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._label_checks.append((sample_offset, flag, event, classes))

    def _check_labels(self) -> None:
        """Raise for the replayed batches whose labels are not classes (see _queue_label_check).
        Each flag is copied before its batch's replay, so waiting for it does not wait for
        the pass."""
        checks, self._label_checks = self._label_checks, []
        for first, flag, event, classes in checks:
            if event is not None:
                event.synchronize()
            if bool(flag):
                raise ProbeError(
                    f"Labels must lie in [0, {classes - 1}] for {classes} classes; the batch from "
                    f"sample {first} has others. Unlabelled samples (label -1) cannot drive "
                    "gradient probes (reported at the batch after it: its pass was replayed)."
                )

    @property
    def nonfinite(self) -> dict[str, int]:
        """Layer key -> samples so far with a NaN or infinite result (layers with none omitted).
        In a replayed session (``cuda_graph``) this also reports bad labels of the last batch."""
        self._check_labels()
        return self._nonfinite.counts

    def layer_info(self, key: str) -> LayerInfo:
        """The :class:`LayerInfo` behind a result key (``name`` or ``name@k``)."""
        if key == "model":
            return self._model_info
        return self._info.get(key) or next(i for i in self.layers if i.name == key.split("@")[0])
