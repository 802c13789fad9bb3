"""Rows of an in-memory capture, gathered batch by batch into host arrays.

When the capture's number of samples is known, each quantity's array is allocated once at that
size and every batch is copied into its rows: one copy of the data, freed batch results, no
final concatenation. Gathering the batches and joining them at the end held the data twice at
the end of a capture (peak RSS 2.3 × the data for ResNet-20 block outputs, docs/performance.md).
Unknown sizes, and quantities with more rows than samples, are gathered and joined as before.

Rows keep the dtype and per-sample shape of a quantity's first batch; a later batch that cannot
be stored that way exactly is an error, as in an HDF5 capture (:mod:`probe.store.writer`).

Results on an accelerator leave it as an HDF5 capture's do (:func:`probe.store.writer.to_host`):
pinned, non-blocking copies (one per block of memory the batch's results share), started and
waited for at the end of the batch (:meth:`MemoryRows.end_batch`) instead of a synchronising
``.cpu()`` per result.

Example:
    >>> import torch
    >>> rows = MemoryRows(capacity=6)
    >>> for i in range(2):
    ...     rows.add("fc", "y_norm", torch.full((3,), float(i)))
    ...     rows.end_batch()
    >>> rows.arrays()["fc"]["y_norm"].tolist()
    [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from math import prod

import numpy as np
import torch

from probe.store.writer import dtype_mismatch, shape_mismatch, to_host_many

__all__ = ["MemoryRows"]


@dataclass
class _Column:
    feat: tuple[int, ...]  # the per-sample shape
    dtype: torch.dtype
    array: torch.Tensor | None  # preallocated rows, or None when gathering parts
    filled: int = 0
    parts: list[np.ndarray] = field(default_factory=list)

    def add(self, t: torch.Tensor) -> None:
        n = t.shape[0]
        if self.array is not None and self.filled + n > len(self.array):
            # more rows than the capacity: keep what is here and gather from now on
            self.parts, self.array = [self.array[: self.filled].numpy()], None
        if self.array is not None:
            self.array[self.filled : self.filled + n].copy_(t)  # device to host, cast, one copy
        else:
            # a copy: the probe's tensor may be reused or changed in place after this batch
            self.parts.append(t.to("cpu", self.dtype, copy=True).numpy())
        self.filled += n

    def result(self) -> np.ndarray:
        if self.array is not None:
            rows = self.array[: self.filled]
            # a quantity kept for a few samples (max_samples) frees the rest of its reservation
            return (rows.clone() if 2 * self.filled < len(self.array) else rows).numpy()
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)


class MemoryRows:
    """{layer: {quantity: rows}} of a capture held in memory; ``capacity``: the capture's number
    of samples, when known (an upper bound on any per-sample quantity's rows)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._columns: dict[str, dict[str, _Column]] = {}
        self._pending: list[tuple[_Column, torch.Tensor]] = []  # device rows, in arrival order

    def add(self, layer: str, quantity: str, t: torch.Tensor) -> None:
        """Append the rows of one batch; bfloat16 is stored as float32 (numpy has no bfloat16)."""
        t = t.detach()
        dtype = torch.float32 if t.dtype == torch.bfloat16 else t.dtype
        feat = tuple(t.shape[1:])
        columns = self._columns.setdefault(layer, {})
        col = columns.get(quantity)
        if col is None:
            col = columns[quantity] = _Column(feat, dtype, self._allocate(feat, dtype))
        else:
            _check(f"{layer}/{quantity}", col, feat, dtype)
        if _deferred(t):
            self._pending.append((col, t))
        else:
            col.add(t)

    def end_batch(self) -> None:
        """Wait for the batch's copies from the accelerator and store their rows; call it before
        the probes' tensors can change (the next batch)."""
        pending, self._pending = self._pending, []
        # one copy per block of memory the batch's results share (to_host_many)
        hosts = to_host_many([t for _, t in pending])
        for (col, _), host in zip(pending, hosts):
            rows = torch.from_numpy(host.numpy())  # waits for this copy's event
            if host.encoding == "bfloat16":  # its raw 16 bits, as they left the device
                rows = rows.view(torch.bfloat16)
            col.add(rows)

    def _allocate(self, feat: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Rows for the whole capture, or None (gather instead). The pages are touched only as
        rows arrive, so a quantity kept for a few samples (``max_samples``) costs little; one
        larger than half the machine's memory, or refused by the system, is gathered."""
        if self.capacity is None:
            return None
        nbytes = self.capacity * prod(feat) * dtype.itemsize
        if nbytes > _physical_memory() // 2:
            return None
        try:
            return torch.empty((self.capacity, *feat), dtype=dtype, device="cpu")
        except RuntimeError:  # the system would not reserve it (strict overcommit)
            return None

    def arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """Every quantity's rows, in the order layers and quantities first arrived."""
        self.end_batch()
        return {
            layer: {q: col.result() for q, col in cols.items()}
            for layer, cols in self._columns.items()
        }


def _check(key: str, col: _Column, feat: tuple[int, ...], dtype: torch.dtype) -> None:
    if feat != col.feat:
        raise shape_mismatch(key, feat, col.feat)
    if dtype != col.dtype and not np.can_cast(_np(dtype), _np(col.dtype), "safe"):
        raise dtype_mismatch(key, dtype, col.dtype)


def _deferred(t: torch.Tensor) -> bool:
    # an accelerator's tensor: copied to pinned memory without waiting, stored at end_batch
    return t.device.type != "cpu"


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this system: assume little
        return 1 << 30


def _np(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype, device="cpu").numpy().dtype
