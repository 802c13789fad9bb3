"""A GPU-resident loader: the dataset lives on the device as uint8; normalisation and augmentation
(pad-4 random crop + horizontal flip) run on the device, deterministic for a given seed.

Keeping data on the device removes host-device copies and Python-side decoding from the training
loop, which is what makes minutes-scale CIFAR studies possible (cf. airbench).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from probe.errors import ProbeError

__all__ = ["DeviceLoader", "random_crop", "random_flip", "even_split"]


def even_split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each of ``parts`` contiguous pieces of ``range(n)``, in order, sizes
    differing by at most one (the first ``n % parts`` pieces get one more).

    Example:
        >>> even_split(5, 2)
        [(0, 3), (3, 5)]
    """
    base, extra = divmod(n, parts)
    stops = [(k + 1) * base + min(k + 1, extra) for k in range(parts)]
    return list(zip([0, *stops[:-1]], stops))


def _crop_at(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [N, W]
    xp = xp.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return xp.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _crop_offsets(n: int, pad: int, gen: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=gen)
    return dy, dx


def _flips(n: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) < 0.5


def _flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset per image. [N, C, H, W] -> same."""
    return _crop_at(x, pad, *_crop_offsets(x.shape[0], pad, gen, x.device))


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2. [N, C, H, W] -> same."""
    return _flip_where(x, _flips(x.shape[0], gen, x.device))


def _one_layout(images: torch.Tensor) -> torch.Tensor:
    """``images`` [N, C, H, W] in one layout whatever array they came from: one-channel images
    with channels-last strides, others in the standard layout.

    A one-channel tensor is contiguous in both layouts (the same bytes), and its strides alone
    decide which one a convolution takes, and so the rounding of every layer after it: a split
    made by numpy's indexing gave channels-last strides, the same images read back from a file
    the standard ones, and the two trained apart (digits, two runs of one seed). Channels-last is
    the layout every earlier run of one-channel data had, and on a 2-core CPU it trained a digits
    ResNet-20 13 % faster (docs/performance.md)."""
    if images.ndim != 4:
        return images
    layout = torch.channels_last if images.shape[1] == 1 else torch.contiguous_format
    ready = images.is_contiguous(memory_format=layout) and (
        images.shape[1] != 1 or images.stride(1) == 1
    )
    return images if ready else images.clone(memory_format=layout)


class DeviceLoader:
    """Iterate (images, labels, indices) batches from uint8 arrays held on ``device``.

    Images are normalised with the per-channel ``mean``/``std`` (values in [0, 1]); with
    ``augment`` they are padded by 4 (zeros after normalisation, i.e. the mean colour), randomly
    cropped and flipped. The order and augmentation of epoch ``e`` depend only on ``seed`` and ``e``.

    Example:
        >>> x = np.zeros((10, 1, 8, 8), np.uint8); y = np.arange(10)
        >>> loader = DeviceLoader(x, y, batch_size=4, mean=[0.5], std=[0.5])
        >>> [b[0].shape[0] for b in loader]
        [4, 4, 2]
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        mean,
        std,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        limit: int | None = None,
        part: tuple[int, int] = (0, 1),
        index_offset: int = 0,
    ) -> None:
        self.device = torch.device(device)
        images = torch.as_tensor(images)[:limit]
        labels = torch.as_tensor(labels)[:limit]
        self.images = _one_layout(images.to(self.device))  # [N, C, H, W] uint8
        self.labels = labels.to(self.device, torch.int64)  # [N]
        c = self.images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.drop_last, self.seed, self.dtype = drop_last, seed, dtype
        self.channels_last = channels_last
        self.part, self.index_offset = part, index_offset
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_samples(self, k: int) -> int:
        """Samples in global batch ``k`` (over every rank's part)."""
        return min(self.batch_size, len(self.labels) - k * self.batch_size)

    def shard(self, start: int, stop: int) -> DeviceLoader:
        """The same ordered loader over samples ``[start, stop)`` only, yielding their indices in
        this loader's numbering (no copy: the images stay where they are)."""
        if self.shuffle or self.augment:
            raise ProbeError(
                "A shuffled or augmented loader has no fixed order of samples to shard; shard a "
                "loader made with shuffle=False, augment=False (probe.loading.capture_loader)."
            )
        out = DeviceLoader.__new__(DeviceLoader)
        out.__dict__.update(self.__dict__)
        out.images, out.labels = self.images[start:stop], self.labels[start:stop]
        out.index_offset = self.index_offset + start
        return out

    def sample(self, position: int) -> torch.Tensor:
        """The normalised image at ``position``, as a batch of one. [1, C, H, W]"""
        return self._output(self._normalised(self.images[position : position + 1]))

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _generator(self) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        return gen

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        gen = self._generator()
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=gen)
        else:
            order = torch.arange(n, device=self.device)
        rank, ranks = self.part
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            start, stop = even_split(len(idx), ranks)[rank]
            if self.augment:  # drawn for the whole batch, so every split sees the same draws
                dy, dx = _crop_offsets(len(idx), 4, gen, self.device)
                flips = _flips(len(idx), gen, self.device)
            idx = idx[start:stop]
            x = self._normalised(self.images[idx])
            if self.augment:
                x = _flip_where(_crop_at(x, 4, dy[start:stop], dx[start:stop]), flips[start:stop])
            yield (
                self._output(x),
                self.labels[idx],
                idx + self.index_offset if self.index_offset else idx,
            )
        self.epoch += 1
