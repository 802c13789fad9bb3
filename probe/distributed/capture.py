"""A capture split over the ranks of a process group (``probe.capture`` under torchrun).

Each rank captures a contiguous part of the samples (:func:`~probe.distributed.split_samples`)
into its own shard, ``<out>.shards/rank-RRRRR-of-NNNNN.h5``; a shard is a *part* (``complete =
False``, ``part_of`` = the capture's id) that ``probe.open`` refuses on its own. Once every rank
has finished, rank 0 joins the parts into ``out`` -- a copy (one self-contained file, as one
process writes it; the parts are then deleted) or an index of virtual datasets over the kept
parts. Any rank's failure is every rank's: each deletes its own part and raises the same error,
so no file that looks complete is left behind. A rank that is killed outright leaves at most
parts, which nothing accepts as a capture.

Before capturing, the ranks check that they run the same capture: the same probes and settings,
the same number of samples, the same output and the same model weights (a digest of every
parameter and buffer) -- a rank with differently initialised weights would otherwise put
another model's numbers into the joined file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from probe.distributed.group import (
    agree,
    all_gather,
    broadcast,
    hostname,
    on_main,
    ranks,
)
from probe.distributed.split import (
    batch_edges,
    sample_at,
    shard_data,
    split_samples,
    total_samples,
)
from probe.errors import ProbeError, check_option
from probe.store.reader import CaptureReader, H5Capture, MemoryCapture
from probe.store.shards import join_shards, merge_layer_attrs

__all__ = ["capture_over_ranks", "shard_folder", "model_digest"]


def shard_folder(out: str | os.PathLike) -> Path:
    """Where the ranks of a capture into ``out`` write their parts: ``<out>.shards/``."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def model_digest(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every parameter and buffer."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _agree_on_settings(job, attrs: dict, out, n: int, join: str) -> list[str]:
    """Every rank's host, after checking every rank runs the same capture."""
    mine = {
        "config": attrs["config"],
        "out": None if out is None else str(out),
        "samples": n,
        "join": join,
        "model": model_digest(job.model),
    }
    views = all_gather({**mine, "host": hostname()})
    what = {
        "config": "probes, layers or settings",
        "out": "output file",
        "samples": "number of samples",
        "join": "join",
        "model": "model weights (seed the initialisation, or load the same weights)",
    }
    for k, v in enumerate(views):
        for key, label in what.items():
            if v[key] != views[0][key]:
                raise ProbeError(
                    f"Rank {k} runs another capture than rank 0: its {label} differ "
                    f"({str(v[key])[:80]!r} vs {str(views[0][key])[:80]!r}). Every rank must call "
                    "probe.capture with the same model and arguments; to capture on one rank "
                    "alone, pass distributed=False."
                )
    return [v["host"] for v in views]


