"""NaN and infinity in probe results: which samples hold one, counted per layer.

Numerics are data: a capture records, per layer key, how many samples had a NaN or an infinity in
any of its results. :class:`NonFiniteCounter` does this with one reduction per result, taken as
the result arrives (while the tensor is still in the cache; a [N] result needs none), and a
handful of operations per batch for all layers together. Checking each result on its own and
each layer at the end of the batch took five to eight small operations per result and per layer:
about a millisecond of Python per ResNet-56 batch, a few percent of a probed pass.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    # every axis but the first, reduced in place: a channels-last map's reshape to [N, -1] is a
    # copy of the map (0.49 against 0.03 ms for a ResNet-56 stage-1 block output, hot)
    axes = 1 if t.ndim == 2 else tuple(range(1, t.ndim))
    if pick_rows:
        return t.sum(axes, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if t.dtype == torch.float64:  # a float64 sum could overflow: element by element, as flags
        return torch.where(torch.isfinite(t).flatten(1).all(1), 0.0, torch.inf)
    return t.sum(axes, dtype=torch.float64)


def _recording(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is being recorded into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


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
        # key, result, the row sums it is read from, its first row there, its rows
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, int, int]] = []
        self._sums_of: dict[tuple, torch.Tensor] = {}  # a result's memory -> its row sums
        self._index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # layout -> indices
        self._totals: list[tuple[tuple[str, ...], torch.Tensor]] = []  # keys, their counts

    def add(self, key: str, t: torch.Tensor) -> None:
        """Note a floating-point result [N, ...] of layer ``key`` in this batch."""
        n = t.shape[0]
        # A run of rows of a larger result (a call's rows of a grouped statistic) is read from
        # that result's row sums, taken once for the whole group: no reduction, no slice here.
        base, start = _rows_of(t) or (t, 0)
        if base.ndim == 1:  # one value per sample: its own check, nothing to reduce
            self._pending.append((key, t, base, start, n))
            return
        if not t.numel():
            return
        self._pending.append((key, t, self._sums(base), start, n))

    def add_block(self, block: torch.Tensor, pieces: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Note results that were copied whole into one flat ``block``: (layer key, result) for
        every result in it. The block is read once; the results are looked at one by one (as
        :meth:`add` does) only when it holds a NaN or an infinity. A session copies a batch's
        small CPU results into such a block anyway (probe.session), and checking them there
        replaced a reduction and a bookkeeping entry per result: ~2 ms of a ResNet-56 pass.

        Example:
            >>> c = NonFiniteCounter()
            >>> block = torch.tensor([1.0, 2.0, float("nan"), 4.0])
            >>> c.add_block(block, [("a", block[:2]), ("b", block[2:].view(2, 1))])
            >>> c.end_batch()
            >>> c.counts
            {'b': 1}
        """
        if not block.is_floating_point():
            return
        # A finite sum means no NaN and no inf (see nonfinite_rows); a non-finite one may be an
        # overflow of finite values, which the results' own checks then tell apart. One sum is
        # ~15x faster than isfinite(block).all() on the CPU. (A host sync: only a session's CPU
        # blocks come here.)
        wide = torch.float64 if block.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(block.sum(dtype=wide))):
            return
        for key, t in pieces:
            self.add(key, t)

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
        for keys, counts in self.batch_counts():
            self.accumulate(keys, counts)

    def batch_counts(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """This batch's samples with a non-finite result, per layer key: (keys, counts) per
        device, counts [len(keys)] on that device; the batch is then forgotten. A recorded pass
        (probe.replay) takes them inside the recording and :meth:`accumulate` s them after each
        replay. On the CPU a batch with nothing non-finite gives nothing (no count to add)."""
        by_device: dict[torch.device, list] = {}
        for entry in self._pending:
            by_device.setdefault(entry[2].device, []).append(entry)
        try:
            counted = [self._count(entries) for entries in by_device.values()]
        finally:
            self.discard_batch()
        return [c for c in counted if c is not None]

    def accumulate(self, keys: tuple[str, ...], counts: torch.Tensor) -> None:
        """Add ``counts`` (samples with a non-finite result, one per key) to the totals."""
        for seen, total in self._totals:
            if seen == keys and total.device == counts.device:  # the usual case: the same layers
                total += counts
                return
        # a copy: a replayed recording refills its counts in place at every batch
        self._totals.append((keys, counts.clone()))

    def _count(
        self, entries: list[tuple[str, torch.Tensor, torch.Tensor, int, int]]
    ) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """One cat of the batch's distinct row sums, one gather of each entry's rows from it and
        one index_add of those into a [keys, samples] grid, whatever the number of results."""
        sums: dict[int, tuple[int, torch.Tensor]] = {}  # id -> (its first row in the cat, it)
        offset = 0
        for entry in entries:
            s = entry[2]
            if id(s) not in sums:
                sums[id(s)] = (offset, s)
                offset += s.shape[0]
        bad = ~torch.isfinite(torch.cat([s for _, s in sums.values()]))
        device = bad.device
        if device.type == "cpu" and not bad.any():  # no sync to avoid here: nothing is bad
            return None  # (the usual CPU batch: no layout to build)
        keys = list(dict.fromkeys(entry[0] for entry in entries))
        width = max(entry[4] for entry in entries)
        row = {k: i * width for i, k in enumerate(keys)}
        layout = (
            width,
            offset,
            tuple((sums[id(s)][0] + start, n, row[key]) for key, _, s, start, n in entries),
        )
        gather, grid = self._indices(layout, device)
        bad = bad[gather]  # each entry's rows, in entry order
        if device.type == "cpu" and _picks_rows(bad, self.pick_rows):
            # overflowed sums: look at the flagged rows' elements
            bad = torch.cat([self._exact(t, s[start : start + n]) for _, t, s, start, n in entries])
        hits = torch.zeros(len(keys) * width, dtype=torch.int32, device=device)
        hits.index_add_(0, grid, bad.to(torch.int32))
        return tuple(keys), (hits.view(len(keys), width) > 0).sum(1)

    def _exact(self, t: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        if bool(torch.isfinite(sums).all()):
            return torch.zeros(sums.shape[0], dtype=torch.bool, device=sums.device)
        return nonfinite_rows(t, pick_rows=True)

    def _indices(self, layout: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each entry's rows are in the cat of row sums, and their places in the
        [keys, width] grid (cached: batches repeat a layout)."""
        key = (layout, device)
        found = self._index.get(key)
        if found is None:
            if len(self._index) > 64:  # layouts that never repeat (ragged batches)
                self._index.clear()
            segments = layout[2]
            # Built on the device while a CUDA graph is recorded (probe.replay), where a copy
            # from pageable host memory is refused; elsewhere on the host, in two copies.
            on = device if _recording(device) else "cpu"
            gather = torch.cat([torch.arange(a, a + n, device=on) for a, n, _ in segments])
            grid = torch.cat([torch.arange(c, c + n, device=on) for _, n, c in segments])
            found = self._index[key] = (gather.to(device), grid.to(device))
        return found

    @property
    def counts(self) -> dict[str, int]:
        """Layer key -> samples so far with a NaN or infinite result (layers with none omitted)."""
        out: dict[str, int] = {}
        for keys, total in self._totals:
            for key, n in zip(keys, total.tolist()):
                out[key] = out.get(key, 0) + n
        return {k: v for k, v in out.items() if v}
