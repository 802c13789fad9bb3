"""NaN and infinity in probe results: which samples hold one, counted per layer.

Numerics are data: a capture records, per layer key, how many samples had a NaN or an infinity in
any of its results. :class:`NonFiniteCounter` does this with one reduction per result, taken as
the result arrives (while the tensor is still in the cache; a [N] result needs none), and a
handful of operations per batch for all layers together. Checking each result on its own and
each layer at the end of the batch took five to eight small operations per result and per layer:
about a millisecond of Python per ResNet-56 batch, a few percent of a probed pass.
"""

from __future__ import annotations

import torch

__all__ = ["NonFiniteCounter", "nonfinite_rows"]


def nonfinite_rows(t: torch.Tensor, *, pick_rows: bool | None = None) -> torch.Tensor:
    """Which rows (samples) of ``t`` hold a NaN or an infinity. [N, ...] -> [N] bool

    One reduction per row instead of a boolean copy of every element (the copy cost a captured
    ResNet-56's block outputs 14 % of the pass). A NaN or an inf makes the row's sum non-finite
    (inf + finite = inf, inf - inf = NaN, and NaN stays), so a row whose sum is finite holds
    neither. A non-finite sum may also be an overflow of finite values, so on the CPU those rows
    alone are checked element by element: the row sums are taken in float32 (the tensor's own
    dtype for float64), which CPU torch vectorises; accumulating float32 in float64 ran 4-60x
    slower there (21 ms against 0.35 ms for one ResNet-50 block output). On an accelerator, where
    picking out the rows would sync the host, the sum is taken in float64, which finite
    float32/float16/bfloat16 values cannot overflow (that would take ~10^270 of them); float64
    rows there are checked element by element. ``pick_rows`` chooses the first way (True) or the
    second (False) whatever the device; by default, the first on the CPU only.

    Example:
        >>> nonfinite_rows(torch.tensor([[1.0, 3e38, 3e38], [1.0, float("nan"), 0.0]]))
        tensor([False,  True])
    """
    pick = _picks_rows(t, pick_rows)
    bad = ~torch.isfinite(_row_sums(t, pick))
    if pick:
        suspects = bad.nonzero().flatten()
        if len(suspects):  # NaN/inf, or finite values whose sum overflowed: look at each element
            bad[suspects] = ~torch.isfinite(t.reshape(len(t), -1)[suspects]).all(1)
    return bad


