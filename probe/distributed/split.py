"""Which samples each rank captures, and the data of one rank's share.

A capture over several ranks splits its samples -- positions ``0 .. N-1`` in capture order --
into contiguous ranges in rank order, so that the shards joined in rank order are the capture of
one process: sample caps (``max_samples``) and per-sample random probes count positions from
each shard's ``sample_offset``, and nothing is padded, dropped or captured twice when N does not
divide (torch's ``DistributedSampler`` pads with repeated samples; this split never does).

Data that can be split: a :class:`~probe.data.DeviceLoader` (and the CLI's resized view of one),
a list or tuple of batches, or a ``torch.utils.data.DataLoader`` that reads a map-style dataset in
order. Each rank then reads only its own range.

Example:
    >>> split_samples(5, 2)
    [(0, 3), (3, 5)]
    >>> split_samples(10, 3, edges=[4, 8])  # train mode: cuts only between batches
    [(0, 4), (4, 8), (8, 10)]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from probe.data.loader import even_split
from probe.errors import ProbeError

__all__ = ["split_samples", "total_samples", "batch_edges", "shard_data", "sample_at"]

_SPLITTABLE = (
    "a DeviceLoader (probe.loading.capture_loader), a list or tuple of batches, or a "
    "torch DataLoader reading a map-style dataset in order (shuffle=False)"
)


def split_samples(n: int, world: int, edges: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank: contiguous, in rank order, together ``0 .. n`` once.

    Without ``edges`` the sizes differ by at most one sample. With ``edges`` (the batch
    boundaries, ascending) every cut falls on one of them, the one nearest the even cut: a
    train-mode capture normalises by the statistics of each batch, so a rank's batches must be
    the batches a single process would see. Ranks may then get nothing when there are fewer
    batches than ranks.
    """
    if edges is None:
        return even_split(n, world)
    points = sorted({0, n, *(e for e in edges if 0 < e < n)})
    cuts = [0]
    for k in range(1, world):
        target = k * n / world
        allowed = [p for p in points if p >= cuts[-1]]
        cuts.append(min(allowed, key=lambda p: (abs(p - target), -p)))  # ties: earlier ranks work
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


def _batch_len(item: object) -> int:
    x = item if isinstance(item, torch.Tensor) else item[0]  # type: ignore[index]
    return len(x)


def _is_ordered_loader(data: object) -> bool:
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    return (
        isinstance(data, DataLoader)
        and isinstance(data.sampler, SequentialSampler)
        and type(data.batch_sampler) is BatchSampler
        and data.batch_size is not None
    )


def total_samples(data: object) -> int:
    """How many samples ``data`` yields, known before reading it."""
    if hasattr(data, "num_samples"):
        return int(data.num_samples)  # type: ignore[attr-defined]
    if isinstance(data, (list, tuple)):
        return sum(_batch_len(b) for b in data)
    if _is_ordered_loader(data):
        n = len(data.dataset)  # type: ignore[attr-defined]
        return n - n % data.batch_size if data.drop_last else n  # type: ignore[attr-defined]
    raise ProbeError(
        f"A capture over several ranks splits its data by sample, so it needs data whose size is "
        f"known before reading it; got {type(data).__name__}. Give {_SPLITTABLE}; or capture each "
        "rank's part yourself with probe.capture(..., distributed=False, shard=(rank, count), "
        "sample_offset=...) and join the files with probe.join_shards."
    )


def batch_edges(data: object, n: int) -> list[int]:
    """Positions where a batch of ``data`` ends, below ``n``."""
    if isinstance(data, (list, tuple)):
        ends, pos = [], 0
        for b in data:
            pos += _batch_len(b)
            ends.append(pos)
        return [e for e in ends if e < n]
    size = getattr(data, "batch_size", None)
    if not isinstance(size, int) or size < 1:
        raise ProbeError(
            f"A train-mode capture over several ranks cuts the data between batches, but "
            f"{type(data).__name__} does not say its batch size; give {_SPLITTABLE}."
        )
    return list(range(size, n, size))


def _cut(item: object, a: int, b: int) -> object:
    if isinstance(item, torch.Tensor):
        return item[a:b]
    return type(item)(part[a:b] if part is not None else None for part in item)  # type: ignore[attr-defined]


def _from_batches(batches: Sequence, start: int, stop: int) -> Iterator:
    pos = 0
    for item in batches:
        n = _batch_len(item)
        a, b = max(start, pos), min(stop, pos + n)
        if a < b:
            yield _cut(item, a - pos, b - pos)
        pos += n
        if pos >= stop:
            return


def _loader_over(data, indices: range):
    from torch.utils.data import DataLoader, Subset

    return DataLoader(
        Subset(data.dataset, indices),
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        collate_fn=data.collate_fn,
        pin_memory=data.pin_memory,
        timeout=data.timeout,
        worker_init_fn=data.worker_init_fn,
        persistent_workers=data.persistent_workers if data.num_workers else False,
    )


def shard_data(data: object, start: int, stop: int) -> Iterable:
    """The batches of ``data`` that hold positions ``[start, stop)``. Without their own
    sample indices, rows are numbered by position (the capture's ``sample_offset`` = start)."""
    if hasattr(data, "shard"):
        return data.shard(start, stop)  # type: ignore[attr-defined]
    if isinstance(data, (list, tuple)):
        return list(_from_batches(data, start, stop))
    if _is_ordered_loader(data):
        return _loader_over(data, range(start, stop))
    total_samples(data)  # raises the explanation
    raise AssertionError("unreachable")


def sample_at(data: object, position: int) -> torch.Tensor:
    """The input of the sample at ``position``, as a batch of one ([1, ...])."""
    if hasattr(data, "sample"):
        return data.sample(position)  # type: ignore[attr-defined]
    if isinstance(data, (list, tuple)):
        item = next(iter(_from_batches(data, position, position + 1)))
        return item if isinstance(item, torch.Tensor) else item[0]  # type: ignore[index]
    if _is_ordered_loader(data):
        batch = data.collate_fn([data.dataset[position]])  # type: ignore[attr-defined]
        return batch if isinstance(batch, torch.Tensor) else batch[0]
    total_samples(data)
    raise AssertionError("unreachable")
