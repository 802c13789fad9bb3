"""Join per-process shards of one capture into one capture file.

Each process writes its own capture file over its own samples (``capture(..., shard=(rank,
count), sample_offset=<samples in earlier shards>)``, or a capture over several ranks, whose
shards are *parts*: ``complete = False`` with ``part_of`` = the capture's id, refused on their
own). :func:`join_shards` then writes ``out`` in one of two forms:

- ``copy=True``: a self-contained file with the shards' rows copied in rank order -- the file one
  process would have written (same chunks, filters, checksums, attributes). Costs a read and a
  write of every byte, on the joining process.
- ``copy=False``: an index whose every dataset is an HDF5 virtual dataset mapping one source per
  shard (a handful of mappings keeps reads fast). Costs metadata only; the shards stay beside it
  and are read through it. Source paths are relative to the index, so the folder moves as a
  whole, and the reader checks every source is still there and whole (a missing source would
  silently read as fill values otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from probe.errors import ProbeError
from probe.provenance import FORMULA_KEYS
from probe.store.reader import H5Capture
from probe.store.schema import LAYERS, attrs_digest, check_schema, read_attrs
from probe.tempfiles import atomic_path

__all__ = ["join_shards", "merge_layer_attrs"]


# Probe fields that cap the samples a probe records ("the first max_samples of the capture").
_CAP_FIELDS = ("max_samples", "spectrum_samples")
_COPY_BLOCK = 64 << 20  # bytes read and written at a time when copying a dataset


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


def _rows(cap: H5Capture) -> int:
    return int(cap.attrs["n_samples"])  # = rows of /sample_index (checked on open)


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
        start += _rows(cap)


def _joined_keys(caps: list[H5Capture]) -> dict[tuple[str, str], list[int]]:
    """Every (layer, quantity) of the joined capture and the shards that hold it, after checking
    that the shards are parts of
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
    keys = {}
    for key in sorted(set().union(*held)):
        owners = keys[key] = [i for i, h in enumerate(held) if key in h]
        full = [_rows(caps[i]) == caps[i].shape(*key)[0] for i in owners[:-1]]
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


def _part_id(path: str | os.PathLike) -> str | None:
    """The ``part_of`` id of a shard file, None if it has none or cannot be read (the reader then
    says what is wrong with it)."""
    with contextlib.suppress(OSError), h5py.File(path, "r") as f:
        value = f.attrs.get("part_of")
        return value.decode() if isinstance(value, bytes) else value
    return None


def _open_shards(shards: Sequence[str | os.PathLike]) -> list[H5Capture]:
    """The shards, opened; parts of a capture over ranks only as the whole set of its ranks."""
    ids = [_part_id(s) for s in shards]
    if any(ids) and (len(set(ids)) != 1):
        raise ProbeError(
            "These shards are not parts of one capture: their part_of ids differ ("
            + ", ".join(sorted({str(i) for i in ids}))
            + "). Join the shards of one capture over ranks together, and nothing else."
        )
    caps: list[H5Capture] = []
    try:
        for s, pid in zip(shards, ids):
            caps.append(H5Capture(s, part_of=pid))  # validates format, version, completeness
        if ids[0] is not None:
            ranks = [int(c.attrs["shard_rank"]) for c in caps]
            count = int(caps[0].attrs["shard_count"])
            if ranks != list(range(count)):
                raise ProbeError(
                    f"The capture {ids[0]} has {count} shards, ranks 0 to {count - 1}, to be "
                    f"joined in rank order; got shard ranks {ranks}."
                )
    except BaseException:
        for cap in caps:
            cap.close()
        raise
    return caps


def join_shards(
    shards: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    copy: bool = False,
    attrs: dict | None = None,
) -> Path:
    """Write ``out`` from ``shards`` (in rank order): a copy of their rows (``copy=True``) or an
    index of virtual datasets over them. ``attrs`` replace root attributes of the result (a
    capture over several ranks records its global configuration and provenance there).

    Example:
        >>> join_shards(["run/rank0.h5", "run/rank1.h5"], "run/index.h5")  # doctest: +SKIP
    """
    out = Path(out)
    if len(shards) < 1:
        raise ProbeError("join_shards needs at least one shard file.")
    caps = _open_shards(shards)
    try:
        _check_offsets(caps)
        keys = _joined_keys(caps)
        rel = [os.path.relpath(Path(c.path).resolve(), out.resolve().parent) for c in caps]
        root = _root_attrs(caps, keys, rel, copy, attrs or {})
        with atomic_path(out) as tmp:  # no file that looks complete unless it is
            _write_joined(tmp, caps, rel, keys, copy, root)
    finally:
        for cap in caps:
            cap.close()
    return out


def merge_layer_attrs(parts: Sequence[dict]) -> dict:
    """A layer's attributes over the shards that hold it (in rank order): the first's, with the
    non-finite counts summed (a NaN in any shard is a NaN of the joined capture).

    Example:
        >>> merge_layer_attrs([{"module": "a", "nonfinite_samples": 2}, {"module": "a"},
        ...                    {"module": "a", "nonfinite_samples": 1}])
        {'module': 'a', 'nonfinite_samples': 3}
    """
    merged = dict(parts[0])
    merged.pop("nonfinite_samples", None)
    bad = sum(int(a.get("nonfinite_samples", 0)) for a in parts)
    return merged | ({"nonfinite_samples": bad} if bad else {})


def _merged_layer_attrs(caps: list[H5Capture], layer: str) -> dict:
    return merge_layer_attrs([c.layer_attrs(layer) for c in caps if layer in c.layers])


