"""Probed passes recorded once as a CUDA graph and replayed for every later batch of that shape.

On a GPU a probed pass is bound by the host: ResNet-56 at batch 512 in bf16 issues its unprobed
forward no faster than the device runs it, so each probe's kernels add host time one launch at a
time (docs/performance.md). A recording (``HookSession(cuda_graph=True)``,
``probe capture --cuda-graph``) captures the whole probed pass -- the model's kernels, the
probes', the non-finite counts and one copy of every result into a block per dtype -- and a batch
then costs one copy in, one graph launch and one copy out per dtype.

What a replay can and cannot do. The graph repeats the recorded kernels on the memory they were
recorded with, so everything a probe computes must be a fixed sequence of device operations on
the call's tensors: probes say so with :meth:`~probe.probes.base.Probe.replayable` (the built-in
statistics and raw tensors without a sample cap do; Jacobian estimators, which draw per-sample
random vectors from the sample's position, and model-level probes do not). The model's Python
is not run again either: a forward whose path depends on Python state that changes between
batches (a call counter, ``random.random()``) would replay the recorded path. Therefore:

- the first batch of a shape runs eagerly, as without recording;
- the second is recorded, replayed *and* run eagerly, and the two sets of results must agree
  (:func:`same_results`); the eager results are returned. Any difference, and any operation the
  recording refuses (a host sync such as ``.item()``), turns recording off for the session with a
  :class:`GraphFallbackWarning`: every batch then runs eagerly, with the same numbers;
- later batches of the shape replay. A batch of another shape, dtype or memory layout, under
  another autocast or TF32 setting, with other parameter or buffer tensors (a replaced
  ``weight``), other training flags or module hooks runs eagerly (and is recorded in turn, up to
  :data:`MAX_RECORDINGS`; :func:`pass_key`).

Example:
    >>> import torch
    >>> from probe.probes import ResidualNorms
    >>> check_replayable([ResidualNorms()])
    >>> packed = Packed.pack({"a": {"n": torch.ones(2)}}, torch.zeros(2, 3))
    >>> results, logits, counts = packed.unpack(packed.blocks)
    >>> results["a"]["n"].tolist(), tuple(logits.shape), counts
    ([1.0, 1.0], (2, 3), [])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch
from torch import nn

from probe.errors import ProbeError

__all__ = [
    "MAX_RECORDINGS",
    "Graph",
    "GraphFallbackWarning",
    "Packed",
    "Recording",
    "Rerun",
    "check_cuda_graph",
    "check_device",
    "check_replayable",
    "pass_key",
    "record_graph",
    "recording_autocast",
    "rerun_graph",
    "same_results",
    "side_stream",
    "static_copy",
]

# Recordings kept per session: each holds the activations of one probed pass in its own memory
# pool, and captures rarely see more than a full and a last batch shape.
MAX_RECORDINGS = 2


class GraphFallbackWarning(UserWarning):
    """A recorded pass could not be used; the session runs every batch eagerly (same numbers)."""


def check_cuda_graph(cuda_graph: object) -> None:
    """Refuse a ``cuda_graph`` setting that is not True or False.

    Example:
        >>> check_cuda_graph(False)
    """
    if not isinstance(cuda_graph, bool):
        raise ProbeError(
            f"cuda_graph must be True or False (replay the probed pass as a CUDA graph, on a "
            f"CUDA device); got {cuda_graph!r}."
        )


def check_replayable(probes: Sequence[object]) -> None:
    """Refuse probes a recorded pass cannot replay, naming them and what to do instead.

    Example:
        >>> from probe.probes import Activations
        >>> try:
        ...     check_replayable([Activations(max_samples=8)])
        ... except ProbeError as e:
        ...     print(str(e).split(":")[0])
        cuda_graph=True needs probes whose work is the same device operations at every batch
    """
    refused = [p for p in probes if not _replayable(p)]
    if refused:
        names = ", ".join(f"{type(p).__name__} ({p.name})" for p in refused)
        raise ProbeError(
            "cuda_graph=True needs probes whose work is the same device operations at every "
            f"batch: {names} cannot be replayed (model-level probes, per-sample random vectors "
            "and sample caps such as max_samples depend on the batch's place in the capture). "
            "Drop --cuda-graph for these probes, or capture them in a separate run; a probe of "
            "your own says it can be replayed by returning True from Probe.replayable()."
        )


def _replayable(p: object) -> bool:
    return getattr(p, "scope", "layer") == "layer" and bool(p.replayable())


def check_device(t: torch.Tensor, what: str = "batches") -> None:
    """Refuse ``what`` (a batch ``t``, or a model with parameter ``t``) off a CUDA device."""
    if t.device.type != "cuda":
        raise ProbeError(
            f"cuda_graph=True needs {what} on a CUDA device; this one is on {t.device}. Drop "
            "--cuda-graph (cuda_graph=False), or run on --device cuda."
        )


def pass_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> tuple:
    """What a recorded pass depends on besides the values of the batch: the batch's shape, dtype
    and memory layout, the labels', the autocast and TF32 settings, the memory of every parameter
    and buffer, and every module's training flag and hooks (a hook added later would not run in
    a replay). A batch with another key is not replayed.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> key = pass_key(lin, torch.ones(4, 3), None)
        >>> key == pass_key(lin, torch.zeros(4, 3), None), key == pass_key(lin, torch.ones(5, 3), None)
        (True, False)
    """
    tensors = [*model.parameters(), *model.buffers()]
    hooks = nn.modules.module
    return (
        tuple(x.shape),
        x.stride(),
        x.dtype,
        x.device,
        None if y is None else (tuple(y.shape), y.dtype),
        _autocast_state(x.device.type),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
        tuple(t.data_ptr() for t in tensors),
        tuple(
            (m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()
        ),
        (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks)),
    )


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, torch.get_autocast_dtype(device_type) if enabled else None


def recording_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """The autocast in effect, without its cast cache: a cast cached before recording would be
    read by the graph from memory that is freed once the caller's autocast ends."""
    enabled, dtype = _autocast_state(device_type)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


