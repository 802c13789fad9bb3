"""HDF5 capture store: schema, streaming writer, lazy readers.

Each name loads with its module on first use (:mod:`probe.lazy`): reading a capture
(``probe inspect``) then loads no torch, which only the writer needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probe.lazy import attach, names_in

if TYPE_CHECKING:
    from probe.store.reader import CaptureReader, H5Capture, MemoryCapture, open_capture
    from probe.store.schema import FORMAT, FORMAT_VERSION
    from probe.store.shards import join_shards
    from probe.store.writer import H5Writer, WriterOptions

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CaptureReader",
    "H5Capture",
    "H5Writer",
    "MemoryCapture",
    "WriterOptions",
    "join_shards",
    "open_capture",
]

_HOME = {
    **names_in("probe.store.reader", "CaptureReader", "H5Capture", "MemoryCapture", "open_capture"),
    **names_in("probe.store.schema", "FORMAT", "FORMAT_VERSION"),
    **names_in("probe.store.shards", "join_shards"),
    **names_in("probe.store.writer", "H5Writer", "WriterOptions"),
}
__getattr__, __dir__ = attach(__name__, _HOME)
