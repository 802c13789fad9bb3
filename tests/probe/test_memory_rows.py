"""In-memory captures: rows written into arrays of the capture's size equal rows gathered and
joined (numpy), whatever the dtype, rank, batch sizes or an overflow; mismatches are errors."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import probe
from probe.errors import ProbeError
from probe.store import memory
from probe.store.memory import MemoryRows


def _batches(rng, sizes, feat, dtype):
    return [torch.from_numpy(rng.standard_normal((n, *feat))).to(dtype) for n in sizes]


@pytest.fixture(params=[False, True], ids=["cpu", "accelerator-path"])
def deferred(request, monkeypatch):
    """Also run the accelerator's path (copies through to_host, stored at end_batch) on CPU
    tensors: all of it but the wait for a CUDA event."""
    if request.param:
        monkeypatch.setattr(memory, "_deferred", lambda t: True)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("feat", [(), (3,), (2, 3, 4)])
@pytest.mark.parametrize("capacity", [None, 20, 9])  # unknown, room to spare, overflow at batch 3
def test_rows_equal_the_batches_joined_by_numpy(dtype, feat, capacity, deferred):
    rng = np.random.default_rng(0)
    batches = _batches(rng, [4, 4, 5, 1], feat, dtype)
    rows = MemoryRows(capacity)
    for b in batches:
        rows.add("layer", "q", b)
        rows.add("layer", "other", -b)  # two quantities in flight at once
        rows.end_batch()
    np.testing.assert_array_equal(rows.arrays()["layer"]["other"], -rows.arrays()["layer"]["q"])
    got = rows.arrays()["layer"]["q"]
    want = np.concatenate(
        [b.float().numpy() if dtype == torch.bfloat16 else b.numpy() for b in batches]
    )
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_a_quantity_kept_for_fewer_samples_than_the_capacity_has_just_its_rows():
    rows = MemoryRows(capacity=1000)
    rows.add("a", "q", torch.arange(6.0).reshape(3, 2))
    got = rows.arrays()["a"]["q"]
    assert got.tolist() == [[0, 1], [2, 3], [4, 5]]
    # its own small array, not a view that keeps the 1000-row reservation alive
    assert not np.shares_memory(got, rows._columns["a"]["q"].array.numpy())


@pytest.mark.parametrize("capacity", [None, 4, 3])  # gathered, preallocated, overflowing
def test_rows_do_not_alias_the_batches(capacity, deferred):
    rows, b = MemoryRows(capacity), torch.zeros(2, 3)
    rows.add("a", "q", b)
    rows.end_batch()
    rows.add("a", "q", b)
    rows.end_batch()
    b += 1  # a probe's tensor reused or changed in place later
    assert rows.arrays()["a"]["q"].sum() == 0


def test_a_safe_cast_is_exact_and_an_unsafe_one_is_refused():
    rows = MemoryRows(capacity=8)
    rows.add("a", "q", torch.ones(2, dtype=torch.float32))
    rows.add("a", "q", torch.tensor([0.1, 3.0], dtype=torch.float16))  # exact in float32
    assert rows.arrays()["a"]["q"].tolist() == [1.0, 1.0, float(np.float16(0.1)), 3.0]
    with pytest.raises(ProbeError, match="a/q: this batch gave torch.float64 rows"):
        rows.add("a", "q", torch.ones(2, dtype=torch.float64))


def test_rows_of_another_shape_are_refused_with_the_key():
    rows = MemoryRows(capacity=8)
    rows.add("block", "output", torch.ones(2, 3))
    with pytest.raises(ProbeError, match=r"block/output: this batch gave rows of shape \[4\]"):
        rows.add("block", "output", torch.ones(2, 4))


def test_a_huge_capacity_is_gathered_instead_of_reserved():
    rows = MemoryRows(capacity=1 << 40)  # ~4 PB of float32 rows: never reserved
    rows.add("a", "q", torch.ones(3, 2))
    assert rows._columns["a"]["q"].array is None
    assert rows.arrays()["a"]["q"].shape == (3, 2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_in_memory_capture_over_a_dataloader_equals_the_hdf5_capture(tmp_path, shuffle):
    torch.manual_seed(0)
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    ds = TensorDataset(torch.randn(50, 1, 8, 8), torch.randint(0, 10, (50,)))
    probes = [probe.ResidualNorms(), probe.Activations(dtype="bf16", max_samples=7)]

    def loader():
        return DataLoader(
            ds, batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(1)
        )

    mem = probe.capture(model, loader(), probes=probes)
    h5 = probe.capture(model, loader(), probes=probes, out=tmp_path / "c.h5")
    assert mem.layers == h5.layers
    np.testing.assert_array_equal(mem.sample_index(), h5.sample_index())
    for layer in mem.layers:
        assert mem.quantities(layer) == h5.quantities(layer)
        for q in mem.quantities(layer):
            np.testing.assert_array_equal(mem.read(layer, q), h5.read(layer, q), err_msg=q)
    assert mem.read(mem.layers[0], "output").shape[0] == 7


def test_the_sample_bound_of_a_capture():
    from probe.capture import _sample_bound

    ds = TensorDataset(torch.zeros(10, 1))
    assert _sample_bound(DataLoader(ds, batch_size=3), None) == 10
    assert _sample_bound(DataLoader(ds, batch_size=3), 4) == 4
    with_replacement = DataLoader(
        ds, sampler=torch.utils.data.RandomSampler(ds, replacement=True, num_samples=30)
    )
    assert _sample_bound(with_replacement, None) is None  # may repeat samples: unknown
    assert _sample_bound([(torch.zeros(2, 1), None), torch.zeros(3, 1)], None) == 5
    assert _sample_bound([(torch.zeros(2, 1), None)], 1) == 1
    assert _sample_bound([{"x": torch.zeros(2, 1)}], None) is None  # not a batch it reads
    assert _sample_bound(iter([(torch.zeros(2, 1), None)]), None) is None
