"""CIFAR-10/100 from the official python-pickle layout or from a class-folder image tree.

Layouts read:
    * pickle: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or
      ``<root>/cifar-100-python/{train,test,meta}`` (what torchvision downloads);
    * folders: ``<root>/train/<class>/*.{jpg,png}`` and ``<root>/test/<class>/*``, or a ``.tar.gz``
      holding such a tree (e.g. CIFAR-10 as JPEG).
Decoded arrays are cached as ``.npz`` under the data root so images are decoded once.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from probe.data.arrays import ImageArrays
from probe.data.cache import read_cache, write_cache
from probe.errors import ProbeError

__all__ = ["load_cifar_pickle", "load_image_tree", "download_cifar", "PICKLE_DIRS", "SHUFFLE_SEED"]

PICKLE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_URLS = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp")
SHUFFLE_SEED = 0  # the fixed permutation applied to each split of an image tree
_LAYOUT_VERSION = 2  # bump when the cached arrays' order or content changes: old caches are ignored


class _SafeUnpickler(pickle.Unpickler):
    """Only allows the numpy reconstruction functions the official CIFAR batches need."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise ProbeError(
            f"Refusing to unpickle {module}.{name}: not part of the CIFAR batch format."
        )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding="bytes").load()


def _rows_to_images(rows: np.ndarray) -> np.ndarray:
    return np.asarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32)


def load_cifar_pickle(root: str | os.PathLike, name: str = "cifar10") -> ImageArrays:
    """Read CIFAR-10 or CIFAR-100 from the official python-pickle layout under ``root``.

    Example:
        >>> ds = load_cifar_pickle("data", "cifar10")  # doctest: +SKIP
    """
    folder = Path(root) / PICKLE_DIRS[name]
    if not folder.is_dir():
        raise ProbeError(
            f"No {name} pickle folder at {folder}. Put the extracted official archive there "
            f"(the folder {PICKLE_DIRS[name]!r} that torchvision downloads), pass --data to a "
            "class-folder tree or .tar.gz, or allow the download."
        )
    try:
        if name == "cifar10":
            train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
            test = _unpickle(folder / "test_batch")
            meta = _unpickle(folder / "batches.meta")
            classes = [c.decode() for c in meta[b"label_names"]]
            label_key = b"labels"
        else:
            train = [_unpickle(folder / "train")]
            test = _unpickle(folder / "test")
            meta = _unpickle(folder / "meta")
            classes = [c.decode() for c in meta[b"fine_label_names"]]
            label_key = b"fine_labels"
    except FileNotFoundError as e:
        raise ProbeError(
            f"Incomplete {name} pickle folder {folder}: missing {Path(e.filename).name}."
        ) from e
    x_tr = np.concatenate([_rows_to_images(b[b"data"]) for b in train])
    y_tr = np.concatenate([np.asarray(b[label_key]) for b in train])
    return ImageArrays(
        name,
        x_tr,
        y_tr,
        _rows_to_images(test[b"data"]),
        np.asarray(test[label_key]),
        classes,
        augment=True,
        source=str(folder),
    )


def download_cifar(root: str | os.PathLike, name: str = "cifar10") -> Path:
    """Download and extract the official archive into ``root``; clear error without a network."""
    url, md5 = _URLS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(url).name
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            payload = r.read()
    except OSError as e:
        raise ProbeError(
            f"Could not download {name} from {url} ({e}). Without a network, place the extracted "
            f"folder {PICKLE_DIRS[name]!r} under {root}, or pass --data to a class-folder tree or "
            ".tar.gz of images."
        ) from e
    if hashlib.md5(payload).hexdigest() != md5:
        raise ProbeError(f"Checksum mismatch for {url}; the download is corrupt. Try again.")
    archive.write_bytes(payload)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    return root / PICKLE_DIRS[name]


def _decode(payload: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]


