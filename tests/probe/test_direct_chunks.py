"""Whole chunks are written past HDF5's filter pipeline with a Fletcher-32 checksum computed in
numpy: every stored byte, checksum included, must equal what HDF5's own filter stores, and a
damaged chunk must still be refused on read."""

import threading

import h5py
import numpy as np
import pytest
import torch

import probe
from probe.errors import ProbeError
from probe.store import writer as writer_module
from probe.store.checksum import fletcher32
from probe.store.writer import H5Writer, WriterOptions

LAYER = {"module": "b", "module_type": "X", "is_block": True, "residual": 1, "layer_index": 0,
         "call": 0, "output_shape": "[3]", "spatial_size": 1}  # fmt: skip


def _hdf5_checksum(tmp_path, data: np.ndarray) -> int:
    """The checksum HDF5's filter stores after a chunk holding ``data``."""
    with h5py.File(tmp_path / "ref.h5", "w") as f:
        f.create_dataset("d", data=data, chunks=data.shape, fletcher32=True)
    with h5py.File(tmp_path / "ref.h5", "r") as f:
        _, raw = f["d"].id.read_direct_chunk((0,) * data.ndim)
    return int.from_bytes(raw[-4:], "little")


def _patterns():
    rng = np.random.default_rng(0)
    yield "random 1 byte", rng.integers(0, 256, 1, dtype=np.uint8)
    yield "random odd", rng.integers(0, 256, 1001, dtype=np.uint8)
    yield "zeros", np.zeros(4096, np.uint8)
    yield "all ones (sums at multiples of 65535)", np.full(600_000, 255, np.uint8)
    yield "one 360-word block of ones", np.full(720, 255, np.uint8)
    yield "float32 normals, 4 MiB + 28 B", rng.standard_normal((1 << 20) + 7).astype(np.float32)
    # more words than one reduction block (512 × 32768): the block loop and its offsets
    yield "uint16, two blocks", rng.integers(0, 1 << 16, (1 << 24) + 2050, dtype=np.uint16)


@pytest.mark.parametrize("name,data", list(_patterns()), ids=[n for n, _ in _patterns()])
def test_fletcher32_equals_the_checksum_hdf5_stores(tmp_path, name, data):
    assert fletcher32(data) == _hdf5_checksum(tmp_path, data), name


def _write(path, batches, chunk_bytes):
    w = H5Writer(path, attrs={"config": "{}", "provenance": "{}"},
                 options=WriterOptions(chunk_bytes=chunk_bytes))  # fmt: skip
    w.layer_attrs["b"] = LAYER
    start = 0
    for rows in batches:
        w.submit({"b": rows}, torch.arange(start, start + len(next(iter(rows.values())))))
        start += len(next(iter(rows.values())))
    w.close()


def test_direct_chunks_are_byte_identical_to_hdf5s_filtered_chunks(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sizes = [7, 5, 13, 1, 9]  # batches straddle chunk boundaries; the last chunk is partial
    batches = [
        {
            "f32": torch.randn(n, 3, 4, generator=gen),
            "f16": torch.randn(n, 5, generator=gen).half(),
            "bf16": torch.randn(n, 6, generator=gen).bfloat16(),
            "i64": torch.randint(-(2**40), 2**40, (n, 2), generator=gen),
        }
        for n in sizes
    ]
    _write(tmp_path / "w.h5", batches, chunk_bytes=96)  # 2, 9, 8 and 6 rows per chunk
    with h5py.File(tmp_path / "w.h5", "r") as f, h5py.File(tmp_path / "r.h5", "w") as ref:
        for q in batches[0]:
            d = f[f"layers/b/{q}"]
            rows = torch.cat([b[q] for b in batches])
            expect = rows.view(torch.int16).numpy().view(np.uint16) if q == "bf16" else rows.numpy()
            np.testing.assert_array_equal(d[:], expect)  # HDF5 checks every checksum here
            r = ref.create_dataset(q, data=expect, chunks=d.chunks, fletcher32=True)
            n_chunks = -(-len(expect) // d.chunks[0])
            assert n_chunks > 2, q
            for k in range(n_chunks):
                offset = (k * d.chunks[0],) + (0,) * (d.ndim - 1)
                assert d.id.read_direct_chunk(offset) == r.id.read_direct_chunk(offset), (q, k)


def test_a_flipped_bit_in_a_direct_chunk_is_refused(tmp_path):
    torch.manual_seed(0)
    model = probe.zoo.create("resnet8", in_channels=1, width=16)
    path = tmp_path / "c.h5"
    x = torch.randn(160, 1, 32, 32)  # 32 KiB of fp16 per sample of stage 1: 64 rows per chunk
    probe.capture(model, x.split(40), probes=["activations"], out=path).close()
    key = "layers/stages.0.0/output"
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(1)  # the second chunk: written whole, past the filter
        assert f[key].chunks[0] == 64 and info.filter_mask == 0
        offset = info.byte_offset + 1000
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))
    with probe.open(path) as cap, pytest.raises(ProbeError, match="stages.0.0/output is damaged"):
        cap.read("stages.0.0", "output")


