"""Images brought to the size a model takes, by one rule for batches and for single images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize", "resize_uint8"]


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] floats to ``size`` (H, W), half-pixel centres, averaging
    over the pixels each output covers when shrinking (torchvision's ``Resize``): without it a
    photo brought down to 224 x 224 keeps one pixel in a few and aliases. Enlarging is plain
    bilinear interpolation.

    Example:
        >>> resize(torch.ones(1, 3, 4, 6), (2, 3)).shape
        torch.Size([1, 3, 2, 3])
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`resize` of one [H, W, C] uint8 image, rounded back to uint8.

    Example:
        >>> resize_uint8(np.full((5, 7, 3), 200, np.uint8), (2, 2))[..., 0]
        array([[200, 200],
               [200, 200]], dtype=uint8)
    """
    # a copy: decoded images are often read-only arrays, which torch will not wrap
    t = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    out = resize(t, size)[0].permute(1, 2, 0).round_().clamp_(0, 255)
    return out.to(torch.uint8).numpy()