def _root_attrs(
    caps: list[H5Capture], keys: dict, rel: list[str], copy: bool, override: dict
) -> dict:
    first = caps[0]
    root = dict(first.attrs)
    for k in ("part_of", "shards", "attrs_sha256", "complete"):
        root.pop(k, None)
    if first.attrs.get("part_of") is not None:
        root["capture_id"] = first.attrs["part_of"]
    layers = {l for l, _ in keys}
    bad = sum(1 for l in layers if _merged_layer_attrs(caps, l).get("nonfinite_samples"))
    root.update(
        n_samples=sum(_rows(c) for c in caps),
        nonfinite_layers=bad,
        wall_seconds=max(float(c.attrs.get("wall_seconds", 0.0)) for c in caps),
        sample_offset=0,
    )
    if copy:  # one file, as one process writes it
        root.update(shard_rank=0, shard_count=1)
    else:
        root.update(shard_rank=-1, shard_count=len(caps), shards=json.dumps(rel))
    root.update(override)
    root.update(_shards_formulas(caps, root))
    return root


def _shards_formulas(caps: list[H5Capture], root: dict) -> dict:
    """``root``'s provenance with the statistics formulas of every shard, where the shards did
    not all take the same ones (a kernel that failed on one rank turned its kernels off there
    alone): "rank 0: one-pass; rank 1: one-pass, then torch". Else nothing."""
    if "provenance" not in root:
        return {}
    meta = json.loads(root["provenance"])
    runtimes = [json.loads(c.attrs.get("provenance", "{}")).get("runtime") or {} for c in caps]
    runtime = meta.get("runtime")
    if not isinstance(runtime, dict):
        return {}
    joined = {}
    for key in FORMULA_KEYS:
        values = [r.get(key) for r in runtimes]
        if None in values or (len(set(values)) == 1 and values[0] == runtime.get(key)):
            continue  # a shard from before the record, or every shard as the root says
        if len(set(values)) == 1:
            joined[key] = values[0]
        else:
            ranks = [int(c.attrs.get("shard_rank", i)) for i, c in enumerate(caps)]
            joined[key] = "; ".join(f"rank {r}: {v}" for r, v in zip(ranks, values))
    if not joined:
        return {}
    meta["runtime"] = {**runtime, **joined}
    return {"provenance": json.dumps(meta, default=str)}


def _create_copy(f: h5py.File, name: str, src: h5py.Dataset, rows: int) -> h5py.Dataset:
    """A dataset of ``rows`` rows shaped, chunked and filtered like ``src`` (its creation
    properties -- chunks, compression, Fletcher-32 -- are copied as they are)."""
    return f.create_dataset(
        name,
        shape=(rows, *src.shape[1:]),
        maxshape=(None, *src.shape[1:]),
        dtype=src.dtype,
        chunks=src.chunks,
        dcpl=src.id.get_create_plist(),
    )


def _copy_rows(dst: h5py.Dataset, start: int, cap: H5Capture, src: h5py.Dataset) -> None:
    row_bytes = max(1, int(np.prod(src.shape[1:], dtype=np.int64)) * src.dtype.itemsize)
    step = max(src.chunks[0] if src.chunks else 1, _COPY_BLOCK // row_bytes)
    for a in range(0, src.shape[0], step):
        b = min(src.shape[0], a + step)
        dst[start + a : start + b] = cap.read_checked(src, slice(a, b))  # checksums verified


def _write_joined(
    tmp: Path,
    caps: list[H5Capture],
    rel: list[str],
    keys: dict[tuple[str, str], list[int]],
    copy: bool,
    root: dict,
) -> None:
    every = list(range(len(caps)))
    sources = {"sample_index": every, "labels": every} | {
        f"{LAYERS}/{l}/{q}": owners for (l, q), owners in sorted(keys.items())
    }
    with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
        f.attrs.update(root)
        f.attrs["complete"] = False
        for name, owners in sources.items():
            parts = [(rel[i], caps[i], caps[i].node(name)) for i in owners]
            feat, dtype = parts[0][2].shape[1:], parts[0][2].dtype
            if any(d.shape[1:] != feat or d.dtype != dtype for _, _, d in parts):
                raise ProbeError(f"Shards disagree on the shape or dtype of {name}.")
            rows = sum(d.shape[0] for _, _, d in parts)
            if copy:
                out = _create_copy(f, name, parts[0][2], rows)
                start = 0
                for _, cap, d in parts:
                    _copy_rows(out, start, cap, d)
                    start += d.shape[0]
            else:
                layout = h5py.VirtualLayout(shape=(rows, *feat), dtype=dtype)
                start = 0
                for path, _, d in parts:
                    layout[start : start + d.shape[0]] = h5py.VirtualSource(
                        path, name, shape=d.shape
                    )
                    start += d.shape[0]
                out = f.create_virtual_dataset(name, layout, fillvalue=_fill(dtype))
            for k, v in parts[0][2].attrs.items():
                if k not in ("DIMENSION_LIST", "REFERENCE_LIST"):  # dimension scales: per file
                    out.attrs[k] = v
            for i, dim in enumerate(parts[0][2].dims):  # axis labels are not attributes
                out.dims[i].label = dim.label
        for layer in {l for l, _ in keys}:  # layer attributes once per group, not per quantity
            f[f"{LAYERS}/{layer}"].attrs.update(_merged_layer_attrs(caps, layer))
        attrs = read_attrs(f)  # once, for both
        check_schema(f, attrs)
        f.attrs["attrs_sha256"] = attrs_digest(attrs)
        f.attrs["complete"] = True
