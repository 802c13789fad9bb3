"""Data-parallel training over the ranks of a process group (DistributedDataParallel).

Every rank holds a replica of the model and takes one contiguous part of each global batch of
the recipe's batch size (``DeviceLoader(part=(rank, ranks))``: the same shuffle and augmentation
as one process). Each rank's loss is its summed cross-entropy times ``ranks / n``, with ``n`` the
samples of the whole global batch, so DDP's gradient average is the gradient of the mean loss
over the global batch -- also when the parts differ in size (the last batch of an epoch) -- and
SGD takes the step one process would take with the same batch.

What differs from one process: BatchNorm in training mode normalises each rank's part by that
part's statistics (as if the batch were split into "ghost batches"), unless ``sync_bn`` converts
it to torch's SyncBatchNorm, which computes them over the global batch -- on GPUs only (torch
refuses CPU tensors there). Running statistics are rank 0's (DDP broadcasts its buffers before
every forward pass).

Example:
    >>> Replicas.join(torch.device("cpu")).world  # one process: training as before
    1
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from probe.data.loader import even_split
from probe.distributed.group import grouped, main_first, on_main, ranks
from probe.errors import ProbeError

__all__ = ["Replicas"]

T = TypeVar("T")


@dataclass(frozen=True)
class Replicas:
    """How this process takes part in training: alone, or as one rank of ``world``."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def join(cls, device: torch.device, distributed: bool | None = None) -> Replicas:
        """This process's place: one of the process group's ranks when one with more than one
        rank is initialised (``distributed=None``) or required (``True``), else alone."""
        r = ranks()
        if distributed and not dist.is_initialized():
            raise ProbeError(
                "distributed=True needs an initialised torch.distributed process group; start "
                "with torchrun (e.g. torchrun --standalone --nproc-per-node 2 -m probe train ...)."
            )
        if distributed is False or r.world == 1 or (distributed is None and not grouped()):
            return cls(0, 1, device)
        return cls(r.rank, r.world, device)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, n_train: int, batch_size: int, sync_bn: bool) -> None:
        """Refuse a split that would leave a rank without samples in some step, and SyncBatchNorm
        where torch does not run it."""
        if not self.parallel:
            return
        last = n_train % batch_size or batch_size
        if min(batch_size, last) < self.world:
            raise ProbeError(
                f"Training on {self.world} ranks splits every batch of {batch_size} images "
                f"({n_train} training images: the last batch holds {last}) into {self.world} "
                "parts, and a rank with no images in a step cannot take part in it. Choose a "
                "batch size (--set batch_size=...) or --train-limit that leaves at least "
                f"{self.world} images in every batch."
            )
        if sync_bn and self.device.type != "cuda":
            raise ProbeError(
                "--sync-bn converts BatchNorm to torch's SyncBatchNorm, which runs on GPUs only "
                f"(this run is on {self.device.type}). Without it each rank normalises its part "
                "of a batch by that part's statistics (docs/distributed.md)."
            )

    def wrap(self, model: nn.Module, sync_bn: bool) -> nn.Module:
        """``model`` for the training steps: itself alone, else in DistributedDataParallel (its
        BatchNorms made SyncBatchNorms with ``sync_bn``; the module is changed in place)."""
        if not self.parallel:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def loss(
        self, out: torch.Tensor, y: torch.Tensor, n_batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to differentiate, this rank's summed cross-entropy in float64) for its part of a
        global batch of ``n_batch`` samples. One process: the mean cross-entropy, as always."""
        if not self.parallel:
            loss = F.cross_entropy(out.float(), y)
            return loss, loss.detach().double() * len(y)
        summed = F.cross_entropy(out.float(), y, reduction="sum")
        return summed * (self.world / n_batch), summed.detach().double()

    def sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor summed over the ranks (on every rank)."""
        if not self.parallel:
            return tensors
        out = []
        for t in tensors:
            t = t.clone()
            dist.all_reduce(t)
            out.append(t)
        return tuple(out)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BN running statistics) on every rank. DDP broadcasts them at the
        start of each forward pass, so after the last step every rank holds its own update; the
        epoch's evaluation and checkpoint use rank 0's, on every rank alike."""
        if self.parallel:
            for b in model.buffers():
                dist.broadcast(b, src=0)

    def part(self, n: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``n`` samples (evaluation splits the data, too)."""
        return even_split(n, self.world)[self.rank]

    def on_main(self, what: str, fn: Callable[[], T]) -> T:
        """``fn`` on rank 0 (a file write), its result or failure shared with every rank."""
        return on_main(what, fn) if self.parallel else fn()

    def main_first(self, what: str, fn: Callable[[], T]) -> T:
        return main_first(what, fn) if self.parallel else fn()
