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
from probe.store.schema import LAYERS, attrs_digest, check_schema
from probe.tempfiles import atomic_path

__all__ = ["join_shards"]


# Probe fields that cap the samples a probe records ("the first max_samples of the capture").
_CAP_FIELDS = ("max_samples", "spectrum_samples")


def _caps(cap: H5Capture) -> list[str]:
    """'probe.field=value' for every sample cap of the probes that wrote ``cap``."""
    probes = cap.config.get("probes", [])
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


def _joined_keys(caps: list[H5Capture]) -> set[tuple[str, str]]:
    """Every (layer, quantity) of the joined capture, after checking that the shards are parts of
    one capture: the same probes, and each dataset held by a prefix of the shards in which every
    shard but the last holds all of its samples. A capped probe's rows end in one shard and the
    shards after it hold none (their samples lie past the cap); any other pattern would leave
    rows that are not the first rows of the joined sample order."""
    first = caps[0]
    for cap in caps[1:]:
        if cap.config.get("probes") != first.config.get("probes"):
            raise ProbeError(
                f"Shard {cap.path} holds different datasets than {first.path}: it was captured "
                "with other probes. Shards of one capture need the same --probe settings."
            )
    held = [{(l, q) for l in c.layers for q in c.quantities(l)} for c in caps]
    keys = set().union(*held)
    for key in sorted(keys):
        owners = [i for i, h in enumerate(held) if key in h]
        full = [len(caps[i].sample_index()) == caps[i].shape(*key)[0] for i in owners[:-1]]
        if owners != list(range(len(owners))) or not all(full):
            raise ProbeError(
                f"Shards hold different datasets: {key[0]}/{key[1]} is in shards {owners} of "
                f"{len(caps)} ({', '.join(str(c.path) for c in caps[:2])} ...), which is not the "
                "first rows of the joined capture. Shards must be captured by the same model and "
                "probes, each with its sample_offset."
            )
    return keys


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
        keys = _joined_keys(caps)
        rel = [os.path.relpath(Path(c.path).resolve(), out.resolve().parent) for c in caps]
        with atomic_path(out) as tmp:  # no index file that looks complete unless it is
            _write_index(tmp, caps, rel, keys)
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
            parts = [(p, c.node(name)) for p, c in zip(rel, caps) if name in c.node("/")]
            feat, dtype = parts[0][1].shape[1:], parts[0][1].dtype
            if any(d.shape[1:] != feat or d.dtype != dtype for _, d in parts):
                raise ProbeError(f"Shards disagree on the shape or dtype of {name}.")
            rows = sum(d.shape[0] for _, d in parts)
            layout = h5py.VirtualLayout(shape=(rows, *feat), dtype=dtype)
            start = 0
            for path, d in parts:
                layout[start : start + d.shape[0]] = h5py.VirtualSource(path, name, shape=d.shape)
                start += d.shape[0]
            vds = f.create_virtual_dataset(name, layout, fillvalue=_fill(dtype))
            for k, v in parts[0][1].attrs.items():
                if k not in ("DIMENSION_LIST", "REFERENCE_LIST"):  # dimension scales: per file
                    vds.attrs[k] = v
            for i, dim in enumerate(parts[0][1].dims):  # axis labels are not attributes
                vds.dims[i].label = dim.label
        for layer in {l for l, _ in keys}:  # layer attributes once per group, not per quantity
            f[f"{LAYERS}/{layer}"].attrs.update(first.layer_attrs(layer))  # shard 0 holds all
        check_schema(f)
        f.attrs["attrs_sha256"] = attrs_digest(f)
        f.attrs["complete"] = True
