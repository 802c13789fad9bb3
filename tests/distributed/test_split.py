"""Which samples each rank takes: contiguous, disjoint, complete, never padded; the data of one
rank's share for every kind of data that can be split; per-rank parts of a training batch."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from probe.data import DeviceLoader
from probe.distributed.split import (
    batch_edges,
    sample_at,
    shard_data,
    split_samples,
    total_samples,
)
from probe.errors import ProbeError


@pytest.mark.parametrize("n", [1, 2, 5, 51, 100, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_splits_cover_every_sample_once_in_order(n, world):
    parts = split_samples(n, world)
    assert len(parts) == world
    assert [i for a, b in parts for i in range(a, b)] == list(range(n))  # no pad, no drop
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("n", "batch", "world"), [(101, 10, 2), (101, 10, 3), (30, 10, 4), (7, 50, 2)]
)
def test_train_mode_splits_cut_only_between_batches(n, batch, world):
    parts = split_samples(n, world, edges=list(range(batch, n, batch)))
    assert [i for a, b in parts for i in range(a, b)] == list(range(n))
    assert all(a % batch == 0 or a == n for a, _ in parts), parts
    filled = [b - a for a, b in parts if b > a]
    assert max(filled) - min(filled) <= batch


def _loader(n=23, batch=5, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return DeviceLoader(x, y, batch, mean=[0.5], std=[0.25], **kw)


def _rows(batches):
    xs, ys, idx = zip(*batches)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


def test_device_loader_shards_are_slices_of_the_whole_with_global_indices():
    loader = _loader()
    x, y, idx = _rows(loader)
    for a, b in split_samples(23, 3):
        xs, ys, ids = _rows(shard_data(loader, a, b))
        assert torch.equal(xs, x[a:b]) and torch.equal(ys, y[a:b])
        assert ids.tolist() == list(range(a, b))
        assert torch.equal(sample_at(loader, a), x[a : a + 1])


def test_lists_of_batches_and_ordered_dataloaders_split_like_their_rows():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 3, generator=g), torch.arange(13)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 13, 4)]
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    for data in (batches, loader):
        assert total_samples(data) == 13
        got = [b for a, c in split_samples(13, 2) for b in shard_data(data, a, c)]
        assert torch.equal(torch.cat([b[0] for b in got]), x)
        assert torch.equal(sample_at(data, 7), x[7:8])
    assert batch_edges(batches, 13) == [4, 8, 12]


def test_data_of_unknown_size_is_refused_with_the_alternatives():
    with pytest.raises(ProbeError, match="known before reading"):
        total_samples(iter([torch.zeros(2, 3)]))
    shuffled = DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2, shuffle=True)
    with pytest.raises(ProbeError, match="DeviceLoader"):
        total_samples(shuffled)
    with pytest.raises(ProbeError, match="no fixed order"):
        _loader(shuffle=True).shard(0, 3)


@pytest.mark.parametrize("augment", [False, True])
def test_the_parts_of_a_training_batch_are_the_batch(augment):
    """Each rank's part of every global batch, concatenated in rank order, is the batch of the
    unsplit loader: the same shuffle and the same augmentation draws."""
    whole = list(_loader(shuffle=True, augment=augment, seed=3, batch=8))
    parts = [
        list(_loader(shuffle=True, augment=augment, seed=3, batch=8, part=(r, 3))) for r in range(3)
    ]
    assert len(whole) == len(parts[0])
    for k, (x, y, idx) in enumerate(whole):
        got = [p[k] for p in parts]
        assert torch.equal(torch.cat([g[0] for g in got]), x)
        assert torch.equal(torch.cat([g[2] for g in got]), idx)
        assert [len(g[1]) for g in got] == [b - a for a, b in split_samples(len(y), 3)]
