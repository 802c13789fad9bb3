"""Raw tensors, opt-in: activations (or gradients) with storage dtype, subsampling and a cap."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from probe.errors import ProbeError, check_option
from probe.probes.base import Call, Probe
from probe.probes.group import CallGroup, input_of, output_of
from probe.probes.layout import STRIDED, check_layout, layout_labels, resolve_layout
from probe.validation import PositiveInt

__all__ = ["Activations", "Gradients", "STORAGE_DTYPES"]

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FP16_MAX = 65504.0


def _subsample(
    t: torch.Tensor, layout: str, channel_stride: int, spatial_stride: int
) -> torch.Tensor:
    if channel_stride == spatial_stride == 1:
        return t
    letters = resolve_layout(layout, t)
    index = [slice(None)] * t.ndim
    for i, c in enumerate(letters):
        if c == "C" and channel_stride > 1:
            index[i] = slice(None, None, channel_stride)
        elif c in STRIDED and spatial_stride > 1:
            index[i] = slice(None, None, spatial_stride)
    return t[tuple(index)]


@functools.lru_cache
def _fp16_limit(dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` not above fp16's 65504: larger magnitudes overflow fp16.

    A number compared with a tensor is rounded to the tensor's dtype first, and bfloat16 rounds
    65504 up to 65536: compared as it is, 65536 passed as in range and became inf in fp16.
    65504 lies in the binade [2^15, 2^16), where ``dtype``'s values are multiples of
    2^(15 - mantissa bits).

    Example:
        >>> _fp16_limit(torch.bfloat16), _fp16_limit(torch.float16), _fp16_limit(torch.float32)
        (65280.0, 65504.0, 65504.0)
    """
    if not dtype.is_floating_point:
        return _FP16_MAX
    step = 2.0 ** (math.floor(math.log2(_FP16_MAX)) + math.log2(torch.finfo(dtype).eps))
    return math.floor(_FP16_MAX / step) * step


