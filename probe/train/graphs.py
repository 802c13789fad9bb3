"""Training steps replayed as CUDA graphs: one launch for a forward's and a backward's kernels.

A ResNet-56 step at batch 512 runs ~600 small kernels. Eager PyTorch spends CPU time on each, so
the GPU waits for the CPU: a naive loop measured 22-27 ms a step on an H100, bound by per-op
dispatch (docs/performance.md). :func:`graphed_forward` records the module's forward and
backward once per batch shape with :func:`torch.cuda.make_graphed_callables` and replays them;
the loss, the optimizer step and a smaller last batch stay eager.

Recording runs a few warm-up passes, which would move BatchNorm's running statistics: they are
put back, so a graphed run trains the weights and buffers an eager run trains (same kernels).

Example:
    >>> import torch
    >>> try:
    ...     graphed_forward(torch.nn.Linear(4, 2), torch.device("cpu"))
    ... except ProbeError as e:
    ...     print(str(e).split(";")[0])
    CUDA graphs need a CUDA device
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from probe.errors import ProbeError

__all__ = ["check_graphable", "graphed_forward", "graph_autocast", "replayed_backward"]


def graph_autocast() -> contextlib.AbstractContextManager:
    """The trainer's bf16 autocast without its cast cache, which graph recording refuses (the
    cached bf16 weights would be freed between replays)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


@contextlib.contextmanager
def replayed_backward() -> Iterator[None]:
    """Around ``loss.backward()`` through a replayed forward, and around the recording itself:
    recording creates the parameters' gradient-accumulation nodes on its side streams, so autograd
    warns (per process) that their stream differs from the one a later backward runs on -- the
    recording's own backward passes included (seen on an H100, torch 2.11). The gradients are the
    same (tested against eager steps); the warning would only tell a user of the trainer about
    this module's internals."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The AccumulateGrad node's stream", UserWarning)
        yield


class _Forward(nn.Module):
    """Holds the network so that recording replaces this wrapper's forward, not the model's:
    the model stays an ordinary module for evaluation, checkpoints and later use."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Graphed:
    """Call with a batch: a replay for a batch of the recorded shape and layout, else eager."""

    def __init__(self, net: nn.Module, warmup: int) -> None:
        self.net, self.warmup = net, warmup
        self._replay: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._key: tuple | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape, x.stride(), x.dtype, x.device)
        if self._replay is None and torch.is_grad_enabled():
            self._record(x)
            self._key = key
        if key == self._key and torch.is_grad_enabled():
            return self._replay(x)
        return self.net(x)  # a smaller last batch, or no gradients wanted

    def _record(self, x: torch.Tensor) -> None:
        buffers = [b for b in self.net.buffers() if b is not None]
        saved = [b.detach().clone() for b in buffers]  # BN statistics the warm-up would move
        module = _Forward(self.net).train(self.net.training)
        try:
            with graph_autocast(), replayed_backward():
                self._replay = torch.cuda.make_graphed_callables(
                    module, (x.detach().clone(),), num_warmup_iters=self.warmup
                )
        except RuntimeError as e:  # e.g. an operation that waits for the host
            raise ProbeError(
                f"Recording the training step as CUDA graphs failed: {e}. Train without "
                "--cuda-graph (the model may synchronise with the host or change shape inside "
                "its forward)."
            ) from e
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)


def check_graphable(device: torch.device, *, compiled: bool = False, ranks: int = 1) -> None:
    """Refuse what CUDA-graph training does not support, with what to do instead."""
    if device.type != "cuda":
        raise ProbeError(
            f"CUDA graphs need a CUDA device; the run is on {device}. Drop --cuda-graph, or train "
            "with --device cuda."
        )
    if compiled:
        raise ProbeError(
            "--cuda-graph and --compile were both given; choose one (--compile-mode "
            "reduce-overhead records CUDA graphs of the compiled model)."
        )
    if ranks > 1:
        raise ProbeError(
            f"--cuda-graph trains in one process; this run has {ranks} ranks. Drop --cuda-graph "
            "under torchrun."
        )


def graphed_forward(net: nn.Module, device: torch.device, warmup: int = 3) -> _Graphed:
    """``net`` as a callable whose training passes (gradients on, the first batch's shape)
    replay CUDA graphs recorded at the first such call; anything else runs ``net`` eagerly.

    Call it under :func:`graph_autocast` (or none): the usual autocast caches casts, and graphs
    cannot keep that cache. Raises ProbeError off CUDA.
    """
    check_graphable(device)
    return _Graphed(net, warmup)
