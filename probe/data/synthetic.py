"""Synthetic noise images for smoke runs of any model (no dataset needed)."""

from __future__ import annotations

import numpy as np

from probe.data.arrays import ImageArrays
from probe.errors import ProbeError

__all__ = ["synthetic"]


def synthetic(
    shape: tuple[int, int, int], num_classes: int, n: int = 256, seed: int = 0
) -> ImageArrays:
    """``n`` uniform-noise uint8 images of ``shape`` (C, H, W) per split with uniform random
    labels in [0, num_classes); seeded, so two runs see the same images.

    Example:
        >>> ds = synthetic((3, 4, 4), 5, n=8)
        >>> ds.x_test.shape, int(ds.y_test.max()) < 5
        ((8, 3, 4, 4), True)
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ProbeError(f"Synthetic images need a shape C,H,W of positive sizes; got {shape}.")
    if num_classes < 1:
        raise ProbeError(f"Synthetic labels need at least one class; got {num_classes}.")
    rng = np.random.default_rng(seed)

    def split():
        return (
            rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            rng.integers(0, num_classes, n),
        )

    (xtr, ytr), (xte, yte) = split(), split()
    classes = [str(i) for i in range(num_classes)]
    return ImageArrays("synthetic", xtr, ytr, xte, yte, classes, source=f"synthetic seed={seed}")
