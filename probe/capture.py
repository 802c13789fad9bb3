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
from collections.abc import Callable, Iterable, Sequence
from math import prod

import numpy as np
import torch
from torch import nn

from probe.errors import ProbeError
from probe.hooks.select import LayerSpec
from probe.probes.base import Probe
from probe.provenance import code_revision, command_line, library_versions
from probe.session import HookSession, LossFn
from probe.store.reader import CaptureReader, H5Capture, MemoryCapture
from probe.store.writer import H5Writer, WriterOptions

__all__ = ["capture"]

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


def _layer_attrs(session: HookSession, key: str) -> dict:
    info = session.layer_info(key)
    out_shape, f_shape, in_shape = session.shapes.get(key, ((), None, None))
    attrs = {
        "module": info.name,
        "module_type": type(info.module).__name__,
        "is_block": info.is_block,
        "residual": -1 if info.residual is None else int(info.residual),
        "layer_index": info.index,
        "call": int(key.split("@")[1]) if "@" in key else 0,
        "output_shape": json.dumps(list(out_shape)),
        "spatial_size": prod(out_shape[1:]) if len(out_shape) > 1 else 1,
    }
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

    The model's training flags, grad mode and outputs are unchanged; hooks are removed and a
    partially written file is deleted on any error.
    """
    if not probes:
        raise ProbeError(
            "No probes given; e.g. probes=[probe.ResidualNorms(), probe.ChannelStats()]."
        )
    if mode != "eval" and any(getattr(p, "requires_eval", False) for p in probes):
        raise ProbeError(
            "Jacobian probes need eval mode (train-mode BN couples the samples of a batch)."
        )
    device = next((p.device for p in model.parameters()), None)
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
        "model_type": type(model).__name__,
        **(provenance or {}),
    }
    attrs = {"config": json.dumps(config, default=str), "provenance": json.dumps(meta, default=str)}
    if shard is not None:
        rank, count = shard
        if not 0 <= rank < count:
            raise ProbeError(f"Invalid shard {shard!r}: need 0 <= rank < count.")
        attrs.update(shard_rank=rank, shard_count=count)
    total = limit
    if total is None and hasattr(data, "num_samples"):
        total = data.num_samples
    t0 = time.perf_counter()
    writer = None
    mem: dict[str, dict[str, list[np.ndarray]]] = {}
    indices: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with HookSession(model, layers, probes, mode=mode, loss_fn=loss_fn) as session:
        dims = {q: d for p in probes for q, d in type(p).dims.items()}
        if out is not None:
            writer = H5Writer(
                out,
                attrs,
                WriterOptions(
                    compression=compression, queue_bytes=queue_bytes, expected_rows=total
                ),
                dims=dims,
            )
        try:
            seen = 0
            for x, y, idx in _batches(data, device):
                if limit is not None and seen >= limit:
                    break
                if limit is not None and seen + len(x) > limit:
                    keep = limit - seen
                    x, y = x[:keep], (y[:keep] if y is not None else None)
                    idx = idx[:keep] if idx is not None else None
                if idx is None:
                    idx = torch.arange(seen, seen + len(x))
                results, _ = session.run_batch(x, y, sample_offset=seen)
                if writer is not None:
                    for key in results:
                        writer.layer_attrs.setdefault(key, _layer_attrs(session, key))
                    writer.submit(results, idx, y)
                else:
                    for key, qs in results.items():
                        layer = mem.setdefault(key, {})
                        for q, t in qs.items():
                            arr = (
                                t.float().cpu().numpy()
                                if t.dtype == torch.bfloat16
                                else t.cpu().numpy()
                            )
                            layer.setdefault(q, []).append(arr)
                    indices.append(torch.as_tensor(idx).cpu().numpy())
                    labels.append(y.cpu().numpy() if y is not None else np.full(len(x), -1))
                seen += len(x)
                if progress is not None:
                    progress(seen, total)
            if seen == 0:
                raise ProbeError("The data yielded no samples; nothing was captured.")
            elapsed = time.perf_counter() - t0
            if writer is not None:
                path = writer.close({"wall_seconds": elapsed})
                return H5Capture(path)
            layer_attrs = {key: _layer_attrs(session, key) for key in mem}
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    data_out = {k: {q: np.concatenate(v) for q, v in qs.items()} for k, qs in mem.items()}
    attrs.update(
        n_samples=seen, wall_seconds=elapsed, layer_order=json.dumps(list(data_out)), complete=True
    )
    return MemoryCapture(
        data_out, layer_attrs, np.concatenate(indices), np.concatenate(labels), attrs
    )
