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

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUPPORTED_MAJOR",
    "LAYERS",
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
