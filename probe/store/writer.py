"""Streaming HDF5 writer: a background thread owns the file, fed by a byte-bounded queue.

The GPU loop never calls h5py (h5py serialises all calls behind one global lock, so a call from
the hook thread could stall behind a large write). Tensors leave the device through pinned,
non-blocking copies; the writer thread waits on each copy's CUDA event before touching the data.
Rows are buffered per dataset and written in chunk-aligned blocks (a partial-chunk write costs a
read-modify-write); uncompressed chunks reach the disk past the page cache where the file system
allows it (:mod:`probe.store.direct`). Crash safety: the file is written as
``<out>.tmp-<pid>``, ``complete`` is set last, then the file is flushed, fsynced and atomically
renamed to ``<out>``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from probe.errors import ProbeError, check_option
from probe.store.checksum import with_fletcher32
from probe.store.direct import (
    ALIGN,
    ALIGN_THRESHOLD,
    BufferPool,
    DirectFile,
    collector_paused,
    supported,
)
from probe.store.schema import (
    FORMAT,
    FORMAT_VERSION,
    LAYERS,
    attrs_digest,
    check_schema,
    default_dim_labels,
    read_attrs,
)
from probe.tempfiles import commit, remove_stale_temps, sync, temp_path

__all__ = [
    "H5Writer",
    "WriterOptions",
    "dtype_mismatch",
    "shape_mismatch",
    "to_host",
    "to_host_many",
]

_CHUNK_TARGET = 2 << 20  # ~2 MiB per chunk: within h5py's advice and the measured sweet spot
_SPACE_RESERVE = 4 << 20  # free space kept for buffered chunks and metadata written at close
_SYNC_BYTES = 64 << 20  # written data made durable in steps of this size, while the model runs
_INLINE_BYTES = 64 << 10  # chunks checksummed on the writer thread itself below this size


def _checksum_workers() -> int:
    # half the cores at most: the model's own threads run beside the writer
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class WriterOptions:
    compression: str | None = None  # None, "zstd" (Blosc-Zstd via hdf5plugin) or "gzip"; lossless
    queue_bytes: int = 512 << 20  # back-pressure: submit() blocks while this much is pending
    chunk_bytes: int = _CHUNK_TARGET
    expected_rows: int | None = None  # when known, chunks never exceed the whole dataset

    def __post_init__(self) -> None:
        check_option("compression", self.compression, [None, "zstd", "gzip"])

    def filter_kwargs(self) -> dict:
        # Every chunk carries a Fletcher-32 checksum (HDF5 keeps none by default), checked by
        # HDF5 on every read: bit rot is an error, never a number (probe inspect --verify).
        if self.compression == "gzip":
            return {"compression": "gzip", "compression_opts": 1, "fletcher32": True}
        if self.compression == "zstd":
            import hdf5plugin

            blosc = hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)
            return {**dict(blosc), "fletcher32": True}
        return {"fletcher32": True}


class _HostTensor:
    """A tensor on its way to host memory: waits for the device copy before exposing numpy."""

    __slots__ = ("tensor", "event", "encoding")

    def __init__(self, tensor: torch.Tensor, event: object, encoding: str) -> None:
        self.tensor, self.event, self.encoding = tensor, event, encoding

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.numpy()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def to_host(t: torch.Tensor) -> _HostTensor:
    """Start a copy of ``t`` to host memory (pinned + non-blocking on CUDA).

    bfloat16 has no numpy type: it travels as its raw 16 bits (uint16) and is tagged so the
    reader restores float32 values exactly.
    """
    return _to_host(*_storable(t))


def _to_host(t: torch.Tensor, encoding: str) -> _HostTensor:
    """:func:`to_host` of a tensor already in a dtype numpy holds (see :func:`_storable`)."""
    if t.is_cuda:
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _HostTensor(host, event, encoding)
    return _HostTensor(
        t.detach().contiguous().clone() if t.requires_grad else t.detach().contiguous(),
        None,
        encoding,
    )


def to_host_many(tensors: list[torch.Tensor]) -> list[_HostTensor]:
    """:func:`to_host` of each tensor, with one copy for the CUDA tensors that share memory.

    A batch's results are mostly views of a few blocks: a statistic computed for a group of
    calls and split per call (probe.probes.group), a replayed pass's one block per dtype
    (probe.replay). A pinned buffer, a copy and an event per result cost ~10 µs of host time
    each, a few milliseconds for a ResNet-56 batch's ~380 results; contiguous views of one
    storage leave in one copy of the span they cover (where it is at most twice their bytes)
    and are read back as views of it.

    Example:
        >>> block = torch.arange(6.0)
        >>> [h.numpy().tolist() for h in to_host_many([block[:2], block[2:]])]
        [[0.0, 1.0], [2.0, 3.0, 4.0, 5.0]]
    """
    out: list[_HostTensor | None] = [None] * len(tensors)
    shared: dict[tuple, list[tuple[int, torch.Tensor, str]]] = {}
    for i, t in enumerate(tensors):
        t, encoding = _storable(t)  # once: for an unusual dtype it is a conversion
        if t.is_cuda and t.is_contiguous() and t.numel():
            key = (t.device, t.untyped_storage().data_ptr())
            shared.setdefault(key, []).append((i, t, encoding))
        else:
            out[i] = _to_host(t, encoding)
    for members in shared.values():
        spans = [_extent(t) for _, t, _ in members]
        if len(members) > 1 and _one_copy(spans):
            hosts = _span_to_host(members, spans)
        else:
            hosts = [_to_host(t, encoding) for _, t, encoding in members]
        for (i, _, _), host in zip(members, hosts):
            out[i] = host
    return out


def _storable(t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``t`` in a dtype numpy holds, and the tag of an encoding ("bfloat16": its raw bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), "bfloat16"
    if t.dtype not in (
        torch.float32,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
        torch.bool,
    ):
        return t.float(), ""
    return t, ""


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [first, end) of its storage that a contiguous ``t`` covers."""
    first = t.storage_offset() * t.element_size()
    return first, first + t.numel() * t.element_size()