def _rows_of(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(base, first row) where ``t`` is a run of whole rows of the tensor it views (a call's rows
    of a statistic computed for a group of calls, probe.probes.group); else None."""
    base = t._base
    if base is None or base.shape[1:] != t.shape[1:] or base.stride() != t.stride():
        return None
    offset = t.storage_offset() - base.storage_offset()
    row = base.stride(0) if base.ndim else 0
    if row <= 0 or offset % row:
        return None
    return base, offset // row


def _picks_rows(t: torch.Tensor, pick_rows: bool | None) -> bool:
    return t.is_cpu if pick_rows is None else pick_rows


def _row_sums(t: torch.Tensor, pick_rows: bool) -> torch.Tensor:
    """[N] values that are all finite where ``t``'s rows are (see :func:`nonfinite_rows`); with
    ``pick_rows`` a non-finite one may be an overflow of finite values and needs a second look."""
    if t.ndim == 1:  # one value per sample: its own check
        return t
    rows = t if t.ndim == 2 else t.reshape(len(t), -1)
    if pick_rows:
        return rows.sum(1, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if t.dtype == torch.float64:  # a float64 sum could overflow: element by element, as flags
        return torch.where(torch.isfinite(rows).all(1), 0.0, torch.inf)
    return rows.sum(1, dtype=torch.float64)


class NonFiniteCounter:
    """Per layer key, the samples so far with a NaN or an infinity in any result.

    :meth:`add` each floating-point result of a batch, then :meth:`end_batch` (or
    :meth:`discard_batch` for a batch whose results are dropped). The counts stay on the device
    (no host sync per batch) until :attr:`counts` is read. ``pick_rows`` as in
    :func:`nonfinite_rows`.

    Example:
        >>> c = NonFiniteCounter()
        >>> c.add("a", torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [float("inf"), 1.0]]))
        >>> c.add("a", torch.tensor([0.0, float("nan"), 0.0]))  # the same samples: counted once
        >>> c.add("b", torch.ones(3, 4))
        >>> c.end_batch()
        >>> c.counts
        {'a': 2}
    """

    def __init__(self, pick_rows: bool | None = None) -> None:
        self.pick_rows = pick_rows
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # key, result, row sums
        self._sums_of: dict[tuple, torch.Tensor] = {}  # a result's memory -> its row sums
        self._index: dict[tuple, torch.Tensor] = {}  # a batch's layout -> rows' grid positions
        self._totals: list[tuple[tuple[str, ...], torch.Tensor]] = []  # keys, their counts

    def add(self, key: str, t: torch.Tensor) -> None:
        """Note a floating-point result [N, ...] of layer ``key`` in this batch."""
        if t.ndim == 1:  # one value per sample: its own check, nothing to reduce
            self._pending.append((key, t, t))
            return
        if not t.numel():
            return
        rows = _rows_of(t)
        if rows is not None:  # a run of rows of a larger result: its sums are that one's rows
            base, start = rows
            sums = self._sums(base)[start : start + len(t)]
        else:
            sums = self._sums(t)
        self._pending.append((key, t, sums))

    def _sums(self, t: torch.Tensor) -> torch.Tensor:
        # A tensor kept under several names (a block's y is the next block's x; an identity S is
        # x) is reduced once; the results hold it, so its address is not reused meanwhile.
        seen = (t.data_ptr(), t.dtype, t.shape, t.stride())
        sums = self._sums_of.get(seen)
        if sums is None:
            sums = self._sums_of[seen] = _row_sums(t, _picks_rows(t, self.pick_rows))
        return sums

    def discard_batch(self) -> None:
        """Forget this batch's results (a batch run again, or failed)."""
        self._pending.clear()
        self._sums_of.clear()

    def end_batch(self) -> None:
        """Add this batch's samples with a non-finite result to every layer's count."""
        by_device: dict[torch.device, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for entry in self._pending:
            by_device.setdefault(entry[2].device, []).append(entry)
        try:
            for entries in by_device.values():
                self._count(entries)
        finally:
            self.discard_batch()

    def _count(self, entries: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        bad = ~torch.isfinite(torch.cat([s for _, _, s in entries]))
        device = bad.device
        if device.type == "cpu":  # no sync to avoid: skip the counting when nothing is bad
            if not bad.any():
                return
            if _picks_rows(bad, self.pick_rows):  # overflowed sums: look at those rows' elements
                bad = torch.cat([self._exact(t, s) for _, t, s in entries])
        keys = list(dict.fromkeys(key for key, _, _ in entries))
        width = max(len(s) for _, _, s in entries)
        index = self._grid_index(keys, entries, width, device)
        hits = torch.zeros(len(keys) * width, dtype=torch.int32, device=device)
        hits.index_add_(0, index, bad.to(torch.int32))
        counts = (hits.view(len(keys), width) > 0).sum(1)
        for seen, total in self._totals:
            if seen == tuple(keys) and total.device == device:  # the usual case: the same layers
                total += counts
                return
        self._totals.append((tuple(keys), counts))

    def _exact(self, t: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        if bool(torch.isfinite(sums).all()):
            return torch.zeros(len(sums), dtype=torch.bool, device=sums.device)
        return nonfinite_rows(t, pick_rows=True)

    def _grid_index(
        self, keys: list[str], entries: list, width: int, device: torch.device
    ) -> torch.Tensor:
        """Each pending row's place in a [keys, width] grid (cached: batches repeat a layout)."""
        row = {k: i * width for i, k in enumerate(keys)}
        layout = (width, device, tuple((row[key], len(s)) for key, _, s in entries))
        index = self._index.get(layout)
        if index is None:
            if len(self._index) > 64:  # layouts that never repeat (ragged batches)
                self._index.clear()
            index = self._index[layout] = torch.cat(
                [torch.arange(start, start + n) for start, n in layout[2]]
            ).to(device)
        return index

    @property
    def counts(self) -> dict[str, int]:
        """Layer key -> samples so far with a NaN or infinite result (layers with none omitted)."""
        out: dict[str, int] = {}
        for keys, total in self._totals:
            for key, n in zip(keys, total.tolist()):
                out[key] = out.get(key, 0) + n
        return {k: v for k, v in out.items() if v}
