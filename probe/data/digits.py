"""The built-in offline default: scikit-learn's bundled handwritten digits (8x8, 1797 images).

The split is fixed and documented: a stratified 80/20 split with ``random_state=0``
(1437 training and 360 test images). Pixel values 0..16 are scaled to 0..255 (x16, clipped).
No augmentation: flips and crops change what an 8x8 digit means.

Given a cache folder (:func:`probe.data.load_dataset` gives the data root's ``cache/``), the
split is kept there: importing scikit-learn takes about a second, most of a small capture's
start-up, and the split it makes never changes for one scikit-learn and one data file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np

from probe.data.arrays import ImageArrays
from probe.data.cache import read_cache, write_cache

__all__ = ["load_digits"]

_SOURCE = "sklearn.datasets.load_digits (stratified 80/20, random_state=0)"
_CLASSES = [str(c) for c in range(10)]
_LAYOUT_VERSION = 1  # bump when the cached arrays' order or content changes: old caches are ignored


def load_digits(cache_dir: str | os.PathLike | None = None) -> ImageArrays:
    """Load the digits dataset with its fixed split, kept in ``cache_dir`` when one is given.

    Example:
        >>> ds = load_digits()
        >>> ds.x_train.shape, ds.x_test.shape
        ((1437, 1, 8, 8), (360, 1, 8, 8))
    """
    cache = _cache_path(Path(cache_dir)) if cache_dir is not None else None
    arrays = read_cache(cache) if cache is not None else None
    if arrays is None:
        arrays = _split()
        if cache is not None:
            write_cache(cache, arrays)
    return ImageArrays(
        "digits",
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        _CLASSES,
        augment=False,
        source=_SOURCE,
    )


def _split() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    images = np.clip(bunch.images * 16.0, 0, 255).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    return {
        "x_train": np.ascontiguousarray(x_tr),
        "y_train": np.asarray(y_tr, dtype=np.int64),
        "x_test": np.ascontiguousarray(x_te),
        "y_test": np.asarray(y_te, dtype=np.int64),
        "classes": np.array(_CLASSES),
    }


def _cache_path(cache_dir: Path) -> Path | None:
    """Where the split is kept: named by what it depends on -- scikit-learn's version, its data
    file's size and modification time, the layout -- all read without importing scikit-learn
    (None where it is not installed: the load then says so)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    try:
        st = data.stat()
        version = importlib.metadata.version("scikit-learn")
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    key = f"{version}|{st.st_size}|{st.st_mtime_ns}|layout-{_LAYOUT_VERSION}"
    return cache_dir / f"digits-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
