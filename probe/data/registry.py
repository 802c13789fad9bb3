"""Resolve a dataset spec given on the command line or in a config to :class:`ImageArrays`.

Specs: ``digits`` (built-in, offline), ``cifar10`` / ``cifar100`` (official pickle layout under the
data root, downloaded when the network allows), or a path to a class-folder tree or ``.tar.gz``.
"""

from __future__ import annotations

import os
from pathlib import Path

from probe.data.arrays import ImageArrays
from probe.data.cifar import PICKLE_DIRS, download_cifar, load_cifar_pickle, load_image_tree
from probe.data.digits import load_digits
from probe.errors import ProbeError, did_you_mean

__all__ = ["load_dataset", "DATASETS", "data_root"]

DATASETS = ("digits", "cifar10", "cifar100")


def data_root() -> Path:
    """The default root on disk for datasets, checkpoints and captures: $RESPROBE_DATA or ./data."""
    return Path(os.environ.get("RESPROBE_DATA", "data"))


def load_dataset(
    spec: str,
    root: str | os.PathLike | None = None,
    download: bool = True,
    size: tuple[int, int] | None = None,
) -> ImageArrays:
    """Load a dataset by name or path; ``size`` (H, W) is what images of a folder or archive
    whose images differ in size are each resized to (see :func:`load_image_tree`).

    Example:
        >>> load_dataset("digits").num_classes
        10
    """
    root = Path(root) if root is not None else data_root()
    if spec == "digits":
        return load_digits(cache_dir=root / "cache")
    if spec in PICKLE_DIRS:
        if not (root / PICKLE_DIRS[spec]).is_dir() and download:
            download_cifar(root, spec)
        return load_cifar_pickle(root, spec)
    path = Path(spec)
    if path.exists():
        if path.is_dir() and any((path / d).is_dir() for d in PICKLE_DIRS.values()):
            name = next(n for n, d in PICKLE_DIRS.items() if (path / d).is_dir())
            return load_cifar_pickle(path, name)
        return load_image_tree(path, cache_dir=root / "cache", size=size)
    raise ProbeError(
        f"Unknown dataset {spec!r}: not one of {', '.join(DATASETS)} and not an existing path."
        + did_you_mean(spec, DATASETS)
        + " Give a built-in name, a folder with train/<class>/* and test/<class>/*, or a .tar.gz of one."
    )
