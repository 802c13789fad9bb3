"""Read captures lazily: :func:`open_capture` (exported as ``probe.open``) and the in-memory twin.

Both readers share one interface (:class:`CaptureReader`), so analyses work on a file or on the
result of an in-memory capture alike.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from probe.errors import ProbeError
from probe.stats import Moments
from probe.store.schema import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_DATASETS,
    LAYER_ATTRS,
    LAYERS,
    ROOT_ATTRS,
    attr_problems,
    attrs_digest,
    attrs_of,
    default_dim_labels,
    is_compatible,
    read_attrs,
)

if TYPE_CHECKING:  # pandas loads in to_frame: a capture, and probe inspect, need none of it
    import pandas as pd

__all__ = ["CaptureReader", "H5Capture", "MemoryCapture", "open_capture"]


def _decode(arr: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


class CaptureReader:
    """Common read API: layers, quantities, arrays, attributes and exact channel moments."""

    attrs: dict
    layers: list[str]

    def quantities(self, layer: str) -> list[str]:
        """The quantities recorded for ``layer``, sorted by name."""
        raise NotImplementedError

    def read(self, layer: str, quantity: str, rows: slice | None = None) -> np.ndarray:
        raise NotImplementedError

    def layer_attrs(self, layer: str) -> dict:
        raise NotImplementedError

    def has(self, layer: str, quantity: str) -> bool:
        return layer in self.layers and quantity in self.quantities(layer)

    def __getitem__(self, layer: str) -> dict[str, np.ndarray]:
        """Every quantity of ``layer``, read: ``cap["stages.0.0"]["f_norm"]``."""
        return {q: self.read(layer, q) for q in self.quantities(layer)}

    def __contains__(self, layer: object) -> bool:
        return layer in self.layers

    def to_frame(self, layers: list[str] | None = None) -> pd.DataFrame:
        """The per-sample scalar quantities as a tidy table: one row per (layer, sample) with
        columns layer, sample_index, label and one column per quantity. Capped quantities are
        NaN past their rows; array-valued quantities (activations, spectra) are left out.

        Example:
            >>> import probe, torch
            >>> m = probe.zoo.create("resnet8", in_channels=1, width=4)
            >>> cap = probe.capture(m, [torch.randn(3, 1, 8, 8)], probes=["residual"])
            >>> cap.to_frame().shape
            (9, 10)
        """
        import pandas as pd

        index, labels = self.sample_index(), self.labels()
        frames = []
        for layer in layers if layers is not None else self.layers:
            cols: dict[str, np.ndarray] = {}
            for q in self.quantities(layer):
                if len(self.shape(layer, q)) != 1:
                    continue
                v = np.full(len(index), np.nan)
                data = self.read(layer, q)
                v[: len(data)] = data
                cols[q] = v
            if cols:
                frames.append(
                    pd.DataFrame({"layer": layer, "sample_index": index, "label": labels, **cols})
                )
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def dim_labels(self, layer: str, quantity: str) -> tuple[str, ...]:
        """Axis labels of a quantity, sample axis first (e.g. sample, channel, height, width)."""
        raise NotImplementedError

    @property
    def config(self) -> dict:
        return json.loads(self.attrs.get("config", "{}"))

    @property
    def provenance(self) -> dict:
        return json.loads(self.attrs.get("provenance", "{}"))

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            from probe.errors import did_you_mean

            raise ProbeError(
                f"Layer {layer!r} is not in this capture.{did_you_mean(layer, self.layers)}"
                f" Captured layers: {', '.join(self.layers[:6])}{' ...' if len(self.layers) > 6 else ''}."
            )

    def channel_moments(self, layer: str, prefix: str = "", block_rows: int = 4096) -> Moments:
        """Exact per-channel mean/variance over (N, H, W), merged chunk by chunk (Chan et al.)."""
        mean_q, var_q = f"{prefix}channel_mean", f"{prefix}channel_var"
        if not self.has(layer, mean_q):
            raise ProbeError(
                f"Layer {layer!r} has no {mean_q!r}; capture it with the 'channel' probe."
            )
        spatial = int(self.layer_attrs(layer).get(f"{prefix}spatial_size", 1)) or 1
        n = self.shape(layer, mean_q)[0]
        m = Moments.empty(self.shape(layer, mean_q)[1])
        for start in range(0, n, block_rows):
            rows = slice(start, min(n, start + block_rows))
            m.update_from_groups(
                self.read(layer, mean_q, rows), self.read(layer, var_q, rows), spatial
            )
        return m

    def shape(self, layer: str, quantity: str) -> tuple[int, ...]:
        raise NotImplementedError

    def sample_index(self) -> np.ndarray:
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_attr(path: Path, attrs: dict, key: str, kind: type) -> object:
    """A JSON-encoded root attribute, parsed and type-checked (absent: an empty ``kind``)."""
    raw = attrs.get(key)
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, kind):
        raise ProbeError(
            f"{path} is damaged: attribute {key!r} is not a JSON {kind.__name__} ({str(raw)[:60]!r}). "
            "Re-run the capture."
        )
    return value


def _incomplete(path: Path, attrs: dict) -> str:
    part_of = attrs.get("part_of")
    if part_of is None:
        return (
            f"{path} is incomplete: the capture that wrote it did not finish. Re-run the capture."
        )
    return (
        f"{path} is one shard (rank {attrs.get('shard_rank')} of {attrs.get('shard_count')}) of "
        f"the capture {part_of} over several ranks: it holds only part of the samples and is read "
        "through the file the ranks joined. If that file is missing, the capture did not finish: "
        "re-run it, or join its shards with `probe join OUT SHARD...` when all of them are there."
    )


class H5Capture(CaptureReader):
    """A capture file opened read-only; arrays are read on demand.

    ``part_of``: also accept a shard of the capture with this id (a part that is complete only
    together with the other ranks' shards; used by the join). ``written``: the caller wrote and
    checked this file a moment ago (the writer checks the schema and computes the attribute
    digest before it marks a file complete), so the structure and digest checks, which read
    every attribute again, are skipped; the format and completeness checks still run."""

    def __init__(
        self, path: str | os.PathLike, *, part_of: str | None = None, written: bool = False
    ) -> None:
        self.path = Path(path)
        self._layer_attrs: dict[str, dict] = {}  # read once each: the file is opened read-only
        if not self.path.exists():
            raise ProbeError(f"No capture file at {self.path}.")
        if not self.path.is_file():  # a FIFO or a device would block h5py's open forever
            raise ProbeError(
                f"{self.path} is not a regular file (a folder, a FIFO or a device); give a capture "
                "file written by probe capture."
            )
        with contextlib.suppress(ImportError):
            import hdf5plugin  # noqa: F401  (registers the Blosc filter for compressed captures)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise ProbeError(
                f"{self.path} is not a readable HDF5 file ({e}). Was it truncated?"
            ) from e
        a = dict(self._f.attrs)
        try:
            if a.get("format") != FORMAT:
                raise ProbeError(
                    f"{self.path} is not a {FORMAT} file (format={a.get('format')!r})."
                )
            if not is_compatible(a.get("format_version", "")):
                raise ProbeError(
                    f"{self.path} has format version {a.get('format_version')!r}; this resprobe reads "
                    f"{FORMAT_VERSION} (same major version). Upgrade resprobe or re-capture."
                )
            complete = a.get("complete", False)
            if not isinstance(complete, (bool, np.bool_)):
                raise ProbeError(
                    f"{self.path}: attribute 'complete' is {complete!r} ({type(complete).__name__}), "
                    "not a boolean; the file was edited or damaged. Re-run the capture."
                )
            if not complete and (part_of is None or a.get("part_of") != part_of):
                raise ProbeError(_incomplete(self.path, a))
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}
            if "shards" in self.attrs:
                self._check_shards(_json_attr(self.path, self.attrs, "shards", list))
            order = _json_attr(self.path, self.attrs, "layer_order", list)
            present = list(self._f[LAYERS].keys()) if LAYERS in self._f else []
            self.layers = [n for n in order if n in present] + [
                n for n in present if n not in order
            ]
            if written:
                return
            attrs = read_attrs(self._f)  # once, for the structure and the digest
            self._check_structure(order, present, attrs)
            # Last: the specific checks above say more about what is wrong when they fire.
            digest = self.attrs.get("attrs_sha256")
            if digest is not None and attrs_digest(attrs) != digest:
                raise ProbeError(
                    f"{self.path} is damaged: its attributes no longer match the digest written "
                    "with them (attrs_sha256). Re-run the capture."
                )
        except ProbeError:
            self._f.close()
            raise

    def _check_structure(self, order: list, present: list[str], attrs: dict) -> None:
        """Refuse a file whose structure does not match the schema (docs/schema.md): what was
        damaged, what was expected. Metadata only -- no data is read; ``attrs`` are the file's
        attributes (:func:`~probe.store.schema.read_attrs`)."""

        def bad(what: str) -> ProbeError:
            return ProbeError(f"{self.path} is damaged: {what}. Re-run the capture.")

        problems = attr_problems(self.attrs, ROOT_ATTRS)
        if problems:
            raise bad(f"root attribute {problems[0]}")
        n = int(self.attrs["n_samples"])
        for name in INDEX_DATASETS:
            d = self._f.get(name)
            if not isinstance(d, h5py.Dataset):
                raise bad(f"/{name} is missing")
            if d.ndim != 1 or d.shape[0] != n or d.dtype.kind not in "iu":
                raise bad(
                    f"/{name} has shape {d.shape} and dtype {d.dtype}, expected [{n}] integers"
                )
        missing = [l for l in order if l not in present]
        if missing:
            raise bad(f"layers {missing[:3]} listed in 'layer_order' have no group under /{LAYERS}")
        for layer in present:
            group = self._f[f"{LAYERS}/{layer}"]
            problems = attr_problems(attrs_of(attrs, group), LAYER_ATTRS)
            if problems:
                raise bad(f"/{LAYERS}/{layer} attribute {problems[0]}")
            for q, d in group.items():
                if not isinstance(d, h5py.Dataset):
                    raise bad(f"/{LAYERS}/{layer}/{q} is not a dataset")
                if d.ndim < 1 or d.shape[0] > n:
                    raise bad(
                        f"/{LAYERS}/{layer}/{q} has shape {d.shape}; expected at most {n} rows "
                        "(one per sample)"
                    )
                if d.dtype.kind not in "fiub":
                    raise bad(f"/{LAYERS}/{layer}/{q} has dtype {d.dtype}, expected numbers")

    def _check_shards(self, shards: list[str]) -> None:
        """An index file reads missing sources as fill values; refuse it instead. A source is
        whole when complete, or when it is a finished part of this very capture."""
        for rel in shards:
            path = self.path.parent / rel
            try:
                with h5py.File(path, "r") as f:
                    ok = bool(f.attrs.get("complete", False)) or (
                        "capture_id" in self.attrs
                        and f.attrs.get("part_of") == self.attrs["capture_id"]
                    )
            except OSError:
                ok = False
            if not ok:
                self._f.close()
                raise ProbeError(
                    f"{self.path} joins shard {rel}, which is missing or incomplete; re-run that shard."
                )

    def quantities(self, layer: str) -> list[str]:
        self._check_layer(layer)
        return list(self._f[f"{LAYERS}/{layer}"].keys())

    def dataset(self, layer: str, quantity: str) -> h5py.Dataset:
        """The lazy h5py dataset (slice it to read)."""
        self._check_layer(layer)
        key = f"{LAYERS}/{layer}/{quantity}"
        if key not in self._f:
            raise ProbeError(
                f"Layer {layer!r} has no quantity {quantity!r}; it has {', '.join(self.quantities(layer))}."
            )
        return self._f[key]

    def node(self, path: str) -> h5py.Dataset | h5py.Group:
        """The h5py object at ``path`` (e.g. ``"sample_index"``), for tools that copy or map files."""
        return self._f[path]

    def read(self, layer: str, quantity: str, rows: slice | None = None) -> np.ndarray:
        d = self.dataset(layer, quantity)
        arr = self.read_checked(d, rows if rows is not None else ())
        return _decode(np.asarray(arr), d.attrs.get("encoding", ""))

    def read_checked(self, d: h5py.Dataset, sel: object) -> np.ndarray:
        """``d[sel]``; a chunk whose checksum fails (or that cannot be decoded) is an error."""
        try:
            return d[sel]
        except OSError as e:
            raise ProbeError(
                f"{self.path}: {d.name} is damaged ({str(e).strip() or type(e).__name__}); its data "
                "cannot be trusted. Re-run the capture; `probe inspect --verify` lists every "
                "damaged dataset."
            ) from e

    def verify(self) -> list[tuple[str, str]]:
        """Read every chunk of every dataset; (dataset, problem) for each that is damaged or
        carries no checksum (files written before checksums, virtual datasets' sources are
        checked through the shard files).

        Example:
            >>> import tempfile, os, torch
            >>> from probe.zoo import create
            >>> from probe.capture import capture
            >>> path = os.path.join(tempfile.mkdtemp(), "c.h5")
            >>> capture(create("resnet8", in_channels=1, width=4), [torch.randn(2, 1, 8, 8)],
            ...         probes=["residual"], out=path).verify()
            []
        """
        problems: list[tuple[str, str]] = []
        names = ["sample_index", "labels"] + [
            f"{LAYERS}/{layer}/{q}" for layer in self.layers for q in self.quantities(layer)
        ]
        for name in names:
            d = self._f[name]
            if d.is_virtual:
                sources = sorted({(v.file_name, v.dset_name) for v in d.virtual_sources()})
                for src, dset in sources:
                    try:
                        with h5py.File(self.path.parent / src, "r") as f:
                            problems += [(f"{src}:{k}", p) for k, p in _verify_dataset(f[dset])]
                    except (OSError, KeyError) as e:
                        problems.append((f"{src}:{dset}", f"source unreadable: {e}"))
                continue
            problems += _verify_dataset(d)
        return problems

    def shape(self, layer: str, quantity: str) -> tuple[int, ...]:
        return tuple(self.dataset(layer, quantity).shape)

    def dim_labels(self, layer: str, quantity: str) -> tuple[str, ...]:
        return tuple(d.label for d in self.dataset(layer, quantity).dims)

    def layer_attrs(self, layer: str) -> dict:
        found = self._layer_attrs.get(layer)
        if found is None:  # ~1 ms a layer through h5py; analyses ask for each many times
            self._check_layer(layer)
            found = self._layer_attrs[layer] = dict(self._f[f"{LAYERS}/{layer}"].attrs)
        return dict(found)

    def sample_index(self) -> np.ndarray:
        return self.read_checked(self._f["sample_index"], ())

    def labels(self) -> np.ndarray:
        return self.read_checked(self._f["labels"], ())

    def close(self) -> None:
        self._f.close()


def _verify_dataset(d: h5py.Dataset) -> list[tuple[str, str]]:
    """Read ``d`` chunk by chunk (HDF5 checks each chunk's Fletcher-32 sum on the way)."""
    out = []
    if not d.fletcher32:
        out.append((d.name, "no checksum (written without one: bit rot cannot be detected)"))
    step = d.chunks[0] if d.chunks else max(1, d.shape[0] if d.ndim else 1)
    n = d.shape[0] if d.ndim else 1
    for start in range(0, max(n, 1), step):
        try:
            d[start : start + step] if d.ndim else d[()]
        except OSError as e:
            out.append(
                (d.name, f"damaged at rows {start}-{min(n, start + step) - 1}: {str(e).strip()}")
            )
            break
    return out


class MemoryCapture(CaptureReader):
    """A capture held in memory (``capture(..., out=None)``)."""

    def __init__(
        self,
        data: dict[str, dict[str, np.ndarray]],
        layer_attrs: dict[str, dict],
        sample_index: np.ndarray,
        labels: np.ndarray,
        attrs: dict,
        dims: dict[tuple[str, str], tuple[str, ...]] | None = None,
    ) -> None:
        self._data, self._layer_attrs, self._dims = data, layer_attrs, dict(dims or {})
        self._sample_index, self._labels = sample_index, labels
        self.attrs = attrs
        self.layers = list(data)

    def quantities(self, layer: str) -> list[str]:
        self._check_layer(layer)
        return sorted(self._data[layer])  # by name, as HDF5 lists a group's datasets

    def read(self, layer: str, quantity: str, rows: slice | None = None) -> np.ndarray:
        self._check_layer(layer)
        if quantity not in self._data[layer]:
            raise ProbeError(
                f"Layer {layer!r} has no quantity {quantity!r}; it has {', '.join(self._data[layer])}."
            )
        arr = self._data[layer][quantity]
        return arr[rows] if rows is not None else arr

    def shape(self, layer: str, quantity: str) -> tuple[int, ...]:
        return tuple(self.read(layer, quantity).shape)

    def dim_labels(self, layer: str, quantity: str) -> tuple[str, ...]:
        ndim = self.read(layer, quantity).ndim
        return self._dims.get((layer, quantity)) or default_dim_labels(ndim)

    def layer_attrs(self, layer: str) -> dict:
        self._check_layer(layer)
        return dict(self._layer_attrs.get(layer, {}))

    def sample_index(self) -> np.ndarray:
        return self._sample_index

    def labels(self) -> np.ndarray:
        return self._labels


def open_capture(path: str | os.PathLike) -> H5Capture:
    """Open a capture file lazily; refuses incomplete files and unknown format versions.

    Example:
        >>> with probe.open("run.h5") as cap:  # doctest: +SKIP
        ...     cap.read("stages.0.0", "f_norm")
    """
    return H5Capture(path)