def _iter_tree(path: Path):
    """Yield (split, class, file name, bytes) from a folder tree or a tar archive of one."""
    if path.is_dir():
        for file in path.rglob("*"):
            rel = file.relative_to(path).parts
            if file.suffix.lower() in _IMAGE_EXT and len(rel) >= 3:
                yield rel[-3], rel[-2], rel[-1], file.read_bytes()
    else:
        try:
            tar = tarfile.open(path)  # noqa: SIM115 -- closed by the 'with tar' below
        except tarfile.TarError:
            raise ProbeError(
                f"Cannot read {path} as a dataset: it is neither a folder nor a tar archive. "
                "Give a folder with train/<class>/* and test/<class>/* images, a .tar.gz of one, "
                "or a built-in name (digits, cifar10, cifar100)."
            ) from None
        with tar:
            for member in tar:
                parts = Path(member.name).parts
                if (
                    member.isfile()
                    and Path(member.name).suffix.lower() in _IMAGE_EXT
                    and len(parts) >= 3
                ):
                    yield parts[-3], parts[-2], parts[-1], tar.extractfile(member).read()


def _cache_key(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|layout-{_LAYOUT_VERSION}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def load_image_tree(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    name: str | None = None,
    size: tuple[int, int] | None = None,
) -> ImageArrays:
    """Read ``train/<class>/*`` and ``test/<class>/*`` images from a folder or ``.tar.gz``.

    Class indices follow the sorted class-folder names. Each split is put in a canonical order
    (sorted by class and file name, so folder listing and archive member order do not matter)
    and then shuffled by a fixed permutation (``numpy.random.default_rng(SHUFFLE_SEED)``): a
    class-sorted split would make "the first N test images" -- a capture ``limit``, a quick
    subset -- a single class. Images of different sizes (photos) are each resized to ``size``
    (H, W) as they are read (:func:`probe.data.resize.resize_uint8`); without ``size`` they are
    an error, images of one size are kept as they are. Decoded arrays are cached in
    ``cache_dir`` (keyed by path, size, mtime, the layout version and, for resized images, the
    size they were given) so a second load is fast.
    """
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"Dataset path {str(path)!r} does not exist.")
    name = name or path.name.split(".")[0]
    stem = f"{name}-{_cache_key(path)}"
    caches = []
    if cache_dir:  # resized images first: a tree of one size is cached as it is, unsized
        caches = [Path(cache_dir) / f"{stem}-{size[0]}x{size[1]}.npz"] if size else []
        caches.append(Path(cache_dir) / f"{stem}.npz")
    cache = next((c for c in caches if c.exists()), None)
    cached = read_cache(cache) if cache is not None else None
    if cached is not None:
        return ImageArrays(
            name,
            cached["x_train"],
            cached["y_train"],
            cached["x_test"],
            cached["y_test"],
            [str(c) for c in cached["classes"]],
            augment=True,
            source=str(path),
        )
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[str]] = {"train": [], "test": []}
    for split, cls, _, payload in sorted(_iter_tree(path), key=lambda m: m[:3]):
        if split in images:
            images[split].append(_decode(payload))
            labels[split].append(cls)
    if not images["train"] or not images["test"]:
        raise ProbeError(
            f"No images found under {path} in the layout train/<class>/*.jpg and test/<class>/*.jpg "
            f"(found {len(images['train'])} train and {len(images['test'])} test images)."
        )
    classes = sorted(set(labels["train"]))
    index = {c: i for i, c in enumerate(classes)}
    shapes = {im.shape for split in images.values() for im in split}
    cache = caches[-1] if caches else None
    if len(shapes) != 1:
        if size is None:
            raise ProbeError(
                f"Images under {path} have different sizes (H, W, C: {sorted(shapes)[:4]}"
                f"{' ...' if len(shapes) > 4 else ''}). A capture resizes each image to the size "
                "the model takes when given one (probe capture --model ... --input-size C,H,W, "
                "e.g. 3,224,224; load_dataset(..., size=(H, W))); training needs images of one size."
            )
        from probe.data.resize import resize_uint8

        images = {k: [resize_uint8(im, size) for im in ims] for k, ims in images.items()}
        cache = caches[0] if caches else None
    arrays = {}
    for split in ("train", "test"):
        unknown = set(labels[split]) - set(index)
        if unknown:
            raise ProbeError(
                f"Test classes {sorted(unknown)} under {path} have no training images."
            )
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(labels[split]))
        x = np.stack(images[split]).transpose(0, 3, 1, 2)
        arrays[f"x_{split}"] = np.ascontiguousarray(x[order])
        arrays[f"y_{split}"] = np.array([index[c] for c in labels[split]], dtype=np.int64)[order]
    if cache is not None:
        write_cache(cache, {"classes": np.array(classes), **arrays})
    return ImageArrays(
        name,
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        classes,
        augment=True,
        source=str(path),
    )