@pytest.mark.parametrize(
    "second,match",
    [
        (torch.zeros(4, 2, 3), r"rows of shape \[2, 3\], earlier batches \[3, 2\]"),  # same bytes
        (torch.zeros(4, 3, 2, dtype=torch.float64), "float64 rows, earlier batches float32"),
        (torch.zeros(4, 3, 2).bfloat16(), "bfloat16 rows, earlier batches float32"),
    ],
)
def test_rows_unlike_earlier_batches_are_refused_not_reinterpreted(tmp_path, second, match):
    with pytest.raises(ProbeError, match=match):
        _write(tmp_path / "w.h5", [{"q": torch.zeros(4, 3, 2)}, {"q": second}], chunk_bytes=24)
    assert not (tmp_path / "w.h5").exists()


def test_rows_of_a_narrower_float_are_stored_exactly(tmp_path):
    second = torch.randn(4, 3).half()
    _write(tmp_path / "w.h5", [{"q": torch.ones(4, 3)}, {"q": second}], chunk_bytes=24)
    with h5py.File(tmp_path / "w.h5", "r") as f:
        np.testing.assert_array_equal(f["layers/b/q"][4:], second.float().numpy())


def _record_syncs(monkeypatch, data_sync) -> list[tuple[str, str]]:
    """Patch the writer's fdatasync (``data_sync``) and fsync; return the log of (kind, thread)."""
    calls: list[tuple[str, str]] = []

    def fdatasync(fd):
        calls.append(("data", threading.current_thread().name))
        data_sync()

    monkeypatch.setattr(writer_module, "_SYNC_BYTES", 1)
    monkeypatch.setattr(writer_module.os, "fdatasync", fdatasync, raising=False)
    monkeypatch.setattr(
        writer_module.os,
        "fsync",
        lambda fd: calls.append(("full", threading.current_thread().name)),
    )
    return calls


def test_written_data_reaches_the_disk_while_the_capture_runs(tmp_path, monkeypatch):
    calls = _record_syncs(monkeypatch, lambda: None)
    _write(tmp_path / "w.h5", [{"q": torch.ones(4, 3)}] * 3, chunk_bytes=24)
    # how many background flushes run depends on thread timing; that one ran, off the writer's
    # thread and before the fsync of the finished file, does not
    assert ("data", "resprobe-h5-sync_0") in calls[:-1]
    assert calls[-1][0] == "full"


def test_a_flush_still_running_covers_the_batches_written_meanwhile(tmp_path, monkeypatch):
    # a slow disk: the first flush lasts until the writer finishes; batches 2 and 3 must neither
    # wait for it nor queue flushes of their own behind it
    disk_done = threading.Event()
    calls = _record_syncs(monkeypatch, lambda: disk_done.wait(10))
    stop_helpers = H5Writer._stop_helpers

    def finish(self):
        disk_done.set()
        stop_helpers(self)

    monkeypatch.setattr(H5Writer, "_stop_helpers", finish)
    _write(tmp_path / "w.h5", [{"q": torch.ones(4, 3)}] * 3, chunk_bytes=24)
    assert [kind for kind, _ in calls] == ["data", "full"]
    with h5py.File(tmp_path / "w.h5", "r") as f:
        np.testing.assert_array_equal(f["layers/b/q"][:], np.ones((12, 3), np.float32))


def test_a_capture_of_unknown_length_has_no_chunk_larger_than_its_data(tmp_path):
    torch.manual_seed(0)
    model = probe.zoo.create("resnet8", in_channels=1, width=4)
    path = tmp_path / "c.h5"
    data = [torch.randn(16, 1, 8, 8) for _ in range(3)]  # a list: its length is not known ahead
    probe.capture(model, data, probes=["residual", "channel"], out=path).close()
    with h5py.File(path, "r") as f:
        sets = []
        f.visititems(lambda k, o: sets.append(o) if isinstance(o, h5py.Dataset) else None)
        assert len(sets) > 20
        for d in sets:
            assert d.chunks[0] <= max(d.shape[0], 8192 if d.ndim == 1 else 1), d.name
        data_bytes = sum(d.nbytes for d in sets)
        stored = sum(d.id.get_storage_size() for d in sets)
    # every chunk holds data (plus its 4-byte checksum): before, each small dataset was
    # one 2 MiB chunk, and this capture's file took ~70 MB
    assert stored <= data_bytes + 4 * len(sets) + 2 * 8192 * 8, (stored, data_bytes)
    assert path.stat().st_size < data_bytes + (1 << 20)


@pytest.mark.parametrize("sizes", [[0], [0, 4, 0, 3], [4, 0]])
def test_batches_without_rows_are_stored_as_what_they_hold(tmp_path, sizes):
    # a probe may return fewer rows than the batch has samples (a sample cap), even none
    w = H5Writer(tmp_path / "w.h5", attrs={"config": "{}", "provenance": "{}"},
                 options=WriterOptions(chunk_bytes=24))  # fmt: skip
    w.layer_attrs["b"] = LAYER
    rows = [torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) for n in sizes]
    for i, r in enumerate(rows):
        w.submit({"b": {"q": r}}, torch.arange(4 * i, 4 * i + 4))
    w.close()
    with h5py.File(tmp_path / "w.h5", "r") as f:
        np.testing.assert_array_equal(f["layers/b/q"][:], torch.cat(rows).numpy())