def _one_copy(spans: list[tuple[int, int]]) -> bool:
    """Whether one copy of the storage the spans cover moves at most twice their bytes."""
    covered = max(e for _, e in spans) - min(f for f, _ in spans)
    return covered <= 2 * sum(e - f for f, e in spans)


def _span_to_host(
    members: list[tuple[int, torch.Tensor, str]], spans: list[tuple[int, int]]
) -> list[_HostTensor]:
    """One pinned copy of the storage span the members cover (their :func:`_extent` s); each
    member a view of it."""
    lo = min(f for f, _ in spans) // 16 * 16  # aligned for every element size
    hi = max(e for _, e in spans)
    first = members[0][1]
    device_bytes = torch.empty(0, dtype=torch.uint8, device=first.device)
    device_bytes.set_(first.untyped_storage())
    cuda = first.is_cuda  # (a CPU storage is copied the same way in the tests)
    host = torch.empty(-(-(hi - lo) // 16) * 16, dtype=torch.uint8, device="cpu", pin_memory=cuda)
    host[: hi - lo].copy_(device_bytes[lo:hi], non_blocking=cuda)
    event = torch.cuda.Event() if cuda else None
    if event is not None:
        event.record()
    views = []
    for (_, t, encoding), (f, _) in zip(members, spans):
        es = t.element_size()
        view = host.view(t.dtype)[(f - lo) // es :][: t.numel()].view(t.shape)
        views.append(_HostTensor(view, event, encoding))
    return views


@dataclass
class _Buffer:
    """One dataset's rows not yet written, and what every later batch of it must match."""

    layer: str
    quantity: str
    feat: tuple[int, ...]  # the per-sample shape
    dtype: np.dtype
    encoding: str
    dset: h5py.Dataset | None = None  # created once a chunk's worth of rows is known
    parts: list[np.ndarray] = field(default_factory=list)  # rows not yet written, oldest first
    rows: int = 0

    def take(self, rows: int) -> np.ndarray:
        """Remove the oldest ``rows`` rows; one array (a view when a single part holds them)."""
        head, n = [], 0
        while n < rows:
            part = self.parts[0]
            use = min(len(part), rows - n)
            head.append(part[:use])
            if use == len(part):
                self.parts.pop(0)
            else:
                self.parts[0] = part[use:]
            n += use
        self.rows -= rows
        return head[0] if len(head) == 1 else np.concatenate(head)

    @property
    def key(self) -> str:
        return f"{LAYERS}/{self.layer}/{self.quantity}"  # the dataset's path in the file

    def conform(self, arr: np.ndarray, encoding: str) -> np.ndarray:
        """``arr`` as more rows of this dataset, or an error: chunks are written as raw bytes,
        so rows of another shape or type would be stored as wrong numbers, not refused by HDF5."""
        if arr.shape[1:] != self.feat:
            raise shape_mismatch(self.key, arr.shape[1:], self.feat)
        if arr.dtype == self.dtype and encoding == self.encoding:
            return arr
        if not encoding and not self.encoding and np.can_cast(arr.dtype, self.dtype, "safe"):
            return arr.astype(self.dtype)  # exact: e.g. float16 rows into a float32 dataset
        raise dtype_mismatch(self.key, encoding or arr.dtype, self.encoding or self.dtype)


def shape_mismatch(key: str, got: tuple[int, ...], had: tuple[int, ...]) -> ProbeError:
    """The error for a batch whose rows of ``key`` have another per-sample shape than before
    (HDF5 and in-memory captures alike)."""
    return ProbeError(
        f"{key}: this batch gave rows of shape {list(got)}, earlier batches {list(had)}. A "
        "probe's quantity must keep its per-sample shape from batch to batch (check the probe's "
        "forward for batch-dependent shapes)."
    )


def dtype_mismatch(key: str, got: object, had: object) -> ProbeError:
    """The error for a batch whose rows of ``key`` cannot be stored exactly in the dtype of the
    earlier batches (HDF5 and in-memory captures alike)."""
    return ProbeError(
        f"{key}: this batch gave {got} rows, earlier batches {had}, and they cannot be stored "
        "together exactly. Return the same dtype from every batch (e.g. cast in the probe's "
        "forward)."
    )


class H5Writer:
    """Write per-sample rows to ``path`` from a background thread.

    Example:
        >>> import tempfile
        >>> w = H5Writer(tempfile.mkdtemp() + "/x.h5", attrs={"config": "{}", "provenance": "{}"})
        >>> w.layer_attrs["fc"] = {"module": "fc", "module_type": "Linear", "is_block": False,
        ...     "residual": -1, "layer_index": 0, "call": 0, "output_shape": "[3]", "spatial_size": 1}
        >>> w.submit({"fc": {"y_norm": torch.ones(3)}}, torch.arange(3))
        >>> path = w.close()  # checked against probe.store.schema before it is marked complete
        >>> import h5py; h5py.File(w.path)["layers/fc/y_norm"].shape
        (3,)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        attrs: dict | None = None,
        options: WriterOptions | None = None,
        layer_attrs: dict[str, dict] | None = None,
        dims: dict[str | tuple[str, str], tuple[str, ...]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.options = options or WriterOptions()
        self.tmp = temp_path(self.path)
        self.layer_attrs = dict(layer_attrs or {})
        self.dims = dict(dims or {})
        self._filters = self.options.filter_kwargs()
        # with no compression the only filter is the checksum, which _write_chunks computes
        self._direct = self.options.compression is None
        # ... and the chunks' bytes go to the disk past the page cache (probe.store.direct)
        self._raw_file: DirectFile | None = None
        self._pool = BufferPool()
        self.direct_bytes = 0  # chunk bytes written past the page cache, known once closed
        # chunks are checksummed on other threads (numpy releases the GIL) while this one writes
        # the chunks before them: one thread doing both ran at ~1.1 GB/s on a GPU host whose
        # disk wrote 1.36 GB/s
        self._checksums = ThreadPoolExecutor(_checksum_workers(), "resprobe-h5-checksum")
        # each layer's group, found once: HDF5 looks up every parent of a path it is given
        # (~0.1 ms a dataset, ~300 datasets in a statistics capture)
        self._groups: dict[str, h5py.Group] = {}
        self._unsynced = 0
        # fdatasync waits for the disk: on its own thread it no longer stalls the writer, so the
        # disk writes one step while the writer checksums and hands over the next
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="resprobe-h5-sync")
        self._sync_step: Future | None = None
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._buffers: dict[tuple[str, str], _Buffer] = {}  # (layer, quantity)
        self._layer_order: list[str] = []
        self._n_samples = 0
        self._file: h5py.File | None = None
        self._thread = threading.Thread(target=self._run, name="resprobe-h5-writer", daemon=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path)  # left by a killed capture of the same file
            self._file = self._open()
            self._index, self._labels = self._start_file(attrs)
            self._thread.start()
        except BaseException as e:  # a signal (SIGTERM) included: no temporary file outlives us
            self.abort()
            if isinstance(e, OSError):
                raise ProbeError(
                    f"Cannot write the capture to {self.path}: {e.strerror or e}. "
                    "Choose a writable --out location."
                ) from e
            raise

    def _open(self) -> h5py.File:
        """The temporary file, through a :class:`DirectFile` where chunks are written whole."""
        if not (self._direct and supported()):
            return h5py.File(self.tmp, "w", libver=("v110", "latest"))
        self._raw_file = DirectFile(self.tmp)
        # large objects (whole chunks) start at block boundaries, where O_DIRECT can write
        return h5py.File(
            self._raw_file,
            "w",
            libver=("v110", "latest"),
            alignment_threshold=ALIGN_THRESHOLD,
            alignment_interval=ALIGN,
        )

    def _start_file(self, attrs: dict | None) -> tuple[h5py.Dataset, h5py.Dataset]:
        """Write the file's opening attributes and its two index datasets."""
        self._file.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "complete": False,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "shard_rank": 0,
                "shard_count": 1,
                **(attrs or {}),
            }
        )
        # 64 KiB chunks unless the capture is known to be smaller (512 KiB for a long one)
        index_chunk = (max(1, min(65536, self.options.expected_rows or 8192)),)
        return tuple(
            self._file.create_dataset(
                name,
                shape=(0,),
                maxshape=(None,),
                dtype="i8",
                chunks=index_chunk,
                fletcher32=True,
            )
            for name in ("sample_index", "labels")
        )

    # -- producer side (GPU loop) -------------------------------------------------------------
    def submit(
        self,
        results: dict[str, dict[str, torch.Tensor]],
        sample_index: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Queue one batch: {layer: {quantity: [N, ...]}} plus the dataset index of each sample."""
        self._raise_if_failed()
        rows = [(layer, q) for layer, qs in results.items() for q in qs]
        item = {
            "index": to_host(sample_index.to(torch.int64)),
            # -1 marks an unknown label, so /labels always has one row per sample
            "labels": to_host(
                labels.to(torch.int64)
                if labels is not None
                else torch.full_like(sample_index, -1, dtype=torch.int64)
            ),
            "rows": dict(zip(rows, to_host_many([results[k][q] for k, q in rows]))),
        }
        size = sum(h.nbytes for h in item["rows"].values())
        with self._cond:
            while (
                self._pending > self.options.queue_bytes
                and self._error is None
                and self._pending > 0
            ):
                self._cond.wait(timeout=0.5)
            self._pending += size
        self._raise_if_failed()
        self._queue.put((item, size))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ProbeError(f"Writing {self.path} failed: {msg}.") from e

    # -- writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            got = self._queue.get()
            if got is None:
                return
            item, size = got
            try:
                if self._error is None:
                    with self._h5py_calls_back():
                        self._write_item(item)
                    self._unsynced += size
                    if self._unsynced >= _SYNC_BYTES:
                        self._sync_data()
            except BaseException as e:  # surfaced to the producer on its next call
                self._error = e
            finally:
                with self._cond:
                    self._pending -= size
                    self._cond.notify_all()

    def _sync_data(self) -> None:
        """Flush the chunks written so far to the disk in the background, so that the fsync
        before the rename finds little left to do: the disk works while the model computes,
        rather than after it (an 8-batch ResNet-56 capture waited ~150 ms for it). One step at
        a time: a step still running when the next is due covers it on its next call."""
        step = self._sync_step
        if step is not None:
            if not step.done():
                return
            step.result()  # a failed flush (EIO, ENOSPC) fails the capture
        self._sync_step = self._syncer.submit(sync, self.tmp, data_only=True)
        self._unsynced = 0

    def _stop_helpers(self) -> None:
        """End the checksum and flush threads; raises what the last background flush raised."""
        step, self._sync_step = self._sync_step, None
        self._syncer.shutdown(wait=True)
        self._checksums.shutdown(wait=True)
        if step is not None:
            step.result()

    def _append(self, dset: h5py.Dataset, arr: np.ndarray) -> None:
        n = dset.shape[0]
        dset.resize(n + len(arr), axis=0)
        dset[n:] = arr

    def _check_space(self, item: dict) -> None:
        """Refuse a batch the disk cannot hold, before HDF5 sees ENOSPC: a failed write leaves
        h5py's chunk cache in a state whose clean-up crashes the process (exit 139 after the
        whole capture had run), so a full disk must be caught while the file is still sound."""
        buffered = sum(p.nbytes for b in self._buffers.values() for p in b.parts)  # not yet written
        need = sum(h.nbytes for h in item["rows"].values()) + buffered + _SPACE_RESERVE
        free = shutil.disk_usage(self.tmp.parent).free
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"No space left on the device of {self.tmp.parent}: {free / 2**20:.1f} MiB free, "
                f"the next batch needs {need / 2**20:.1f} MiB (with {_SPACE_RESERVE >> 20} MiB for "
                "HDF5 metadata). Nothing was kept; free space or choose another --out",
            )

    def _write_item(self, item: dict) -> None:
        self._check_space(item)
        index = item["index"].numpy()
        self._append(self._index, index)
        self._append(self._labels, item["labels"].numpy())
        self._n_samples += len(index)
        for (layer, q), host in item["rows"].items():
            arr = host.numpy()
            if host.encoding == "bfloat16":
                arr = arr.view(np.uint16)
            buf = self._buffers.get((layer, q))
            if buf is None:
                buf = self._buffers[layer, q] = _Buffer(
                    layer, q, arr.shape[1:], arr.dtype, host.encoding
                )
                if layer not in self._layer_order:
                    self._layer_order.append(layer)
            else:
                arr = buf.conform(arr, host.encoding)
            buf.parts.append(arr)
            buf.rows += len(arr)
            self._flush(buf, final=False)

    def _chunk_rows(self, buf: _Buffer) -> int:
        row_bytes = max(1, int(np.prod(buf.feat, dtype=np.int64)) * buf.dtype.itemsize)
        rows = max(1, self.options.chunk_bytes // row_bytes)
        if self.options.expected_rows:
            rows = min(rows, max(1, self.options.expected_rows))
        return rows

    def _create(self, buf: _Buffer, chunk_rows: int) -> h5py.Dataset:
        group = self._groups.get(buf.layer)
        if group is None:
            group = self._groups[buf.layer] = self._file.require_group(f"{LAYERS}/{buf.layer}")
        dset = group.create_dataset(
            buf.quantity,
            shape=(0, *buf.feat),
            maxshape=(None, *buf.feat),
            dtype=buf.dtype,
            chunks=(chunk_rows, *buf.feat),
            **self._filters,
        )
        ndim = 1 + len(buf.feat)
        labels = (
            self.dims.get((buf.layer, buf.quantity))
            or self.dims.get(buf.quantity)
            or default_dim_labels(ndim)
        )
        for i, label in enumerate(labels[:ndim]):
            dset.dims[i].label = label
        if buf.encoding:
            dset.attrs["encoding"] = buf.encoding
        return dset

    def _flush(self, buf: _Buffer, final: bool) -> None:
        if buf.dset is None:
            # A dataset is created once a whole chunk of its rows is here, or at the end with
            # one chunk of all its rows: a chunk is stored whole, so a 2 MiB chunk for the 64
            # rows of a per-sample norm made a one-batch capture of statistics a 600 MB file.
            rows = self._chunk_rows(buf)
            if buf.rows < rows and not final:
                return
            buf.dset = self._create(buf, max(1, min(rows, buf.rows)))  # 0 rows: empty
        dset = buf.dset
        rows_per_chunk = dset.chunks[0]
        n_chunks = buf.rows // rows_per_chunk
        if n_chunks and self._direct:
            blocks = [buf.take(rows_per_chunk) for _ in range(n_chunks)]
            self._write_chunks(dset, blocks, n_chunks * rows_per_chunk)
        elif n_chunks:
            self._append(dset, buf.take(n_chunks * rows_per_chunk))
        if not (final and buf.rows):
            return
        if self._direct:  # the last, partial chunk, padded with zeros as HDF5 pads one
            rows = buf.take(buf.rows)
            block = np.zeros((rows_per_chunk, *rows.shape[1:]), rows.dtype)
            block[: len(rows)] = rows
            self._write_chunks(dset, [block], len(rows))
        else:
            self._append(dset, buf.take(buf.rows))

    def _write_chunks(self, dset: h5py.Dataset, blocks: list[np.ndarray], rows: int) -> None:
        """Write whole chunks past HDF5's filter pipeline, each followed by its Fletcher-32
        checksum exactly as the filter stores it, and grow the dataset by ``rows`` rows (those
        of the last chunk may be padding):
        HDF5's own byte-at-a-time checksum and its extra copy per chunk cost more than writing
        the chunk (docs/performance.md). Each chunk is assembled in an aligned buffer, so that a
        :class:`DirectFile` writes it past the page cache."""
        rows_per_chunk = dset.chunks[0]
        start = dset.shape[0]
        dset.resize(start + rows, axis=0)
        zeros = (0,) * (dset.ndim - 1)
        # a small dataset's chunk (a statistic: a few KiB) is checksummed in microseconds, less
        # than handing it to a helper thread and back (~0.15 ms; ~300 a capture)
        small = sum(b.nbytes for b in blocks) < _INLINE_BYTES
        if small:
            outs = [np.empty(b.nbytes + 4, np.uint8) for b in blocks]
            stored_chunks = map(with_fletcher32, blocks, outs)
        else:
            outs = [self._pool.take(b.nbytes + 4) for b in blocks]
            # submits every chunk at once and yields them in order, as each is ready
            stored_chunks = self._checksums.map(with_fletcher32, blocks, outs)
        for k, stored in enumerate(stored_chunks):
            # a pooled buffer is lent: a DirectFile may still be writing it when HDF5 returns,
            # and it goes back to the pool with those writes, to be reused once the disk has it
            lent = not small and self._raw_file is not None
            with self._raw_file.lending(outs[k]) if lent else contextlib.nullcontext(()) as writes:
                dset.id.write_direct_chunk((start + k * rows_per_chunk, *zeros), stored)
            if not small:
                self._pool.give(outs[k], writes)

    # -- finishing --------------------------------------------------------------------------
    def close(
        self,
        extra_attrs: dict | None = None,
        *,
        complete: bool = True,
        before_commit: Callable[[], None] | None = None,
    ) -> Path:
        """Drain the queue, write remainders, mark complete, fsync and rename into place.

        ``complete=False`` finishes the file without marking it complete: a shard of a capture
        over several ranks, which becomes readable only through the file its ranks join.
        ``before_commit`` runs just before the rename; if it raises, the file is deleted."""
        self._queue.put(None)
        self._thread.join()
        try:
            self._raise_if_failed()
            with self._h5py_calls_back():
                self._finish_file(extra_attrs, complete)
            if before_commit is not None:
                before_commit()
            commit(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise ProbeError(
                f"Cannot finish writing {self.path}: {e.strerror or e} (disk full or not writable?). "
                "Nothing was left behind; free space or choose another --out."
            ) from e
        except BaseException:
            self.abort()
            raise
        return self.path

    def _finish_file(self, extra_attrs: dict | None, complete: bool) -> None:
        """Write the buffers' remainders and the file's attributes, then close it."""
        for buf in self._buffers.values():
            self._flush(buf, final=True)
        self._stop_helpers()
        # written once, here, with the counts known only at the end (non-finite samples): an
        # attribute write costs ~80 us, and a layer has a dataset per quantity
        for layer in self._layer_order:  # each has a dataset now, so its group
            self._groups[layer].attrs.update(self.layer_attrs.get(layer, {}))
        self._file.attrs["layer_order"] = json.dumps(self._layer_order)
        self._file.attrs["n_samples"] = self._n_samples
        for k, v in (extra_attrs or {}).items():
            self._file.attrs[k] = v
        # a file the reader would refuse is never marked complete; attributes read once
        attrs = read_attrs(self._file)
        check_schema(self._file, attrs)
        self._file.attrs["attrs_sha256"] = attrs_digest(attrs)
        self._file.attrs["complete"] = complete  # last: a file without it was interrupted
        self._file.flush()
        self._close_file()

    def _h5py_calls_back(self) -> contextlib.AbstractContextManager:
        """Automatic garbage collection paused while h5py may call back into a DirectFile (see
        :func:`~probe.store.direct.collector_paused`); an ordinary file needs no pause."""
        return collector_paused() if self._raw_file is not None else contextlib.nullcontext()

    def _close_file(self) -> None:
        """Close the HDF5 file, then the descriptors it wrote through (h5py leaves a file
        object open)."""
        try:
            self._file.close()
        finally:
            raw, self._raw_file = self._raw_file, None
            if raw is not None:
                self.direct_bytes = raw.direct_bytes
                raw.close()

    def abort(self) -> None:
        """Stop the writer and delete the temporary file; the final path is never created."""
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)  # also stops a thread interrupted while starting (not yet alive)
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(Exception):  # its error, if any, is not the one to report
            self._stop_helpers()
        if self._file is not None:
            with contextlib.suppress(Exception), self._h5py_calls_back():  # closed, broken?
                self._close_file()
        # An unwritable --out never had one: the error that brought us here is the one to report.
        with contextlib.suppress(OSError):
            self.tmp.unlink()
