"""``probe.capture``: run probes over a dataset and stream the results to HDF5 (or memory).

Example:
    >>> import probe, torch
    >>> model = probe.zoo.create("resnet8", in_channels=1, width=4)
    >>> batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    >>> cap = probe.capture(model, batches, probes=[probe.ResidualNorms()])
    >>> cap.read("stages.0.0", "f_norm").shape
    (8,)
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from math import prod

import numpy as np
import torch
from torch import nn

from probe.distributed.group import raise_if_terminated
from probe.errors import ProbeError
from probe.hooks.select import LayerSpec
from probe.probes.base import Probe
from probe.probes.group import check_grouped
from probe.probes.registry import as_probes
from probe.provenance import code_revision, command_line, library_versions
from probe.replay import check_cuda_graph, check_device, check_replayable
from probe.runtime import runtime_settings, settled_formulas
from probe.session import HookSession, LossFn, NonFiniteWarning, NothingRecordedWarning
from probe.store.memory import MemoryRows
from probe.store.reader import CaptureReader, H5Capture, MemoryCapture
from probe.store.writer import H5Writer, WriterOptions

__all__ = ["capture", "CaptureJob"]

Progress = Callable[[int, int | None], None]


def _batches(
    data: Iterable, device: torch.device | None
) -> Iterable[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    for item in data:
        if isinstance(item, torch.Tensor):
            x, y, idx = item, None, None
        elif len(item) == 2:
            (x, y), idx = item, None
        else:
            x, y, idx = item[0], item[1], item[2]
        if device is not None:
            x = x.to(device)
            y = y.to(device) if y is not None else None
        yield x, y, idx


def model_identity(model: nn.Module) -> dict:
    """``model_name`` and ``model_config`` of a zoo model (from its NetConfig); {} otherwise."""
    from probe.zoo.config import NetConfig
    from probe.zoo.registry import model_name

    config = getattr(model, "config", None)
    if not isinstance(config, NetConfig):
        return {}
    return {"model_name": model_name(config), "model_config": config.to_dict()}


def _limited(batches: Iterable[tuple], limit: int | None) -> Iterable[tuple]:
    """The batches cut so that at most ``limit`` samples come out (``None``: all)."""
    seen = 0
    for x, y, idx in batches:
        if limit is not None and seen >= limit:
            return
        if limit is not None and seen + len(x) > limit:
            keep = limit - seen
            x, y = x[:keep], (y[:keep] if y is not None else None)
            idx = idx[:keep] if idx is not None else None
        seen += len(x)
        yield x, y, idx


def _with_next(
    batches: Iterable[tuple], lookahead: bool, after: torch.Tensor | None = None
) -> Iterable[tuple]:
    """Each batch with the sample that follows it in capture order ([1, ...]); the last batch gets
    ``after`` (a shard: the next shard's first sample), by default the capture's first sample.
    One batch is read ahead only when ``lookahead`` (a probe that pairs every sample with its
    successor, e.g. ``shattered:direction=next``) asks for it."""
    if not lookahead:
        yield from ((x, y, idx, None) for x, y, idx in batches)
        return
    it = iter(batches)
    prev = next(it, None)
    if prev is None:
        return
    first = prev[0][:1]
    for cur in it:
        yield (*prev, cur[0][:1])
        prev = cur
    yield (*prev, first if after is None else after.to(first.device, first.dtype))


def _warn_nothing_recorded(session: HookSession, seen: int) -> None:
    """Name the probes that recorded nothing over the whole capture: asked for, and absent; and
    the layers no gradient could reach, where gradient probes were asked for."""
    cut = [k for k in session.without_gradient if k not in session.with_gradient]
    if cut:
        names = sorted({p.name for p in session.layer_probes if p.needs_grad})
        warnings.warn(
            f"Probe(s) {', '.join(names)} measured no output gradient at {len(cut)} layer(s) "
            f"({', '.join(cut[:4])}{' ...' if len(cut) > 4 else ''}): no gradient of the loss "
            "reaches their outputs (computed under torch.no_grad, from frozen parameters and an "
            "input that takes none, detached before the loss, or not used by it). Leave that "
            "part of the model differentiable for the capture to measure them.",
            NothingRecordedWarning,
            stacklevel=3,
        )
    silent = [p.name for p in session.probes if p.name not in session.recorded]
    if cut and len(session.with_gradient) == 0:  # said just above, layer by layer
        silent = [n for n in silent if n not in names]
    if silent:
        warnings.warn(
            f"Probe(s) {', '.join(silent)} recorded nothing over {seen} samples: none of the "
            "captured calls gave them anything to measure, and the capture holds no quantity "
            "of theirs. See each probe's conditions in docs/probes.md (e.g. 'segments' needs a "
            "model that is a chain of modules, 'param_grads' labelled data).",
            NothingRecordedWarning,
            stacklevel=3,
        )


def _warn_nonfinite(bad: dict[str, int], seen: int) -> None:
    if not bad:
        return
    worst = sorted(bad.items(), key=lambda kv: -kv[1])[:3]
    warnings.warn(
        f"NaN or infinite probe results in {len(bad)} layer(s) (samples of {seen}): "
        + ", ".join(f"{k} {n}" for k, n in worst)
        + (" ..." if len(bad) > 3 else "")
        + ". Measures over them are not finite; the counts are in each layer's "
        "'nonfinite_samples' attribute.",
        NonFiniteWarning,
        stacklevel=3,
    )


def _layer_attrs(session: HookSession, key: str, positions: dict[str, int]) -> dict:
    """A layer key's attributes; ``positions`` numbers the keys in capture order as they come
    (filled here: the first key given is 0)."""
    info = session.layer_info(key)
    out_shape, f_shape, in_shape = session.shapes.get(key, ((), None, None))
    attrs = {
        "module": info.module_name,
        "module_type": type(info.module).__name__,
        "kind": info.kind,
        "is_block": info.is_block,
        "residual": -1 if info.residual is None else int(info.residual),
        # Depth is the order the forward pass produced the results in (the capture order), not
        # the module's place in the selection: a module called three times (shared weights)
        # holds three depths, and the calls of modules used in turn interleave.
        "layer_index": -1 if key == "model" else positions.setdefault(key, len(positions)),
        "call": int(key.split("@")[1]) if "@" in key else 0,
        "output_shape": json.dumps(list(out_shape)),
        "spatial_size": prod(out_shape[1:]) if len(out_shape) > 1 else 1,
    }
    if info.site is not None:
        attrs["site"] = info.site
    if session.model_sites is not None:  # whether the model is residual at all
        attrs["model_sites"] = session.model_sites
    if in_shape is not None:
        attrs["input_size"] = prod(in_shape)
    if f_shape is not None:
        attrs["f_spatial_size"] = prod(f_shape[1:]) if len(f_shape) > 1 else 1
    return attrs


def capture(
    model: nn.Module,
    data: Iterable,
    *,
    layers: LayerSpec | None = "auto",
    probes: Sequence[Probe] = (),
    out: str | os.PathLike | None = None,
    mode: str = "eval",
    limit: int | None = None,
    loss_fn: LossFn | None = None,
    compression: str | None = None,
    queue_bytes: int = 512 << 20,
    provenance: dict | None = None,
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
    sample_offset: int = 0,
    name: str | None = None,
    next_sample: torch.Tensor | None = None,
    distributed: bool | None = None,
    join: str = "copy",
    grouped: bool | None = None,
    cuda_graph: bool = False,
) -> CaptureReader:
    """Run ``probes`` on ``layers`` of ``model`` over ``data`` and return a reader of the results.

    Args:
        data: an iterable of ``(x, y)`` or ``(x, y, sample_index)`` batches (e.g. a
            :class:`~probe.data.DeviceLoader`), or of bare ``x`` tensors when no probe needs labels.
        layers: glob / ``re:`` regex / list / predicate, or ``"auto"`` for every residual block.
        out: HDF5 path; ``None`` keeps everything in memory.
        mode: ``"eval"`` (BN running statistics; the default), ``"train"`` or ``"keep"``.
        limit: stop after this many samples.
        compression: ``None`` (default), ``"zstd"`` or ``"gzip"`` -- lossless.
        shard: ``(rank, count)`` when this process writes one shard of a larger capture (give
            ``data`` with its global ``sample_index``); join the files with ``probe.join_shards``.
        name: the run's label in tables and figures (``model_name`` in the provenance). Zoo models
            default to their registry name and configuration (``plain20`` with its NetConfig);
            other models have no default -- name them, so captures of different models are
            never pooled under one label.
        sample_offset: position of this capture's first sample in the joined capture (for a shard:
            the number of samples in the shards before it). Sample caps (``max_samples``) and
            per-sample random probes count from it, so shards joined in rank order hold exactly
            the rows and values of one capture over all samples.
        next_sample: ``[1, ...]`` the input that follows the data in capture order, for probes
            that pair each sample with the next (``shattered:direction=next``); default: the
            data's first sample (the order wraps around). A shard gives the next shard's first.
        distributed: split the samples over the ranks of the initialised ``torch.distributed``
            process group (e.g. under torchrun): each rank captures a contiguous part and rank 0
            joins them into ``out`` once every rank has finished (docs/distributed.md). ``None``
            (default): when a group with more than one rank is initialised and no ``shard`` is
            given. Every rank must call ``capture`` with the same arguments; to capture on one
            rank alone inside such a job, pass ``False``.
        join: with ``distributed``: ``"copy"`` (default) writes ``out`` as one self-contained file,
            as one process would; ``"virtual"`` writes an index over the ranks' shards, kept in
            ``<out>.shards/`` (no copy: for captures too large to pass through one process).
        grouped: compute the statistics of equally shaped blocks together, once per run of
            them (:mod:`probe.probes.group`): the same numbers with a fraction of the kernel
            launches, for a little more memory. ``None`` (default): every call of a batch on an
            accelerator, where launches bound a probed pass; on the CPU the reducing statistics
            (``Probe.reduces``) of calls whose tensors are small (at most 2 MiB), where their
            small ops do.
        cuda_graph: record the probed pass as a CUDA graph at the second batch of each shape
            and replay it for the later ones (:mod:`probe.replay`): one launch per batch instead
            of one per kernel, for the probes that can be replayed (``Probe.replayable``). The
            recording is checked against the eager pass on a batch; where it cannot be used the
            capture runs eagerly with a ``GraphFallbackWarning``. Needs a CUDA model.

    The model's training flags, buffers (BN running statistics, also after a train-mode capture),
    grad mode and outputs are unchanged; hooks are removed and a
    partially written file is deleted on any error.
    """
    probes = as_probes(probes)
    if not probes:
        raise ProbeError(
            "No probes given; e.g. probes=[probe.ResidualNorms(), probe.ChannelStats()]."
        )
    if mode != "eval" and any(getattr(p, "requires_eval", False) for p in probes):
        raise ProbeError(
            "Jacobian probes need eval mode (train-mode BN couples the samples of a batch)."
        )
    # how the passes ran (the same numbers either way), next to what was run
    execution = {"grouped": grouped, "cuda_graph": cuda_graph}
    provenance = {**(provenance or {}), "execution": execution}
    attrs = _root_attrs(model, layers, probes, mode, limit, compression, provenance, name)
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ProbeError(
            f"sample_offset must be a non-negative int (the samples before this shard); got "
            f"{sample_offset!r}."
        )
    check_grouped(grouped)
    check_cuda_graph(cuda_graph)
    if cuda_graph:  # before any file or rank is set up
        check_replayable(probes)
        check_device(next((p for p in model.parameters()), torch.empty(0)), "a model")
    job = CaptureJob(
        model, layers, probes, mode, loss_fn, compression, queue_bytes, grouped, cuda_graph
    )
    if _over_ranks(distributed, shard):
        from probe.distributed.capture import capture_over_ranks

        return capture_over_ranks(
            job, data, attrs, out=out, limit=limit, join=join, progress=progress
        )
    if shard is not None:
        rank, count = shard
        if not 0 <= rank < count:
            raise ProbeError(f"Invalid shard {shard!r}: need 0 <= rank < count.")
        attrs.update(shard_rank=rank, shard_count=count)
    return job.run(
        data,
        attrs,
        out=out,
        limit=limit,
        progress=progress,
        sample_offset=sample_offset,
        next_sample=next_sample,
    )


def _over_ranks(distributed: bool | None, shard: tuple[int, int] | None) -> bool:
    """Whether this capture is split over the ranks of the process group."""
    import torch.distributed as dist

    from probe.distributed.group import grouped

    if distributed is None:
        return grouped() and shard is None
    if not distributed:
        return False
    if shard is not None:
        raise ProbeError(
            f"Give either shard={shard!r} (this process writes one shard you join yourself) or "
            "distributed=True (the ranks split the data and join it), not both."
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise ProbeError(
            "distributed=True needs an initialised torch.distributed process group; start the "
            "script with torchrun (e.g. torchrun --standalone --nproc-per-node 2 script.py) and "
            "call torch.distributed.init_process_group() first."
        )
    return True


def _root_attrs(
    model: nn.Module,
    layers: LayerSpec | None,
    probes: list[Probe],
    mode: str,
    limit: int | None,
    compression: str | None,
    provenance: dict | None,
    name: str | None,
) -> dict:
    """The configuration and provenance attributes of a capture of ``model``."""
    config = {
        "layers": layers
        if isinstance(layers, (str, list, tuple)) or layers is None
        else "<predicate>",
        "probes": [p.config() for p in probes],
        "mode": mode,
        "limit": limit,
        "compression": compression,
    }
    meta = {
        "versions": library_versions(),
        "revision": code_revision(),
        "command": command_line(),
        "runtime": runtime_settings(),
        "model_type": type(model).__name__,
        **model_identity(model),
        **(provenance or {}),
    }
    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise ProbeError(f"name must be a non-empty string; got {name!r}.")
        meta["model_name"] = name
    return {"config": json.dumps(config, default=str), "provenance": json.dumps(meta, default=str)}


def _settled_provenance(attrs: dict) -> dict:
    """``attrs``' provenance where the statistics' formulas changed during the capture (a kernel
    failed, and torch's formulas took the later batches: probe.runtime.settled_formulas); else
    nothing. The provenance is read at the start, before any kernel has run."""
    meta = json.loads(attrs["provenance"])
    runtime = meta.get("runtime")
    settled = settled_formulas(runtime) if isinstance(runtime, dict) else {}
    if not settled:
        return {}
    meta["runtime"] = {**runtime, **settled}
    return {"provenance": json.dumps(meta, default=str)}


def _sample_bound(data: object, limit: int | None) -> int | None:
    """At most how many samples ``data`` yields (None when unknown): the limit, a loader's
    ``num_samples``, a DataLoader's dataset length or the sum of a list's batch sizes, whichever
    is smallest."""
    known = [limit, getattr(data, "num_samples", None)]
    if isinstance(data, (list, tuple)):  # of batches: a tensor, or (x, y[, index])
        sizes = [
            len(b if isinstance(b, torch.Tensor) else b[0])
            for b in data
            if isinstance(b, torch.Tensor) or (isinstance(b, (list, tuple)) and b)
        ]
        known.append(sum(sizes) if len(sizes) == len(data) else None)
    dataset = getattr(data, "dataset", None)
    if isinstance(data, torch.utils.data.DataLoader) and hasattr(dataset, "__len__"):
        known.append(len(dataset) if _plain(data) else None)
    known = [int(k) for k in known if isinstance(k, int) and k >= 0]
    return min(known) if known else None


def _plain(loader: torch.utils.data.DataLoader) -> bool:
    # a sequential or shuffled pass over the dataset: each sample at most once
    return isinstance(
        loader.sampler, (torch.utils.data.SequentialSampler, torch.utils.data.RandomSampler)
    ) and not getattr(loader.sampler, "replacement", False)


@dataclass
class CaptureJob:
    """What a capture runs -- model, layers, probes, mode -- and :meth:`run`, its data loop over
    one stream of batches (the whole capture, or one rank's shard of it)."""

    model: nn.Module
    layers: LayerSpec | None
    probes: list[Probe]
    mode: str
    loss_fn: LossFn | None
    compression: str | None
    queue_bytes: int
    grouped: bool | None = None  # see HookSession
    cuda_graph: bool = False  # see HookSession

    def run(
        self,
        data: Iterable,
        attrs: dict,
        *,
        out: str | os.PathLike | None,
        limit: int | None,
        progress: Progress | None,
        sample_offset: int = 0,
        next_sample: torch.Tensor | None = None,
        complete: bool = True,
    ) -> CaptureReader:
        """Capture ``data`` into ``out`` (or memory) with root attributes ``attrs``;
        ``complete=False`` leaves the file a part (a shard of a capture over ranks)."""
        model, probes = self.model, self.probes
        device = next((p.device for p in model.parameters()), None)
        attrs = {**attrs, "sample_offset": sample_offset}
        total = limit
        if total is None and hasattr(data, "num_samples"):
            total = data.num_samples
        t0 = time.perf_counter()
        writer = None
        mem = MemoryRows(capacity=_sample_bound(data, limit))
        indices: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        with HookSession(
            model,
            self.layers,
            probes,
            mode=self.mode,
            loss_fn=self.loss_fn,
            grouped=self.grouped,
            cuda_graph=self.cuda_graph,
        ) as session:
            try:  # the writer is made inside: a signal right after it opens must still abort it
                if out is not None:
                    writer = H5Writer(
                        out,
                        attrs,
                        WriterOptions(
                            compression=self.compression,
                            queue_bytes=self.queue_bytes,
                            expected_rows=total,
                        ),
                    )
                seen = 0
                positions: dict[str, int] = {}  # layer key -> its depth (see _layer_attrs)
                lookahead = any(getattr(p, "needs_next_sample", False) for p in probes)
                batches = _with_next(
                    _limited(_batches(data, device), limit), lookahead, next_sample
                )
                for x, y, idx, x_next in batches:
                    raise_if_terminated()  # a SIGTERM whose exception Python dropped
                    if idx is None:
                        first = sample_offset + seen
                        idx = torch.arange(first, first + len(x), device="cpu")
                    results, _ = session.run_batch(
                        x, y, sample_offset=sample_offset + seen, next_input=x_next
                    )
                    if writer is not None:
                        for key in results:
                            if key not in writer.layer_attrs:
                                writer.layer_attrs[key] = _layer_attrs(session, key, positions)
                        writer.dims.update(session.dim_labels)  # before submit: read at creation
                        writer.submit(results, idx, y)
                    else:
                        for key, qs in results.items():
                            for q, t in qs.items():
                                mem.add(key, q, t)
                        mem.end_batch()
                        indices.append(torch.as_tensor(idx, device="cpu").numpy())
                        labels.append(y.cpu().numpy() if y is not None else np.full(len(x), -1))
                    seen += len(x)
                    if progress is not None:
                        progress(seen, total)
                if seen == 0:
                    raise ProbeError("The data yielded no samples; nothing was captured.")
                elapsed = time.perf_counter() - t0
                replayed = {"replayed_batches": session.replayed_batches} if self.cuda_graph else {}
                bad = session.nonfinite  # numerics are data: recorded per layer, and warned about
                settled = _settled_provenance(attrs)  # a kernel that failed in this capture
                attrs.update(settled)
                _warn_nonfinite(bad, seen)
                if sample_offset == 0:  # a later shard may hold no sample a capped probe keeps
                    _warn_nothing_recorded(session, seen)
                if writer is not None:
                    for key, n in bad.items():
                        writer.layer_attrs.setdefault(key, {})["nonfinite_samples"] = n
                    path = writer.close(
                        {
                            "wall_seconds": elapsed,
                            "nonfinite_layers": len(bad),
                            **settled,
                            **replayed,
                        },
                        complete=complete,
                        before_commit=raise_if_terminated,  # a dropped SIGTERM: nothing committed
                    )
                    part_of = None if complete else attrs.get("part_of")
                    return H5Capture(path, part_of=part_of, written=True)
                data_out = mem.arrays()
                layer_attrs = {key: _layer_attrs(session, key, positions) for key in data_out}
                for key, n in bad.items():
                    layer_attrs[key]["nonfinite_samples"] = n
                attrs["nonfinite_layers"] = len(bad)
                attrs.update(replayed)
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
        attrs.update(
            n_samples=seen,
            wall_seconds=elapsed,
            layer_order=json.dumps(list(data_out)),
            complete=True,
        )
        return MemoryCapture(
            data_out,
            layer_attrs,
            np.concatenate(indices),
            np.concatenate(labels),
            attrs,
            dims=session.dim_labels,
        )