def _to_fp16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per sample, how many finite values lie beyond fp16's range; ``t`` in fp16 with those
    values stored as +-65504). A NaN or an infinity stays what it is: it is the model's own, and
    the capture's non-finite check must see it (clamping turned a genuine inf into 65504, counted
    as clipped and never as non-finite).

    Example:
        >>> clipped, t = _to_fp16(torch.tensor([[1e5, float("inf"), -1e6, 1.0]]))
        >>> clipped.tolist(), t.tolist()
        ([2], [[65504.0, inf, -65504.0, 1.0]])
    """
    n, limit = len(t), _fp16_limit(t.dtype)
    if t.is_cpu and t.numel():  # one read says whether anything is out of range (a GPU would sync)
        lo, hi = torch.aminmax(t)
        if lo >= -limit and hi <= limit:  # a NaN compares False: the careful way
            return torch.zeros(n, dtype=torch.int32, device=t.device), t.to(torch.float16)
    magnitude = t.abs()
    over = (magnitude > limit) & (magnitude < math.inf)  # NaN: False, as inf
    # per sample, reduced where it lies (a channels-last map's reshape to [N, -1] is a copy)
    axes = tuple(range(1, over.ndim))
    clipped = over.sum(axes, dtype=torch.int32) if axes else over.to(torch.int32)
    stored = t.to(torch.float16)  # beyond the range: +-inf, made +-65504 (exact in fp16) below
    return clipped, torch.where(over, stored.clamp(-_FP16_MAX, _FP16_MAX), stored)


def _stored(name: str, t: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """``{name: t in the storage dtype}``; for fp16 also ``{name}_clipped`` [N]: fp16 overflows to
    inf beyond 65504, so larger finite magnitudes are stored as +-65504 and counted per sample --
    no inf appears that the model did not produce, and a genuine inf or NaN stays and is counted
    by the capture's non-finite check (see :func:`_to_fp16`).

    In the stored dtype already, ``t`` is returned as it is: an activation or a gradient the
    :class:`~probe.session.HookSession` guards (it copies what a later in-place op would change,
    see ``HookSession.run_batch``), so the copy is made only where it is needed."""
    if t.is_complex():  # a cast to a real dtype would drop the imaginary part in silence
        raise ProbeError(
            f"Raw tensors are stored as real numbers; {name!r} is {t.dtype} of shape "
            f"{tuple(t.shape)}. Store torch.view_as_real of it from a custom probe "
            "(docs/custom-probe.md), or leave the layer out."
        )
    out = {}
    if dtype == "fp16":
        out[f"{name}_clipped"], stored = _to_fp16(t)
    else:
        stored = t.to(STORAGE_DTYPES[dtype])
    out[name] = stored
    return out


def _capped(t: torch.Tensor, call: Call, max_samples: int | None) -> torch.Tensor | None:
    if max_samples is None:
        return t
    keep = call.rows_within(max_samples, len(t))
    return t[:keep] if keep else None


class _RawTensorAxes:
    """Axis labels of the raw-tensor probes: by ``layout``, and per sample for the clip counts."""

    layout: str

    def dim_labels(self, quantity: str, value: torch.Tensor) -> tuple[str, ...]:
        if quantity.endswith("_clipped"):
            return ("sample",)
        return layout_labels(self.layout, value)


@dataclass
class Activations(_RawTensorAxes, Probe):
    """A layer's output (or input) in a storage dtype.

    In the tensor's own dtype the result is the activation itself, not a copy: the session copies
    it only where a later in-place op would change it (see ``HookSession.run_batch``).

    Args:
        dtype: "fp32", "fp16" or "bf16" (bf16 is stored as its 16 raw bits and read back as fp32).
        channel_stride: keep every k-th channel.
        spatial_stride: keep every k-th row and column (and depth or length step) of a map.
        max_samples: keep only the first ``max_samples`` samples of the capture.
        which: "output" or "input".
        layout: the tensor's axes, one letter each (N sample, C channel, H height, W width,
            D depth, T token, L length), e.g. "NHWC" for channels-last; "auto" = NC, NTC, NCHW
            or NCDHW by rank. It labels the stored axes and tells the strides which axis is which.

    Example:
        >>> from torch import nn
        >>> out = Activations(dtype="fp16").forward(Call("l", nn.Identity(), None, torch.ones(2, 4, 8, 8), 0))
        >>> out["output"].dtype, tuple(out["output"].shape)
        (torch.float16, (2, 4, 8, 8))
    """

    name: ClassVar[str] = "activations"
    forward_grad: ClassVar[bool] = False
    groupable: ClassVar[bool] = True
    dtype: str = "fp16"
    channel_stride: PositiveInt = 1
    spatial_stride: PositiveInt = 1
    max_samples: PositiveInt | None = None
    which: str = "output"
    layout: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("activation dtype", self.dtype, STORAGE_DTYPES)
        check_option("activation source", self.which, ["output", "input"])
        check_layout(self.layout)

    def output_only(self) -> bool:
        return self.which == "output"

    def replayable(self) -> bool:
        return self.max_samples is None  # a cap keeps rows by their place in the capture

    def forward_group(self, group: CallGroup) -> list[dict[str, torch.Tensor]]:
        """:meth:`forward` of a group of equally shaped calls: a dtype conversion (and the fp16
        clip count) of their stacked tensors, one per group instead of one per call. A tensor
        kept in its own dtype is each call's own, as a view (no stack), and capped captures
        keep rows per call: both are taken call by call."""
        first = group.calls[0]
        t = first.output if self.which == "output" else first.input
        if t is None or self.max_samples is not None or STORAGE_DTYPES[self.dtype] == t.dtype:
            return super().forward_group(group)
        get = output_of if self.which == "output" else input_of
        stacked = _subsample(
            group.stacked(get), self.layout, self.channel_stride, self.spatial_stride
        )
        return group.per_call(_stored(self.which, stacked, self.dtype))

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        t = call.output if self.which == "output" else call.input
        if t is None:
            return {}
        t = _capped(
            _subsample(t.detach(), self.layout, self.channel_stride, self.spatial_stride),
            call,
            self.max_samples,
        )
        if t is None:
            return {}
        return _stored(self.which, t, self.dtype)


@dataclass
class Gradients(_RawTensorAxes, Probe):
    """The raw gradient dL/d(output) of each hooked layer, opt-in (see :class:`Activations`)."""

    name: ClassVar[str] = "gradients"
    forward_grad: ClassVar[bool] = False
    eager_backward: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = True
    dtype: str = "fp16"
    channel_stride: PositiveInt = 1
    spatial_stride: PositiveInt = 1
    max_samples: PositiveInt | None = None
    layout: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("gradient dtype", self.dtype, STORAGE_DTYPES)
        check_layout(self.layout)

    def output_only(self) -> bool:
        return True

    def replayable(self) -> bool:
        return self.max_samples is None  # a cap keeps rows by their place in the capture

    def backward(self, call: Call) -> dict[str, torch.Tensor]:
        if call.grad_output is None:
            return {}
        g = _capped(
            _subsample(call.grad_output, self.layout, self.channel_stride, self.spatial_stride),
            call,
            self.max_samples,
        )
        return {} if g is None else _stored("grad_output", g, self.dtype)
