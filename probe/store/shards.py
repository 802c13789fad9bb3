"""Join per-process shards of one capture into an index file of HDF5 virtual datasets.

Each process writes its own complete capture file (``capture(..., shard=(rank, count),
sample_offset=<samples in earlier shards>)``) over its own samples; :func:`join_shards` then writes an index whose every dataset is a virtual
dataset mapping one source per shard (a handful of mappings, which keeps reads fast). Source paths
are stored relative to the index file, so the folder can be moved as a whole. The reader checks
that every shard is still present and complete (a missing source would silently read as fill
values otherwise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from probe.errors import ProbeError
from probe.store.reader import H5Capture
from probe.store.schema import LAYERS

__all__ = ["join_shards"]


# Probe fields that cap the samples a probe records ("the first max_samples of the capture").
_CAP_FIELDS = ("max_samples", "spectrum_samples")


def _caps(cap: H5Capture) -> list[str]:
    """'probe.field=value' for every sample cap of the probes that wrote ``cap``."""
    probes = json.loads(cap.attrs.get("config", "{}")).get("probes", [])
    return [
        f"{p.get('probe')}.{k}={p[k]}"
        for p in probes
        if isinstance(p, dict)
        for k in _CAP_FIELDS
        if p.get(k) is not None
    ]


def _check_offsets(caps: list[H5Capture]) -> None:
    """Shards with sample caps must have been captured at their position in the joined order:
    a shard that counted its cap from 0 holds rows of samples beyond the joined capture's cap."""
    start = 0
    for cap in caps:
        offset = int(cap.attrs.get("sample_offset", 0))
        limits = _caps(cap)
        if offset != start and limits:
            raise ProbeError(
                f"Shard {cap.path} was captured with sample_offset={offset}, but the shards before "
                f"it hold {start} samples. Its probes cap samples ({', '.join(limits[:3])}), which "
                f"count from sample_offset, so joining would keep rows past the cap. Capture it "
                f"again with probe.capture(..., sample_offset={start}), or give the shards in rank "
                "order."
            )
        start += len(cap.sample_index())


def _fill(dtype: np.dtype):
    return np.nan if np.issubdtype(dtype, np.floating) else -1


def join_shards(shards: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write ``out``: an index of virtual datasets over ``shards`` (complete capture files).

    Example:
        >>> join_shards(["run/rank0.h5", "run/rank1.h5"], "run/index.h5")  # doctest: +SKIP
    """
    out = Path(out)
    if len(shards) < 1:
        raise ProbeError("join_shards needs at least one shard file.")
    caps = [H5Capture(s) for s in shards]  # validates format, version and completeness
    try:
        _check_offsets(caps)
        first = caps[0]
        keys = {(l, q) for l in first.layers for q in first.quantities(l)}
        for cap in caps[1:]:
            other = {(l, q) for l in cap.layers for q in cap.quantities(l)}
            if other != keys:
                diff = sorted(keys ^ other)[:3]
                raise ProbeError(
                    f"Shard {cap.path} holds different datasets than {first.path} (e.g. {diff})."
                )
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        rel = [os.path.relpath(Path(c.path).resolve(), out.resolve().parent) for c in caps]
        try:
            _write_index(tmp, caps, rel, keys)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, out)
    finally:
        for cap in caps:
            cap.close()
    return out


def _write_index(
    tmp: Path, caps: list[H5Capture], rel: list[str], keys: set[tuple[str, str]]
) -> None:
    first = caps[0]
    with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
        f.attrs.update(first.attrs)
        f.attrs.update(
            complete=False,
            shard_count=len(caps),
            shard_rank=-1,
            shards=json.dumps(rel),
            n_samples=int(sum(len(c.sample_index()) for c in caps)),
        )
        names = ["sample_index", "labels"] + [f"{LAYERS}/{l}/{q}" for l, q in sorted(keys)]
        for name in names:
            dsets = [c.node(name) for c in caps]
            feat, dtype = dsets[0].shape[1:], dsets[0].dtype
            if any(d.shape[1:] != feat or d.dtype != dtype for d in dsets):
                raise ProbeError(f"Shards disagree on the shape or dtype of {name}.")
            layout = h5py.VirtualLayout(shape=(sum(d.shape[0] for d in dsets), *feat), dtype=dtype)
            start = 0
            for path, d in zip(rel, dsets):
                layout[start : start + d.shape[0]] = h5py.VirtualSource(path, name, shape=d.shape)
                start += d.shape[0]
            vds = f.create_virtual_dataset(name, layout, fillvalue=_fill(dtype))
            for k, v in dsets[0].attrs.items():
                if k not in ("DIMENSION_LIST", "REFERENCE_LIST"):  # dimension scales: per file
                    vds.attrs[k] = v
        for layer in {l for l, _ in keys}:  # layer attributes once per group, not per quantity
            f[f"{LAYERS}/{layer}"].attrs.update(first.layer_attrs(layer))
        f.attrs["complete"] = True
