"""Tensor layouts: which axis of a captured tensor is the channel, which are spatial or tokens.

A layout is one letter per axis, sample axis first: N sample, C channel, H height, W width,
D depth, T token, L length. ``"auto"`` picks the usual layout for a tensor's rank: [N, C]
features, [N, T, C] transformer tokens, [N, C, H, W] and [N, C, D, H, W] maps. Channels-last maps
(``NHWC``) and 1-D convolutions (``NCL``) are named explicitly.

Example:
    >>> import torch
    >>> layout_labels("auto", torch.zeros(2, 5, 8))
    ('sample', 'token', 'channel')
"""

from __future__ import annotations

import torch
from torch import nn

from probe.errors import ProbeError

__all__ = [
    "AXIS_NAMES",
    "AUTO_LAYOUTS",
    "STRIDED",
    "check_layout",
    "resolve_layout",
    "layout_labels",
    "channel_axis",
    "check_auto_axes",
]

# One letter per axis, sample axis first. "auto" picks the usual layout for a tensor's rank:
# [N, C] features, [N, T, C] tokens (transformers), [N, C, H, W] and [N, C, D, H, W] maps.
AXIS_NAMES = {
    "N": "sample",
    "C": "channel",
    "H": "height",
    "W": "width",
    "D": "depth",
    "T": "token",
    "L": "length",
}
AUTO_LAYOUTS = {2: "NC", 3: "NTC", 4: "NCHW", 5: "NCDHW"}
STRIDED = set("HWDL")  # spatial axes that spatial_stride thins (tokens are kept)


def check_layout(layout: str) -> None:
    """Raise :class:`ProbeError` unless ``layout`` is "auto", axis letters starting with N, or
    several such layouts of different ranks joined by "/" (a model whose layers give tensors
    of several ranks: "NCL/NCHW").

    Example:
        >>> check_layout("NCL/NCHW")
    """
    parts = layout.split("/") if isinstance(layout, str) else [None]
    ok = layout == "auto" or (
        all(
            isinstance(p, str)
            and p[:1] == "N"
            and set(p) <= set(AXIS_NAMES)
            and len(set(p)) == len(p)
            and p.count("C") <= 1
            for p in parts
        )
        and len({len(p) for p in parts}) == len(parts)
    )
    if not ok:
        raise ProbeError(
            f"Invalid layout {layout!r}: give 'auto' or one letter per axis starting with N, from "
            f"{', '.join(f'{k}={v}' for k, v in AXIS_NAMES.items())} (e.g. NCHW, NHWC, NTC, NCL), "
            "or layouts of different ranks joined by '/' (e.g. NCL/NCHW)."
        )


def resolve_layout(layout: str, t: torch.Tensor) -> str:
    """The layout letters for ``t`` (of a "/"-joined list, the one of its rank); ``ProbeError``
    when none matches its rank.

    Example:
        >>> resolve_layout("NCL/NCHW", torch.zeros(2, 3, 4, 4))
        'NCHW'
    """
    if layout == "auto":
        return AUTO_LAYOUTS.get(t.ndim, "N" + "?" * (t.ndim - 1))
    letters = next((p for p in layout.split("/") if len(p) == t.ndim), None)
    if letters is None:
        raise ProbeError(
            f"Layout {layout!r} has no layout of {t.ndim} axes, but the tensor has shape "
            f"{tuple(t.shape)}; give one letter per axis (e.g. NHWC), and for a model whose "
            "layers give tensors of several ranks one layout per rank (e.g. NCL/NCHW)."
        )
    return letters


def layout_labels(layout: str, t: torch.Tensor) -> tuple[str, ...]:
    """HDF5 axis labels for ``t`` stored in ``layout``, e.g. sample, channel, height, width."""
    letters = resolve_layout(layout, t)
    return tuple(AXIS_NAMES.get(c, f"dim{i}") for i, c in enumerate(letters))


STRIDED = set("HWDL")  # spatial axes that a spatial stride thins (tokens are kept)


def channel_axis(layout: str, t: torch.Tensor) -> int:
    """Index of the channel axis of ``t``; ProbeError when the layout has none."""
    letters = resolve_layout(layout, t)
    if "C" not in letters:
        raise ProbeError(
            f"Layout {letters!r} of a tensor of shape {tuple(t.shape)} names no channel axis (C); "
            "give layout=... with a C (e.g. NCHW, NHWC, NTC)."
        )
    return letters.index("C")


# Modules that make [N, C, L] maps: a three-axis tensor from a layer built with them may be
# channels-first (NCL), which "auto" would read as tokens (NTC). Norms are left out: LeViT's
# tokens pass through BatchNorm1d.
_ONE_D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
    nn.LPPool1d,
)


def check_auto_axes(
    layer: str, module: nn.Module, tensors: dict[str, torch.Tensor], probes: list[str]
) -> None:
    """Refuse to read three-axis ``tensors`` of a layer built with 1-D convolutions or pools by
    the "auto" layout of ``probes`` (their names): such a tensor may be [N, C, L] (a 1-D CNN) as
    well as [N, T, C] (tokens; a Mamba or Conformer block runs its Conv1d on transposed tokens),
    and read the wrong way its "channel" statistics are those of positions. ``tensors`` maps
    what each tensor is (output, F(x), input) to it.

    Example:
        >>> conv = nn.Conv1d(4, 4, 3, padding=1)
        >>> check_auto_axes("c", conv, {"output": torch.zeros(2, 4, 9)}, ["channel"])
        Traceback (most recent call last):
        ...
        probe.errors.ProbeError: Layer 'c' (Conv1d) gives an output of shape [2, 4, 9] ...
    """
    if not probes:
        return
    three = {what: t for what, t in tensors.items() if t is not None and t.ndim == 3}
    if not three:
        return
    found = next((m for m in module.modules() if isinstance(m, _ONE_D)), None)
    if found is None:
        return
    what, t = next(iter(three.items()))
    names = ", ".join(repr(p) for p in probes)
    raise ProbeError(
        f"Layer {layer!r} ({type(module).__name__}) gives an {what} of shape "
        f"{list(t.shape)} and is built with {type(found).__name__}, so its axes may be [N, C, L] "
        f"(a 1-D convolutional net) or [N, T, C] (tokens); the 'auto' layout of {names} cannot "
        "tell, and the wrong reading takes positions for channels. Give the layout: "
        "layout='NCL' or 'NTC' (e.g. --probe 'channel:layout=NCL' in the CLI)."
    )
