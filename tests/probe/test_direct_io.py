"""Chunks written past the page cache (probe.store.direct): every byte lands where HDF5 put the
chunk, a buffer is never reused while the disk still reads it, a file system without O_DIRECT
gets the same bytes the ordinary way, and a failed direct write fails the capture cleanly."""

import errno
import gc
import os
import threading
import time
from concurrent.futures import Future

import h5py
import numpy as np
import pytest
import torch

import probe
from probe.errors import ProbeError
from probe.store import direct
from probe.store.checksum import fletcher32
from probe.store.direct import ALIGN, BufferPool, DirectFile, aligned_empty
from probe.store.writer import H5Writer

fcntl = pytest.importorskip("fcntl")  # POSIX: O_DIRECT descriptors are told apart by their flags

LAYER = {"module": "b", "module_type": "X", "is_block": True, "residual": 1, "layer_index": 0,
         "call": 0, "output_shape": "[16, 32, 32]", "spatial_size": 1024}  # fmt: skip


def _has_direct_io(tmp_path) -> bool:
    f = DirectFile(tmp_path / "probe-direct")
    try:
        return f.direct
    finally:
        f.close()


@pytest.fixture
def no_direct_io(monkeypatch):
    """A file system that refuses O_DIRECT, as tmpfs does (EINVAL at open)."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)


@pytest.fixture(params=[1, 2], ids=["one writing thread", "two writing threads"])
def on_direct_writes(request, tmp_path, monkeypatch):
    """Install ``action(fd, view, offset, real_pwrite)`` for writes through an O_DIRECT
    descriptor (told apart by its flags); other writes stay real. Runs with one and with two
    direct-writing threads (two on machines of more than 2 cores). Skips where ``tmp_path``'s
    file system has no O_DIRECT."""
    if not _has_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    monkeypatch.setattr(direct, "_io_threads", lambda: request.param)
    real = os.pwrite

    def install(action):
        def pwrite(fd, view, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                return action(fd, view, offset, real)
            return real(fd, view, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)

    return install


def test_aligned_runs_go_past_the_page_cache_and_the_rest_does_not(tmp_path):
    if not _has_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    f = DirectFile(tmp_path / "x.bin")
    a = aligned_empty(2 * ALIGN + 5)
    a[:] = np.arange(len(a)) % 251
    f.write(a)  # at 0, aligned: two blocks direct, 5 bytes ordinary
    b = np.frombuffer(os.urandom(100), np.uint8)
    f.write(b)  # at an unaligned offset: all ordinary
    f.seek(4 * ALIGN)
    f.write(a[1:])  # memory not aligned: all ordinary
    f.close()
    assert f.direct_bytes == 2 * ALIGN
    got = np.fromfile(tmp_path / "x.bin", np.uint8)
    np.testing.assert_array_equal(got[: len(a)], a)
    np.testing.assert_array_equal(got[len(a) : len(a) + 100], b)
    np.testing.assert_array_equal(got[4 * ALIGN :], a[1:])
    assert not got[len(a) + 100 : 4 * ALIGN].any()  # the gap: a hole, never written


def _capture(path, batches):
    w = H5Writer(path, attrs={"config": "{}", "provenance": "{}"})
    w.layer_attrs["b"] = LAYER
    start = 0
    for rows in batches:
        w.submit({"b": {"output": rows}}, torch.arange(start, start + len(rows)))
        start += len(rows)
    w.close()
    return w


def _batches(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 16, 32, 32, generator=gen) for n in sizes]  # 64 KiB a row


def _check_chunks(path, rows):
    """Values equal, and every stored chunk (2 MiB, 32 rows; the last one partial, padded with
    zeros) is its rows' bytes followed by their Fletcher-32 checksum, at an aligned address."""
    with h5py.File(path, "r") as f:
        d = f["layers/b/output"]
        np.testing.assert_array_equal(d[:], rows)  # HDF5 verifies every checksum here
        per = d.chunks[0]
        assert per == 32
        for k in range(-(-len(rows) // per)):
            info = d.id.get_chunk_info_by_coord((k * per, 0, 0, 0))
            _, stored = d.id.read_direct_chunk((k * per, 0, 0, 0))
            block = np.zeros((per, *rows.shape[1:]), rows.dtype)
            block[: len(rows[k * per : (k + 1) * per])] = rows[k * per : (k + 1) * per]
            assert stored[:-4] == block.tobytes()
            assert int.from_bytes(stored[-4:], "little") == fletcher32(block)
            assert info.byte_offset % ALIGN == 0


@pytest.mark.parametrize("sizes", [[64, 64, 64], [40, 17, 70, 3]], ids=["whole", "partial"])
def test_a_capture_written_past_the_page_cache_reads_back_exactly(tmp_path, sizes):
    batches = _batches(sizes)
    w = _capture(tmp_path / "c.h5", batches)
    _check_chunks(tmp_path / "c.h5", torch.cat(batches).numpy())
    if _has_direct_io(tmp_path):
        assert w.direct_bytes >= (sum(sizes) // 32) * (2 << 20)


def test_without_o_direct_the_same_file_is_written_the_ordinary_way(tmp_path, no_direct_io):
    batches = _batches([64, 40])
    w = _capture(tmp_path / "c.h5", batches)
    assert w.direct_bytes == 0
    _check_chunks(tmp_path / "c.h5", torch.cat(batches).numpy())


def test_a_buffer_is_not_reused_while_the_disk_still_reads_it(tmp_path, on_direct_writes):
    """Slow direct writes: the writer runs ahead, and a chunk buffer it took back too early would
    be refilled with later rows before the disk has read it."""

    def slow(fd, view, offset, real):
        time.sleep(0.02)
        return real(fd, view, offset)

    on_direct_writes(slow)
    batches = _batches([64] * 6, seed=3)
    _capture(tmp_path / "c.h5", batches)
    _check_chunks(tmp_path / "c.h5", torch.cat(batches).numpy())


def test_a_device_refusing_direct_writes_gets_them_the_ordinary_way(tmp_path, on_direct_writes):
    def refuse(fd, view, offset, real):
        raise OSError(errno.EINVAL, "Invalid argument")

    on_direct_writes(refuse)
    batches = _batches([64, 64])
    w = _capture(tmp_path / "c.h5", batches)
    assert w.direct_bytes == 0
    _check_chunks(tmp_path / "c.h5", torch.cat(batches).numpy())


def test_a_failed_direct_write_fails_the_capture_and_leaves_no_file(tmp_path, on_direct_writes):
    def full(fd, view, offset, real):
        raise OSError(errno.ENOSPC, "No space left on device")

    on_direct_writes(full)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1))  # 64 KiB an output row
    data = [(torch.randn(64, 3, 32, 32), torch.zeros(64, dtype=torch.long))] * 4
    with pytest.raises(ProbeError, match="No space left on device"):
        probe.capture(net, data, layers=["0"], probes=[probe.Activations(dtype="fp32")],
                      out=tmp_path / "c.h5")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe-direct"]  # nothing else left


def test_the_pool_hands_out_a_busy_buffer_only_once_its_write_is_done():
    pool = BufferPool(depth=2)
    a = pool.take(10_000)
    busy = Future()
    pool.give(a, [busy])
    b = pool.take(10_000)
    assert b is not a  # a is still being written and the pool may grow: a new buffer
    pool.give(b)
    busy.set_result(None)
    assert pool.take(10_000) is a  # oldest first, now that its write is done
    assert pool.take(10_000) is b
    assert a.ctypes.data % ALIGN == 0 and b.ctypes.data % ALIGN == 0


def test_a_buffer_whose_write_finished_first_is_reused_first():
    pool = BufferPool(depth=4)
    a, b = pool.take(10_000), pool.take(10_000)
    slow, fast = Future(), Future()
    pool.give(a, [slow])
    pool.give(b, [fast])
    fast.set_result(None)  # two writing threads: the younger write finished first
    assert pool.take(10_000) is b  # no new buffer while one is free
    assert pool.take(10_000) is not a  # a is still being written: the pool grows instead
    slow.set_result(None)
    assert pool.take(10_000) is a


def test_a_full_pool_waits_for_the_oldest_write():
    pool = BufferPool(depth=1)
    a = pool.take(10_000)
    busy = Future()
    pool.give(a, [busy])
    finished = []

    def finish():
        finished.append(True)
        busy.set_result(None)

    threading.Timer(0.05, finish).start()
    assert pool.take(10_000) is a  # depth reached: waits for the disk rather than growing
    assert finished  # returned only after the write was done, however the threads were timed


def test_a_buffer_with_two_writes_is_reused_once_both_are_done():
    pool = BufferPool(depth=4)
    a = pool.take(10_000)
    first, second = Future(), Future()
    pool.give(a, [first, second])
    first.set_result(None)
    assert pool.take(10_000) is not a  # its second write is still reading it
    second.set_result(None)
    assert pool.take(10_000) is a


def _slow(fd, view, offset, real):
    time.sleep(0.05)
    return real(fd, view, offset)


def test_memory_not_lent_is_on_the_disk_when_write_returns(tmp_path, on_direct_writes):
    """h5py hands DirectFile HDF5's own buffers, which HDF5 frees or refills as soon as the write
    returns: an aligned one (by chance) must not be read by a write still running after that."""
    on_direct_writes(_slow)
    f = DirectFile(tmp_path / "x.bin")
    a = aligned_empty(2 * ALIGN)
    a[:] = 1
    f.write(a)
    a[:] = 2  # what HDF5 would do with its buffer next
    f.close()
    assert f.direct_bytes == 2 * ALIGN
    assert (np.fromfile(tmp_path / "x.bin", np.uint8) == 1).all()


def test_lent_memory_is_written_on_a_thread_while_the_writer_goes_on(tmp_path, on_direct_writes):
    release = threading.Event()

    def held(fd, view, offset, real):
        assert release.wait(5)
        return real(fd, view, offset)

    on_direct_writes(held)
    f = DirectFile(tmp_path / "x.bin")
    a = aligned_empty(2 * ALIGN + 3)
    a[:] = 5
    with f.lending(a) as writes:
        f.write(a)  # returns with the aligned head still to be written
    assert len(writes) == 1 and not writes[0].done()
    release.set()
    f.close()
    assert writes[0].done() and f.direct_bytes == 2 * ALIGN
    assert (np.fromfile(tmp_path / "x.bin", np.uint8) == 5).all()


def test_hdf5s_own_buffers_are_written_before_hdf5_refills_them(
    tmp_path, on_direct_writes, monkeypatch
):
    """Every buffer HDF5 hands over (labels, sample index, metadata) made aligned, as malloc
    sometimes makes them, and scribbled on as soon as the write returns: the file still reads
    back exactly, every checksum verified. A /labels chunk read back damaged once this way."""
    on_direct_writes(_slow)
    real_write = DirectFile.write

    def write(self, buffer):
        mem = np.frombuffer(buffer, np.uint8)
        lent = self._lent
        if lent is not None and lent[0] <= mem.ctypes.data < lent[1]:
            return real_write(self, buffer)  # the writer's chunks, kept until written
        aligned = aligned_empty(len(mem))
        aligned[:] = mem
        n = real_write(self, aligned)
        aligned[:] = 0xFF
        return n

    monkeypatch.setattr(DirectFile, "write", write)
    batches = _batches([64, 40, 64], seed=5)
    _capture(tmp_path / "c.h5", batches)
    _check_chunks(tmp_path / "c.h5", torch.cat(batches).numpy())
    with h5py.File(tmp_path / "c.h5", "r") as f:
        np.testing.assert_array_equal(f["sample_index"][:], np.arange(168))


def test_offset_writes_need_pwrite():
    assert direct.supported() == hasattr(os, "pwrite")


def test_h5py_calls_back_into_a_direct_file_with_the_collector_paused(tmp_path, monkeypatch):
    """h5py holds its global lock while HDF5 calls a DirectFile back, and a DirectFile starts
    its I/O threads there and waits for them on a flush. An automatic collection that ran as
    such a thread started, freeing an h5py object of earlier cyclic garbage, waited for that
    lock for ever (seen in a test run: a new I/O thread in ``gc_collect_main`` freeing a
    ``GroupID``, the writer in ``Thread.start`` inside ``write_direct_chunk``). Every callback
    now runs with automatic collection paused, for every thread."""
    if not _has_direct_io(tmp_path):
        pytest.skip("the temporary folder's file system has no O_DIRECT")
    seen = {"write": [], "flush": []}
    for name in seen:
        original = getattr(DirectFile, name)

        def spy(self, *args, _original=original, _calls=seen[name]):
            _calls.append(gc.isenabled())
            return _original(self, *args)

        monkeypatch.setattr(DirectFile, name, spy)
    assert gc.isenabled()
    w = _capture(tmp_path / "c.h5", _batches([64, 40]))
    assert w.direct_bytes > 0 and seen["write"] and seen["flush"]
    assert not any(seen["write"]) and not any(seen["flush"]), seen
    assert gc.isenabled()  # restored


def test_collector_pauses_nest_and_restore_what_they_found():
    assert gc.isenabled()
    with direct.collector_paused():
        with direct.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with direct.collector_paused():
            pass
        assert not gc.isenabled()  # a collector the caller turned off stays off
    finally:
        gc.enable()