T = TypeVar("T")
Results = dict[str, dict[str, torch.Tensor]]  # layer key -> quantity -> [N, ...]
Counts = list[tuple[tuple[str, ...], torch.Tensor]]  # see NonFiniteCounter.batch_counts


class Graph(Protocol):
    """What a session needs of a recorded graph (``torch.cuda.CUDAGraph``)."""

    def replay(self) -> None: ...


def record_graph(fn: Callable[[], T]) -> tuple[Graph, T]:
    """Record the device work of ``fn()`` as a CUDA graph (nothing runs yet): (graph, its value).

    ``thread_local``: only this thread may not wait on the device meanwhile; an HDF5 writer's
    thread waits on its copies to the host while a pass is recorded."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


class Rerun:
    """A stand-in for a recorded graph off the GPU: each replay runs the recorded pass again (on
    the recording's static batch) and writes its packed results into the recorded blocks. The
    probes' Python runs at every replay, which a real graph skips, so it cannot show a host
    sync; it does show a probe whose numbers depend on an earlier pass (``check_probe``)."""

    def __init__(self, fn: Callable[[], tuple], packed: Packed | None) -> None:
        self.fn, self.packed, self.replays = fn, packed, 0

    def replay(self) -> None:
        self.replays += 1
        fresh = self.fn()[0]
        for dt, block in self.packed.blocks.items():
            block.copy_(fresh.blocks[dt])


def rerun_graph(fn: Callable[[], T]) -> tuple[Rerun, T]:
    """:func:`record_graph` for any device, with a :class:`Rerun` for a graph: the pass runs once
    now (a CUDA graph records without running) and again at every replay."""
    out = fn()
    return Rerun(fn, out[0]), out


@dataclass
class Packed:
    """A batch's results, logits and non-finite counts as one flat block per dtype, and where
    each piece lies in them: a recording writes them there, and a replay hands out views of a
    copy of each block (one copy per dtype instead of one per result)."""

    blocks: dict[torch.dtype, torch.Tensor]
    # layer (None: the logits and counts; a layer key may be "", the model itself), quantity,
    # dtype, shape
    slots: list[tuple[str | None, str, torch.dtype, tuple[int, ...]]]
    counts_keys: list[tuple[str, ...]] = field(default_factory=list)

    @staticmethod
    def pack(results: Results, logits: torch.Tensor, counts: Counts = ()) -> Packed:
        """Copy ``results``, ``logits`` and ``counts`` (see NonFiniteCounter.batch_counts) into
        one block per dtype."""
        items = [(k, q, t) for k, qs in results.items() for q, t in qs.items()]
        items.append((None, "logits", logits))
        items += [(None, f"counts{i}", c) for i, (_, c) in enumerate(counts)]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        slots = []
        for k, q, t in items:
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
            slots.append((k, q, t.dtype, tuple(t.shape)))
        blocks = {dt: torch.cat(ts) for dt, ts in by_dtype.items()}
        return Packed(blocks, slots, [keys for keys, _ in counts])

    def unpack(
        self, blocks: dict[torch.dtype, torch.Tensor]
    ) -> tuple[Results, torch.Tensor, Counts]:
        """(results, logits, counts) as views of ``blocks`` (the recorded blocks or a copy)."""
        sizes: dict[torch.dtype, list[int]] = {}
        for _, _, dt, shape in self.slots:
            sizes.setdefault(dt, []).append(math.prod(shape))
        pieces = {dt: iter(blocks[dt].split(s)) for dt, s in sizes.items()}
        results: Results = {}
        logits, counts = None, []
        for k, q, dt, shape in self.slots:
            piece = next(pieces[dt])
            t = piece if len(shape) == 1 else piece.view(shape)
            if k is not None:
                results.setdefault(k, {})[q] = t
            elif q == "logits":
                logits = t
            else:
                counts.append((self.counts_keys[len(counts)], t))
        return results, logits, counts


@dataclass
class Recording:
    """One recorded probed pass: its graph, the static batch it reads, the packed results it
    writes and what the session knew of the layers when it was recorded."""

    graph: Graph
    x: torch.Tensor
    y: torch.Tensor | None
    packed: Packed
    info: dict

    @property
    def classes(self) -> int:
        """The logits' width: the classes a replayed batch's labels must lie in."""
        shape = next(shape for k, q, _, shape in self.packed.slots if k is None and q == "logits")
        return shape[1] if len(shape) > 1 else 1

    def replay(
        self, x: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[Results, torch.Tensor, Counts]:
        """Run the recorded pass on ``x`` (and ``y``): (results, logits, counts), copies that the
        next replay leaves alone."""
        with torch.no_grad():  # (a batch that requires grad: its values only)
            self.x.copy_(x)
            if self.y is not None:
                self.y.copy_(y)
        self.graph.replay()
        return self.packed.unpack({dt: b.clone() for dt, b in self.packed.blocks.items()})


def static_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor with ``t``'s shape, dtype and strides, holding its values (a recording's input)."""
    if t is None:
        return None
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t.detach())


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Work on a fresh stream of ``device``, ordered after and before the current stream's: the
    pass before a recording runs there, as CUDA graphs ask (libraries set up per-stream state)."""
    if device.type != "cuda":
        yield
        return
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def same_results(replayed: Results, eager: Results, rtol: float = 1e-3) -> str | None:
    """None where the replayed results are the eager ones, else what differs first.

    Both passes run the same kernels on the same batch, so they normally agree bit for bit;
    ``rtol`` (relative to each quantity's largest magnitude) leaves room for kernels whose
    reduction order is not fixed (atomics), which differ by a few units in the last place, while
    a stale buffer or a recorded path that the eager pass no longer takes differs by far more.

    Example:
        >>> a = {"l": {"q": torch.tensor([1.0, 2.0])}}
        >>> same_results(a, a), same_results(a, {"l": {"q": torch.tensor([1.0, 3.0])}})
        (None, 'l/q differs by 1 (largest magnitude 3)')
    """
    if replayed.keys() != eager.keys():
        return f"layers {sorted(replayed)} against {sorted(eager)}"
    for key, qs in eager.items():
        if replayed[key].keys() != qs.keys():
            return f"{key}: quantities {sorted(replayed[key])} against {sorted(qs)}"
        for q, e in qs.items():
            r = replayed[key][q]
            if r.shape != e.shape or r.dtype != e.dtype:
                return f"{key}/{q}: {r.dtype} {tuple(r.shape)} against {e.dtype} {tuple(e.shape)}"
            if not e.is_floating_point():
                if not torch.equal(r, e):
                    return f"{key}/{q} differs"
                continue
            r64, e64 = r.double(), e.double()
            finite = torch.isfinite(e64)
            if not torch.equal(finite, torch.isfinite(r64)) or not torch.equal(
                torch.isnan(e64), torch.isnan(r64)
            ):
                return f"{key}/{q}: NaN or infinity in other places"
            none = torch.zeros((), dtype=e64.dtype, device=e64.device)
            diff = (r64 - e64)[finite].abs().max() if finite.any() else none
            scale = e64[finite].abs().max() if finite.any() else none
            if diff > rtol * scale or (scale == 0 and diff > 0):
                return (
                    f"{key}/{q} differs by {diff.item():.3g} (largest magnitude {scale.item():.3g})"
                )
    return None
