"""Decoded datasets cached on disk as ``.npz``: written whole or not at all, and read back only
when whole (a damaged cache is derived data: it is made again, with a warning, never used)."""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["read_cache", "write_cache"]

_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "classes")


def read_cache(cache: Path) -> dict[str, np.ndarray] | None:
    """The arrays ``cache`` holds (``x_train``, ``y_train``, ``x_test``, ``y_test``,
    ``classes``); None where there is none, and None with a warning where it cannot be read
    whole or they are not a split's uint8 images and labels of its classes. numpy checks each
    member's CRC-32 as it reads it, so a flipped byte fails here rather than changing an image.

    Example:
        >>> read_cache(Path("no-such-cache.npz")) is None
        True
    """
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAYS}
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.ndim != 4 or x.dtype != np.uint8 or y.shape != x.shape[:1]:
                raise ValueError(f"{split} images {x.shape} {x.dtype}, labels {y.shape}")
            if y.size and not (y.min() >= 0 and y.max() < len(arrays["classes"])):
                raise ValueError(f"{split} labels outside 0..{len(arrays['classes']) - 1}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(
            f"The dataset cache {cache} is damaged ({type(e).__name__}: {e}); making it again.",
            stacklevel=3,
        )
        return None
    return arrays


def write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``cache`` whole or not at all (a temporary file renamed over it); a
    cache that cannot be written (a full or read-only disk) is skipped with a warning.

    Example:
        >>> import tempfile
        >>> cache = Path(tempfile.mkdtemp()) / "toy.npz"
        >>> x, y = np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 1])
        >>> write_cache(cache, dict(x_train=x, y_train=y, x_test=x, y_test=y, classes=np.array(["a", "b"])))
        >>> read_cache(cache)["y_test"].tolist()
        [0, 1]
    """
    tmp = cache.with_suffix(f".tmp-{os.getpid()}.npz")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
    except OSError as e:
        with contextlib.suppress(OSError):  # none was made, or it cannot be removed either
            tmp.unlink()
        warnings.warn(
            f"Could not cache the decoded dataset at {cache} ({e}); it is made again on the "
            "next load.",
            stacklevel=3,
        )
