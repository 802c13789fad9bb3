"""Chunk bytes written to the disk past the kernel's page cache (``O_DIRECT``).

A buffered write copies every byte into the page cache before the disk sees it. For a dump of
every ResNet-56 block output (528 MB a capture of 8 batches) that copy cost the process ~115 ms
of CPU, where a direct write of the same bytes cost ~23 ms and finished sooner (175-196 ms
against 268 ms wall, 2-core machine, ext4; docs/performance.md). On a machine whose cores all
run the model, the copy is time taken from the model.

HDF5 still decides where every chunk lives and writes every byte; the file is opened through
h5py's ``fileobj`` driver with a :class:`DirectFile`, and asks HDF5 to place every object of at
least :data:`ALIGN_THRESHOLD` bytes (whole chunks) at a multiple of :data:`ALIGN`. A chunk
handed to ``write_direct_chunk`` from an aligned buffer (:func:`aligned_empty`) reaches
:meth:`DirectFile.write` as that very memory, at an aligned address. Its block-aligned head goes
through an ``O_DIRECT`` descriptor. Where the writer lends that memory
(:meth:`DirectFile.lending`: it keeps the buffer untouched until the write is done) the write
runs on a thread of its own, so that the writer assembles and checksums the next chunks while
the disk takes this one; any other memory (HDF5's own buffers, which it frees or refills as soon
as a write returns) is written before :meth:`~DirectFile.write` returns. The rest (the checksum
and what does not fill a block, under :data:`ALIGN` bytes) goes through an ordinary descriptor,
as does all of HDF5's metadata: HDF5 may place metadata in the gap after a chunk's end, on the page that holds
the chunk's tail, so no direct write covers a page that an ordinary write touches. A file system
that refuses ``O_DIRECT`` (tmpfs, some network file systems) gets every byte through the
ordinary descriptor.

Example:
    >>> import tempfile
    >>> path = tempfile.mkdtemp() + "/x.bin"
    >>> f = DirectFile(path)
    >>> data = aligned_empty(3 * ALIGN + 4)
    >>> data[:] = 7
    >>> f.write(data)
    12292
    >>> f.close()
    >>> open(path, "rb").read() == bytes([7]) * (3 * ALIGN + 4)
    True
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import io
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

__all__ = [
    "ALIGN",
    "ALIGN_THRESHOLD",
    "BufferPool",
    "DirectFile",
    "aligned_empty",
    "collector_paused",
    "supported",
]

ALIGN = 4096  # the largest logical block size O_DIRECT asks of offsets, lengths and addresses
ALIGN_THRESHOLD = 64 << 10  # objects this large are aligned; smaller ones keep HDF5's packing
_DEPTH = 8  # buffers of one size before a new chunk waits for the disk to take an old one


_collector_lock = threading.Lock()
_collector = {"depth": 0, "was_enabled": False}


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection, in any thread, while h5py works through a DirectFile.

    h5py holds its global lock while HDF5 calls a DirectFile back; a write may start one of the
    DirectFile's I/O threads and a flush waits for them. A collection run in such a thread (any
    allocation may start one) that frees an h5py object of some earlier cyclic garbage waits for
    that lock: the thread waits for h5py's holder, which waits for the thread, for ever. Seen:
    a new I/O thread collecting a ``GroupID`` as it started, the capture and every later h5py
    call of the process hung. Pauses nest and may overlap across writers; the last restores
    the collector's state as the first found it.

    Example:
        >>> import gc
        >>> with collector_paused():
        ...     gc.isenabled()
        False
    """
    with _collector_lock:
        if _collector["depth"] == 0:
            _collector["was_enabled"] = gc.isenabled()
            gc.disable()
        _collector["depth"] += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector["depth"] -= 1
            if _collector["depth"] == 0 and _collector["was_enabled"]:
                gc.enable()


def _io_threads() -> int:
    """Direct writes in flight at once: two keep a fast disk busy while one write completes
    (one direct write waits for the device); one on a 2-core machine, whose cores run the model."""
    return 1 if (os.cpu_count() or 1) <= 2 else 2


