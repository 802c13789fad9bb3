"""HDF5 capture store: schema, streaming writer, lazy readers."""

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
