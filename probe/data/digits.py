"""The built-in offline default: scikit-learn's bundled handwritten digits (8x8, 1797 images).

The split is fixed and documented: a stratified 80/20 split with ``random_state=0``
(1437 training and 360 test images). Pixel values 0..16 are scaled to 0..255 (x16, clipped).
No augmentation: flips and crops change what an 8x8 digit means.
"""

from __future__ import annotations

import numpy as np

from probe.data.arrays import ImageArrays

__all__ = ["load_digits"]


def load_digits() -> ImageArrays:
    """Load the digits dataset with its fixed split.

    Example:
        >>> ds = load_digits()
        >>> ds.x_train.shape, ds.x_test.shape
        ((1437, 1, 8, 8), (360, 1, 8, 8))
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    images = np.clip(bunch.images * 16.0, 0, 255).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    return ImageArrays(
        "digits",
        np.ascontiguousarray(x_tr),
        y_tr,
        np.ascontiguousarray(x_te),
        y_te,
        [str(c) for c in range(10)],
        augment=False,
        source="sklearn.datasets.load_digits (stratified 80/20, random_state=0)",
    )
