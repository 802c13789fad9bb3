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

__all__ = ["DeviceLoader", "random_crop", "random_flip"]


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset per image. [N, C, H, W] -> same."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [N, W]
    xp = xp.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return xp.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2. [N, C, H, W] -> same."""
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


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
    ) -> None:
        self.device = torch.device(device)
        images = torch.as_tensor(images)[:limit]
        labels = torch.as_tensor(labels)[:limit]
        self.images = images.to(self.device)  # [N, C, H, W] uint8
        self.labels = labels.to(self.device, torch.int64)  # [N]
        c = self.images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.drop_last, self.seed, self.dtype = drop_last, seed, dtype
        self.channels_last = channels_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            x = (self.images[idx].float() / 255.0 - self.mean) / self.std
            if self.augment:
                x = random_flip(random_crop(x, 4, gen), gen)
            x = x.to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx], idx
        self.epoch += 1
