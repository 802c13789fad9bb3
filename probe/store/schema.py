"""The capture file schema (see docs/schema.md): names, version and validation rules.

Layout::

    /                      attrs: format, format_version, complete, created, config (JSON),
                           provenance (JSON), layer_order (JSON), n_samples, shard_rank, shard_count
    /sample_index          [N] int64 -- dataset index of each captured sample, in capture order
    /labels                [N] int64 -- the sample's label (when known)
    /layers/<dotted.name>/ attrs: module_type, is_block, residual (-1 unknown / 0 / 1), layer_index
        <quantity>         [N, ...] per-sample rows; dims labelled, sample axis first; a dataset
                           with fewer rows than /sample_index covers its first rows
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from h5py import AttributeManager, h5o

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUPPORTED_MAJOR",
    "LAYERS",
    "Attr",
    "ROOT_ATTRS",
    "LAYER_ATTRS",
    "INDEX_DATASETS",
    "attr_problems",
    "check_schema",
    "attrs_digest",
    "read_attrs",
    "attrs_of",
    "schema_markdown",
    "is_compatible",
    "default_dim_labels",
]

FORMAT = "resprobe-capture"
FORMAT_VERSION = "1.0.0"  # semantic version: readers accept the same major version
SUPPORTED_MAJOR = 1
LAYERS = "layers"


def is_compatible(version: str) -> bool:
    try:
        return int(str(version).split(".")[0]) == SUPPORTED_MAJOR
    except ValueError:
        return False


def default_dim_labels(ndim: int) -> tuple[str, ...]:
    """Labels of a quantity whose probe declares none: ``sample`` then ``dim1``, ``dim2``, ..."""
    return ("sample", *(f"dim{i}" for i in range(1, ndim)))


@dataclass(frozen=True)
class Attr:
    """One HDF5 attribute of the schema: its name, type, whether every file has it, and what it
    means. The writer checks its own file against these before marking it complete, the reader
    refuses a file that breaks them, and docs/schema.md shows them (:func:`schema_markdown`)."""

    name: str
    kind: str  # str | bool | int | count (int >= 0) | positive (int >= 1) | number | json-object | json-list
    required: bool
    doc: str


ROOT_ATTRS: tuple[Attr, ...] = (
    Attr("format", "str", True, f'"{FORMAT}"'),
    Attr("format_version", "str", True, "semantic version; readers accept the same major"),
    Attr("complete", "bool", True, "set last: a file without `True` was interrupted"),
    Attr("created", "str", True, "ISO 8601 local time the capture started"),
    Attr("n_samples", "positive", True, "rows of /sample_index and /labels"),
    Attr("layer_order", "json-list", True, "layer keys in capture order"),
    Attr(
        "config",
        "json-object",
        True,
        "layers, probes (each with its parameters), mode, limit, compression",
    ),
    Attr(
        "provenance",
        "json-object",
        True,
        "model, checkpoint and weights hashes, data, versions, command",
    ),
    Attr("shard_rank", "int", True, "this shard's rank; 0 for a single capture, -1 for an index"),
    Attr("shard_count", "positive", True, "1 unless one shard of several"),
    Attr("sample_offset", "count", False, "position of the first sample in the joined capture"),
    Attr("wall_seconds", "number", False, "capture time"),
    Attr("nonfinite_layers", "count", False, "layers with a NaN/inf result"),
    Attr(
        "replayed_batches",
        "count",
        False,
        "with --cuda-graph: batches whose probed pass was a replay of a recorded CUDA graph",
    ),
    Attr("shards", "json-list", False, "index files: the shard files joined (relative paths)"),
    Attr(
        "part_of",
        "str",
        False,
        "a shard of a capture over several ranks: that capture's id; the shard stays "
        "`complete = False` and is read through the file its ranks joined",
    ),
    Attr("capture_id", "str", False, "a capture joined from ranks: the id its shards carry"),
    Attr(
        "attrs_sha256",
        "str",
        False,
        "digest of every other attribute in the file (set last but one)",
    ),
)

LAYER_ATTRS: tuple[Attr, ...] = (
    Attr("module", "str", True, "dotted name of the module that computes it"),
    Attr("module_type", "str", True, "its class name"),
    Attr("kind", "str", False, "adapter, site, block (a module with several sites) or layer"),
    Attr("site", "count", False, "index among its module's residual sites"),
    Attr("is_block", "bool", True, "holds a residual split (F, S)"),
    Attr("residual", "int", True, "1 residual, 0 plain, -1 not a block"),
    Attr(
        "layer_index",
        "int",
        True,
        "depth: the order the forward pass produced the layers' results in (capture order), one per call of a module called several times; -1 for model",
    ),
    Attr("call", "count", True, "0 for the first call, k for 'name@k'"),
    Attr("output_shape", "json-list", True, "per-sample output shape"),
    Attr("spatial_size", "positive", True, "product of the output's non-channel axes"),
    Attr(
        "f_spatial_size",
        "positive",
        False,
        "the same for F(x); absent where no probe read the split (block outputs alone)",
    ),
    Attr("input_size", "positive", False, "elements of one sample's input"),
    Attr(
        "model_sites",
        "count",
        False,
        "residual adds found in the whole model by tracing its first batch (0: a plain model); "
        "absent where it was not traced (registered blocks only)",
    ),
    Attr("nonfinite_samples", "count", False, "samples with a NaN/inf result"),
)

INDEX_DATASETS: dict[str, str] = {
    "sample_index": "[N] int64: dataset index of each captured sample, in capture order",
    "labels": "[N] int64: label of each sample (-1 unknown)",
}


def _kind_ok(value: object, kind: str) -> bool:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, (bool, np.bool_))
    if kind in ("int", "count", "positive"):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            return False
        return kind == "int" or int(value) >= (1 if kind == "positive" else 0)
    if kind == "number":
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        )
    if kind.startswith("json-"):
        try:
            parsed = json.loads(value) if isinstance(value, str) else None
        except json.JSONDecodeError:
            return False
        return isinstance(parsed, dict if kind == "json-object" else list)
    raise ValueError(f"unknown attribute kind {kind!r}")


def attr_problems(attrs: Mapping[str, object], spec: tuple[Attr, ...]) -> list[str]:
    """What ``attrs`` breaks of ``spec``: missing required attributes and wrong types.

    Example:
        >>> attr_problems({"module": "a", "is_block": "yes"}, LAYER_ATTRS)[:2]
        ["'module_type' is missing", "'is_block' is 'yes' (str), expected bool"]
    """
    out = []
    for a in spec:
        if a.name not in attrs:
            if a.required:
                out.append(f"{a.name!r} is missing")
            continue
        v = attrs[a.name]
        if not _kind_ok(v, a.kind):
            shown = v.item() if isinstance(v, np.generic) else v
            out.append(f"{a.name!r} is {shown!r} ({type(shown).__name__}), expected {a.kind}")
    return out


def read_attrs(f) -> dict[str, dict[str, object]]:
    """Every attribute of an open h5py file, read once: ``{"/": root attributes, path: the
    attributes of each group and dataset}``.

    HDF5 takes ~50 us per attribute read (a ResNet-56 capture has ~340), so the schema check and
    the digest share one read instead of reading everything twice.

    Example:
        >>> import h5py, io
        >>> with h5py.File(io.BytesIO(), "w") as f:
        ...     f.attrs["a"] = 1
        ...     f.create_group("g").attrs["b"] = "x"
        ...     {path: sorted(names) for path, names in read_attrs(f).items()}
        {'/': ['a'], 'g': ['b']}
    """
    out: dict[str, dict[str, object]] = {"/": dict(f.attrs.items())}

    def read(name: bytes) -> None:
        # h5py's visititems wraps every object it visits, and a Dataset's wrapper reads its
        # creation properties and filters (~0.1 ms each, ~300 datasets a capture): the object's
        # id is all an AttributeManager reads through, so it gets that alone. The values are
        # h5py's own, converted by the same AttributeManager (tests/probe/test_checksums.py).
        owner = _Owner(h5o.open(f.id, name))
        try:  # as h5py names it: UTF-8, else the bytes
            key = name.decode("utf-8")
        except UnicodeDecodeError:
            key = name
        out[key] = dict(AttributeManager(owner).items())

    h5o.visit(f.id, read)  # each object once, the root not among them, as visititems
    return out


@dataclass(frozen=True)
class _Owner:
    """What :class:`h5py.AttributeManager` takes of the object whose attributes it reads."""

    id: object


def attrs_of(attrs: Mapping[str, Mapping[str, object]], obj) -> Mapping[str, object]:
    """``obj``'s attributes from what :func:`read_attrs` returned, or read from ``obj`` itself
    when it was reached through a second link (read_attrs reads each object once, under one
    path)."""
    own = attrs.get(obj.name.lstrip("/"))
    return dict(obj.attrs) if own is None else own


def check_schema(f, attrs: Mapping[str, Mapping[str, object]] | None = None) -> None:
    """Raise if an open h5py file about to be marked complete breaks the declared attributes
    (``complete`` itself excepted): a writer bug, surfaced before a file looks finished.
    ``attrs``: the file's attributes as :func:`read_attrs` returned them, if already read."""
    attrs = read_attrs(f) if attrs is None else attrs
    root = dict(attrs["/"])
    root.setdefault("complete", True)
    problems = [f"root {p}" for p in attr_problems(root, ROOT_ATTRS)]
    if LAYERS in f:
        for layer, group in f[LAYERS].items():
            own = attrs_of(attrs, group)
            problems += [f"/{LAYERS}/{layer} {p}" for p in attr_problems(own, LAYER_ATTRS)]
    if problems:
        raise ValueError(
            f"resprobe wrote a capture that breaks its own schema ({'; '.join(problems[:3])}); "
            "this is a bug, please report it."
        )