def capture_over_ranks(
    job,
    data: Iterable,
    attrs: dict,
    *,
    out: str | os.PathLike | None,
    limit: int | None,
    join: str,
    progress,
) -> CaptureReader:
    """Run ``job`` (a :class:`probe.capture.CaptureJob`) over this rank's part of ``data``;
    return the joined capture on every rank."""
    check_option("join", join, ["copy", "virtual"])
    r = ranks()
    n = total_samples(data)
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise ProbeError("The data yielded no samples; nothing was captured.")
    # BatchNorm in training mode normalises by each batch: ranks must see one process's batches
    batch_stats = job.mode == "train" or (job.mode == "keep" and job.model.training)
    edges = batch_edges(data, n) if batch_stats else None
    splits = split_samples(n, r.world, edges)
    hosts = _agree_on_settings(job, attrs, out, n, join)
    capture_id = broadcast(uuid.uuid4().hex)
    filled = [k for k, (a, b) in enumerate(splits) if b > a]
    start, stop = splits[r.rank]
    lookahead = any(getattr(p, "needs_next_sample", False) for p in job.probes)
    prov = json.loads(attrs["provenance"])
    prov["ranks"] = {
        "world": r.world,
        "samples": [list(s) for s in splits],
        "hosts": sorted(set(hosts)),
        "split": "batches" if edges is not None else "samples",
    }
    attrs = {**attrs, "provenance": json.dumps(prov, default=str)}
    t0 = time.perf_counter()

    def my_part(path: Path | None):
        if stop == start:
            return None
        return job.run(
            shard_data(data, start, stop),
            {
                **attrs,
                "shard_rank": filled.index(r.rank),
                "shard_count": len(filled),
                "part_of": capture_id,
            },
            out=path,
            limit=None,
            progress=progress,
            sample_offset=start,
            next_sample=sample_at(data, stop % n) if lookahead else None,
            complete=False,
        )

    if out is None:
        return _in_memory(agree("capture", lambda: my_part(None)), attrs, t0)

    folder = shard_folder(out)
    paths = [folder / f"rank-{i:05d}-of-{len(filled):05d}.h5" for i in range(len(filled))]
    mine = paths[filled.index(r.rank)] if stop > start else None
    try:

        def write_part() -> None:
            if mine is not None:
                folder.mkdir(parents=True, exist_ok=True)
                my_part(mine).close()

        agree("capture", write_part)
        on_main(
            "join",
            lambda: _join(paths, out, join, {**attrs, "capture_id": capture_id}, hosts, filled, t0),
        )
    except BaseException:
        if mine is not None:
            with contextlib.suppress(OSError):
                mine.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only once empty: another rank may still be deleting its part
        raise
    return H5Capture(out)


def _join(
    paths: list[Path], out, join: str, attrs: dict, hosts: list[str], filled: list[int], t0: float
) -> None:
    for path, rank in zip(paths, filled):
        if not path.is_file():
            raise ProbeError(
                f"Rank {rank} wrote its part to {path} on host {hosts[rank]}, but rank 0 (host "
                f"{hosts[0]}) does not see that file: --out must be on a file system every node "
                "shares (NFS, Lustre, ...)."
            )
    keep = ("config", "provenance", "capture_id")
    root = {k: attrs[k] for k in keep} | {"wall_seconds": time.perf_counter() - t0}
    join_shards(paths, out, copy=join == "copy", attrs=root)
    folder = paths[0].parent
    stale = set(folder.glob("rank-*-of-*.h5")) - set(paths)  # parts of an earlier capture
    for path in stale | (set(paths) if join == "copy" else set()):
        path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty: a virtual join keeps its parts there


def _in_memory(part: MemoryCapture | None, attrs: dict, t0: float) -> MemoryCapture:
    """Every rank's in-memory part, gathered on every rank and concatenated in rank order."""
    parts = [p for p in all_gather(part) if p is not None]
    layers: list[str] = []
    for p in parts:
        layers += [l for l in p.layers if l not in layers]
    data, layer_attrs, dims = {}, {}, {}
    for layer in layers:
        holders = [p for p in parts if layer in p.layers]
        qs = list(dict.fromkeys(q for p in holders for q in p.quantities(layer)))
        data[layer] = {
            q: np.concatenate([p.read(layer, q) for p in holders if q in p.quantities(layer)])
            for q in qs
        }
        dims.update({(layer, q): holders[0].dim_labels(layer, q) for q in qs})
        layer_attrs[layer] = merge_layer_attrs([p.layer_attrs(layer) for p in holders])
    index = np.concatenate([p.sample_index() for p in parts])
    root = {
        **attrs,
        "sample_offset": 0,
        "n_samples": len(index),
        "wall_seconds": time.perf_counter() - t0,
        "layer_order": json.dumps(layers),
        "nonfinite_layers": sum(1 for a in layer_attrs.values() if a.get("nonfinite_samples")),
        "complete": True,
    }
    labels = np.concatenate([p.labels() for p in parts])
    return MemoryCapture(data, layer_attrs, index, labels, root, dims=dims)
