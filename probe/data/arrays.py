"""The in-memory form every dataset takes: uint8 images plus integer labels, split train/test."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from probe.errors import ProbeError

__all__ = ["ImageArrays"]


@dataclass
class ImageArrays:
    """A labelled image dataset held as uint8 arrays.

    Example:
        >>> ds = ImageArrays("toy", np.zeros((4, 1, 2, 2), np.uint8), np.arange(4) % 2,
        ...                  np.zeros((2, 1, 2, 2), np.uint8), np.arange(2), ["a", "b"])
        >>> ds.num_classes, ds.image_shape
        (2, (1, 2, 2))
    """

    name: str
    x_train: np.ndarray  # [N, C, H, W] uint8
    y_train: np.ndarray  # [N] int64
    x_test: np.ndarray  # [M, C, H, W] uint8
    y_test: np.ndarray  # [M] int64
    classes: list[str]
    augment: bool = False  # pad-4 random crop + horizontal flip during training
    source: str = ""  # where it came from, recorded in provenance
    mean: np.ndarray = field(init=False)  # [C] per-channel mean of the training images, in [0, 1]
    std: np.ndarray = field(init=False)  # [C]

    def __post_init__(self) -> None:
        for key in ("x_train", "x_test"):
            arr = getattr(self, key)
            if arr.dtype != np.uint8 or arr.ndim != 4:
                raise ValueError(f"{key} must be uint8 [N, C, H, W]; got {arr.dtype} {arr.shape}")
        self.y_train = np.asarray(self.y_train, dtype=np.int64)
        self.y_test = np.asarray(self.y_test, dtype=np.int64)
        x = self.x_train.astype(np.float64) / 255.0
        self.mean = x.mean(axis=(0, 2, 3))
        self.std = x.std(axis=(0, 2, 3)) + 1e-8

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def subset(self, train_limit: int | None) -> ImageArrays:
        """The same dataset with only the first ``train_limit`` training images (None: all).

        Every loader keeps its splits in a shuffled order, so the first N images cover the classes
        in proportion. Mean and std are those of the subset: the images a model is trained on
        define its normalisation. The test split is unchanged.

        Example:
            >>> ds = ImageArrays("toy", np.zeros((4, 1, 2, 2), np.uint8), np.arange(4) % 2,
            ...                  np.zeros((2, 1, 2, 2), np.uint8), np.arange(2), ["a", "b"])
            >>> len(ds.subset(3).y_train), len(ds.subset(None).y_train)
            (3, 4)
        """
        n = len(self.y_train)
        if train_limit is None or train_limit == n:
            return self
        if (
            isinstance(train_limit, bool)
            or not isinstance(train_limit, int)
            or not 0 < train_limit <= n
        ):
            raise ProbeError(
                f"train_limit must be an integer between 1 and {n} (the training images of "
                f"{self.name!r}); got {train_limit!r}. Leave it unset to train on all of them."
            )
        return dataclasses.replace(
            self, x_train=self.x_train[:train_limit], y_train=self.y_train[:train_limit]
        )

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """The (images, labels) of ``which`` in {'train', 'test'}."""
        return (self.x_train, self.y_train) if which == "train" else (self.x_test, self.y_test)
