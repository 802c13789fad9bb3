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

from probe.errors import ProbeError

__all__ = [
    "AXIS_NAMES",
    "AUTO_LAYOUTS",
    "STRIDED",
    "check_layout",
    "resolve_layout",
    "layout_labels",
    "channel_axis",
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
    """Raise :class:`ProbeError` unless ``layout`` is "auto" or axis letters starting with N."""
    ok = layout == "auto" or (
        layout[:1] == "N"
        and set(layout) <= set(AXIS_NAMES)
        and len(set(layout)) == len(layout)
        and layout.count("C") <= 1
    )
    if not ok:
        raise ProbeError(
            f"Invalid layout {layout!r}: give 'auto' or one letter per axis starting with N, from "
            f"{', '.join(f'{k}={v}' for k, v in AXIS_NAMES.items())} (e.g. NCHW, NHWC, NTC, NCL)."
        )


def resolve_layout(layout: str, t: torch.Tensor) -> str:
    """The layout letters for ``t``; ``ProbeError`` when they do not match its rank."""
    letters = AUTO_LAYOUTS.get(t.ndim, "N" + "?" * (t.ndim - 1)) if layout == "auto" else layout
    if len(letters) != t.ndim:
        raise ProbeError(
            f"Layout {layout!r} has {len(letters)} axes but the tensor has shape "
            f"{tuple(t.shape)}; give layout=... with one letter per axis (e.g. NHWC)."
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
