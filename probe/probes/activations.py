"""Raw tensors, opt-in: activations (or gradients) with storage dtype, subsampling and a cap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from probe.errors import check_option
from probe.probes.base import Call, Probe

__all__ = ["Activations", "Gradients", "STORAGE_DTYPES"]

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _subsample(t: torch.Tensor, channel_stride: int, spatial_stride: int) -> torch.Tensor:
    if t.ndim >= 2 and channel_stride > 1:
        t = t[:, ::channel_stride]
    if t.ndim == 4 and spatial_stride > 1:
        t = t[:, :, ::spatial_stride, ::spatial_stride]
    return t


def _capped(t: torch.Tensor, call: Call, max_samples: int | None) -> torch.Tensor | None:
    keep = call.rows_within(max_samples, len(t))
    return t[:keep] if keep else None


@dataclass
class Activations(Probe):
    """A copy of a layer's output (or input) in a storage dtype.

    Args:
        dtype: "fp32", "fp16" or "bf16" (bf16 is stored as its 16 raw bits and read back as fp32).
        channel_stride: keep every k-th channel.
        spatial_stride: keep every k-th row and column of a 4-D map.
        max_samples: keep only the first ``max_samples`` samples of the capture.
        which: "output" or "input".

    Example:
        >>> from torch import nn
        >>> out = Activations(dtype="fp16").forward(Call("l", nn.Identity(), None, torch.ones(2, 4, 8, 8), 0))
        >>> out["output"].dtype, tuple(out["output"].shape)
        (torch.float16, (2, 4, 8, 8))
    """

    name: ClassVar[str] = "activations"
    dtype: str = "fp16"
    channel_stride: int = 1
    spatial_stride: int = 1
    max_samples: int | None = None
    which: str = "output"

    def __post_init__(self) -> None:
        check_option("activation dtype", self.dtype, STORAGE_DTYPES)
        check_option("activation source", self.which, ["output", "input"])

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        t = call.output if self.which == "output" else call.input
        if t is None:
            return {}
        t = _capped(
            _subsample(t.detach(), self.channel_stride, self.spatial_stride), call, self.max_samples
        )
        if t is None:
            return {}
        # .to() may return the same storage; clone so a later in-place op cannot change our copy.
        out = t.to(STORAGE_DTYPES[self.dtype])
        return {self.which: out.clone() if out.data_ptr() == t.data_ptr() else out}


@dataclass
class Gradients(Probe):
    """The raw gradient dL/d(output) of each hooked layer, opt-in (see :class:`Activations`)."""

    name: ClassVar[str] = "gradients"
    needs_grad: ClassVar[bool] = True
    dtype: str = "fp16"
    channel_stride: int = 1
    spatial_stride: int = 1
    max_samples: int | None = None

    def __post_init__(self) -> None:
        check_option("gradient dtype", self.dtype, STORAGE_DTYPES)

    def backward(self, call: Call) -> dict[str, torch.Tensor]:
        if call.grad_output is None:
            return {}
        g = _capped(
            _subsample(call.grad_output, self.channel_stride, self.spatial_stride),
            call,
            self.max_samples,
        )
        return {} if g is None else {"grad_output": g.to(STORAGE_DTYPES[self.dtype])}