def attrs_digest(f) -> str:
    """sha256 over every attribute of an open h5py file (root, groups, datasets; sorted by
    path and name), except ``complete`` and ``attrs_sha256`` itself. HDF5 keeps no checksum of
    metadata: this one makes a flipped byte in an attribute an error on open. ``f`` is the file
    or its attributes as :func:`read_attrs` returned them."""
    import hashlib

    attrs = f if isinstance(f, dict) else read_attrs(f)  # an h5py File is a Mapping too
    h = hashlib.sha256()

    def add(path: str, attrs) -> None:
        for k in sorted(attrs.keys()):
            if path == "/" and k in ("complete", "attrs_sha256"):
                continue
            if k in ("DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME"):
                continue  # dimension-scale bookkeeping: object references differ per file
            v = attrs[k]
            h.update(f"{path}|{k}|".encode())
            # Canonical text, not raw bytes: string arrays are object arrays of pointers.
            value = v.decode() if isinstance(v, bytes) else v
            h.update(json.dumps(np.asarray(value).tolist(), default=str).encode())

    add("/", attrs["/"])
    for name in sorted(k for k in attrs if k != "/"):
        add(name, attrs[name])
    return h.hexdigest()


def schema_markdown() -> str:
    """The attribute tables of docs/schema.md, generated from the declarations above."""
    lines = []
    for title, spec in (("Root attributes", ROOT_ATTRS), ("Layer group attributes", LAYER_ATTRS)):
        lines += [
            f"**{title}**",
            "",
            "| attribute | type | required | meaning |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{a.name}` | {a.kind} | {'yes' if a.required else 'no'} | {a.doc} |" for a in spec
        ]
        lines.append("")
    lines += ["**Index datasets**", "", "| dataset | meaning |", "|---|---|"]
    lines += [f"| `/{k}` | {v} |" for k, v in INDEX_DATASETS.items()]
    return "\n".join(lines)