def supported() -> bool:
    """Whether this platform can write at an offset (``os.pwrite``); ``O_DIRECT`` is optional."""
    return hasattr(os, "pwrite")


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised ``uint8`` array of ``nbytes`` whose first byte sits at a multiple of
    :data:`ALIGN` and whose memory extends to the next multiple (``O_DIRECT`` reads whole
    blocks from the caller's memory)."""
    capacity = -(-nbytes // ALIGN) * ALIGN
    raw = np.empty(capacity + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


class BufferPool:
    """Aligned buffers kept for reuse (a fresh 2 MiB array page-faulted in 512 pages each time),
    each given back with the writes still reading it, if any: a buffer is handed out again only
    once they are done. Used by one thread (the writer's), so it takes no lock.

    Example:
        >>> pool = BufferPool()
        >>> a = pool.take(10_000)
        >>> pool.give(a); pool.take(10_000) is a
        True
    """

    def __init__(self, depth: int = _DEPTH) -> None:
        self._depth = depth
        self._free: dict[int, collections.deque] = {}
        self._count: collections.Counter = collections.Counter()

    def take(self, nbytes: int) -> np.ndarray:
        free = self._free.setdefault(nbytes, collections.deque())
        # the oldest buffer whose write is done: with two writing threads, writes may finish
        # out of order, and a younger buffer may be free while the oldest is still read
        for i, (buf, busy) in enumerate(free):
            if all(w.done() for w in busy):  # a failed write is DirectFile's to report
                del free[i]
                return buf
        if free and self._count[nbytes] >= self._depth:
            buf, busy = free.popleft()
            for w in busy:
                w.exception()  # waits for the oldest buffer's writes (without raising an error)
            return buf
        self._count[nbytes] += 1
        return aligned_empty(nbytes)

    def give(self, buf: np.ndarray, busy: Sequence[Future] = ()) -> None:
        """Return ``buf``; ``busy``: the writes still reading it."""
        self._free.setdefault(len(buf), collections.deque()).append((buf, tuple(busy)))


class DirectFile(io.RawIOBase):
    """A new file for h5py's ``fileobj`` driver that writes block-aligned runs of at least
    :data:`ALIGN` bytes from aligned memory with ``O_DIRECT`` where the file system allows it,
    and everything else (HDF5's metadata, a chunk's unaligned tail) through an ordinary
    descriptor. ``direct_bytes`` counts what went past the page cache.

    Direct writes of memory lent with :meth:`lending` run on threads of their own
    (:func:`_io_threads`); the caller keeps that memory untouched until they are done
    (:class:`BufferPool` sees to it). Each writes bytes nothing else writes, so their order does
    not matter. Every other write is done when :meth:`write` returns: the memory h5py hands over
    is HDF5's, which frees or refills it at once (a chunk of ``/labels`` written from a buffer
    that happened to be aligned was read back damaged). Reading, truncating, flushing and closing
    wait for them all, and raise the first error one of them met. Created empty (an existing
    file is truncated), readable and writable.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.name = os.fspath(path)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._direct_fd: int | None = None
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            # EINVAL: the file system has no direct I/O (tmpfs); the ordinary path serves
            with contextlib.suppress(OSError):
                self._direct_fd = os.open(path, os.O_WRONLY | flag)
        self._use_direct = self._direct_fd is not None  # off for good after a refused write
        self._io = ThreadPoolExecutor(_io_threads(), "resprobe-h5-direct") if self.direct else None
        self._lock = threading.Lock()  # direct_bytes, counted on the writing threads
        self._pending: collections.deque[Future] = collections.deque()
        self._lent: tuple[int, int, list[Future]] | None = None  # start, end, their writes
        self._pos = 0
        self.direct_bytes = 0

    @property
    def direct(self) -> bool:
        """Whether aligned runs still go past the page cache."""
        return self._use_direct

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            self.drain()
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos}.get(whence)
        self._pos = (os.fstat(self._fd).st_size if base is None else base) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        self.drain()
        view = memoryview(buffer).cast("B")
        data = os.pread(self._fd, len(view), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    @contextlib.contextmanager
    def lending(self, buffer: np.ndarray) -> Iterator[list[Future]]:
        """Within the block, writes of ``buffer``'s memory may still run when :meth:`write`
        returns; the list yielded collects them, and the caller keeps ``buffer`` untouched until
        every one is done.

        Example:
            >>> import tempfile
            >>> f = DirectFile(tempfile.mkdtemp() + "/x.bin")
            >>> chunk = aligned_empty(ALIGN)
            >>> with f.lending(chunk) as writes:
            ...     _ = f.write(chunk)
            >>> f.close()
            >>> all(w.done() for w in writes)
            True
        """
        start = buffer.ctypes.data
        writes: list[Future] = []
        self._lent = (start, start + buffer.nbytes, writes)
        try:
            yield writes
        finally:
            self._lent = None

    def write(self, buffer) -> int:
        raw = np.frombuffer(buffer, np.uint8)
        head = 0
        if self._use_direct and self._pos % ALIGN == 0 and raw.ctypes.data % ALIGN == 0:
            head = len(raw) - len(raw) % ALIGN
        if head:
            self._raise_failed()
            lent = self._lent
            address = raw.ctypes.data
            if lent is not None and lent[0] <= address and address + head <= lent[1]:
                write = self._io.submit(self._write_head, raw[:head], self._pos)
                self._pending.append(write)
                lent[2].append(write)
            else:  # memory the caller may change as soon as this returns: written now
                self._write_head(raw[:head], self._pos)
        if head < len(raw):
            _write_all(self._fd, raw[head:], self._pos + head)
        self._pos += len(raw)
        return len(raw)

    def _write_head(self, raw: np.ndarray, offset: int) -> None:
        if self._use_direct:
            try:
                _write_all(self._direct_fd, raw, offset)
                with self._lock:
                    self.direct_bytes += len(raw)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:  # ENOSPC, EIO: the writer's error to report
                    raise
                # a device asking for more alignment than ALIGN: the ordinary path from now on
                # (the descriptor stays open until close: another thread may be writing to it)
                self._use_direct = False
        _write_all(self._fd, raw, offset)

    def _raise_failed(self) -> None:
        """Forget finished writes; raise the error of the first that failed."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def drain(self) -> None:
        """Wait for every direct write; raise the first error one of them met."""
        while self._pending:
            self._pending.popleft().result()

    def truncate(self, size: int | None = None) -> int:
        self.drain()
        size = self._pos if size is None else size
        os.ftruncate(self._fd, size)
        return size

    def flush(self) -> None:
        self.drain()

    def close(self) -> None:
        if not self.closed:
            try:
                self.drain()
            finally:
                if self._io is not None:
                    self._io.shutdown(wait=True)
                for fd in (self._direct_fd, self._fd):
                    if fd is not None:
                        os.close(fd)
                self._direct_fd = None
        super().close()


def _write_all(fd: int, raw: np.ndarray, offset: int) -> None:
    """pwrite until every byte is written (a write may be short, e.g. interrupted by a signal)."""
    view = memoryview(raw)
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "the disk accepted no bytes")
        view, offset = view[n:], offset + n
