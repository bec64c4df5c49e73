"""Batched random crop with zero padding, horizontal flip and normalisation, on any device.

The standard CIFAR training pipeline of the KD literature, ``RandomCrop(size, padding=p)``,
``RandomHorizontalFlip()``, ``ToDtype(float32, scale=True)`` (for uint8 images) and
``Normalize(mean, std)``, is applied here to a whole batch at once: one gather reads every
output pixel from the stored data set, so there is no Python loop over samples and the work
runs wherever the data set lives (the GPU for the on-device path).

A sample's augmentation is one integer, its *key*. With padding ``p`` (``S = 2p + 1``
offsets per axis), ``key = (flip * S + offset_y) * S + offset_x``, where the offsets are the
top-left corner of the crop in the padded image (``0..2p``) and ``flip`` is 0 or 1. Keys
identify augmented views exactly, so a cache of teacher outputs can be keyed by
``(index, key)`` (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.transforms import v2

from distill_zoo.data.base import Transform


@dataclass(frozen=True)
class CropFlip:
    """One data set's training augmentation and normalisation, applied batch-wise.

    Matches, in distribution and (for given offsets and flips) pixel for pixel, the
    torchvision pipeline that :meth:`torchvision_transforms` builds: zero padding in the raw
    (un-normalised) image, a crop of the image's own size, an optional horizontal flip, then
    ``/ 255`` for uint8 images and ``Normalize(mean, std)``.

    Args:
        padding: Pixels of zero padding on each side before the random crop; 0: no crop.
        flip: Whether to flip horizontally with probability 0.5 (not for digits or text).
        mean: Per-channel mean of ``Normalize``, in [0, 1] units; ``None``: no normalisation.
        std: Per-channel standard deviation of ``Normalize``; ``None`` with ``mean``.
    """

    padding: int = 0
    flip: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    _constants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")

    @property
    def side(self) -> int:
        """Possible crop offsets per axis, ``2 * padding + 1``."""
        return 2 * self.padding + 1

    @property
    def num_keys(self) -> int:
        """Number of distinct augmented views of one image."""
        return (2 if self.flip else 1) * self.side**2

    # --- keys --------------------------------------------------------------------------------

    def encode(self, offset_y: Tensor, offset_x: Tensor, flip: Tensor) -> Tensor:
        """Keys (int64) of the given crop offsets (``0..2p``) and flips (0 or 1)."""
        return (flip.long() * self.side + offset_y.long()) * self.side + offset_x.long()

    def decode(self, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Crop offsets (top-left in the padded image) and flips of ``keys``."""
        side = self.side
        return (keys // side) % side, keys % side, keys // (side * side)

    def sample_keys(self, n: int, generator: torch.Generator) -> Tensor:
        """Keys of ``n`` independent draws, distributed as torchvision's ``RandomCrop`` and
        ``RandomHorizontalFlip`` draw them (uniform offsets, flip with probability 0.5).

        Args:
            n: Number of keys.
            generator: CPU generator; the keys depend on it alone.
        """
        zeros = torch.zeros(n, dtype=torch.long)
        if self.padding == 0 and not self.flip:
            return zeros
        offset_y = torch.randint(0, self.side, (n,), generator=generator)
        offset_x = torch.randint(0, self.side, (n,), generator=generator)
        flip = torch.randint(0, 2, (n,), generator=generator) if self.flip else zeros
        return self.encode(offset_y, offset_x, flip)

    # --- images ------------------------------------------------------------------------------

    def apply(self, images: Tensor, rows: Tensor, keys: Tensor) -> Tensor:
        """The augmented, normalised batch of ``images[rows]``, each sample cropped and flipped
        as its key says, in one gather.

        Args:
            images: The stored data set, ``[N, C, H, W]`` (uint8 or float), on any device.
            rows: Rows of ``images`` in the batch, int64 ``[B]``, on the same device.
            keys: Augmentation key of each sample, int64 ``[B]``, on the same device.

        Returns:
            Contiguous float32 ``[B, C, H, W]``.
        """
        _, channels, height, width = images.shape
        offset_y, offset_x, flip = self.decode(keys)
        ys = torch.arange(height, device=images.device)
        xs = torch.arange(width, device=images.device)
        # Output pixel (i, j) of a crop at (oy, ox) of the padded image, flipped or not, reads
        # input pixel (i + oy - p, j' + ox - p) with j' = W - 1 - j when flipped, else j.
        src_y = ys + offset_y[:, None] - self.padding  # [B, H]
        cols = torch.where(flip[:, None].bool(), width - 1 - xs, xs)
        src_x = cols + offset_x[:, None] - self.padding  # [B, W]
        inside = ((src_y >= 0) & (src_y < height))[:, :, None] & ((src_x >= 0) & (src_x < width))[
            :, None, :
        ]
        batch = images[
            rows[:, None, None, None],
            torch.arange(channels, device=images.device)[None, :, None, None],
            src_y.clamp(0, height - 1)[:, None, :, None],
            src_x.clamp(0, width - 1)[:, None, None, :],
        ]
        batch = batch.masked_fill_(~inside[:, None], 0)  # the zero padding, in raw units
        return self.normalise(batch)

    def normalise(self, batch: Tensor) -> Tensor:
        """``batch`` as float32, scaled by 1/255 if uint8, and normalised (the evaluation
        transform), with torchvision's arithmetic."""
        if batch.is_floating_point():
            batch = batch.to(torch.float32)
        else:
            if batch.dtype != torch.uint8:
                raise TypeError(f"images must be uint8 or float, got {batch.dtype}")
            batch = batch.to(torch.float32).mul_(1.0 / 255)
        if self.mean is None:
            return batch.contiguous()
        mean, std = self._mean_std(batch.device)
        return batch.sub(mean).div_(std)

    def _mean_std(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Made once per device: a fresh host-to-device copy each batch would synchronise.
        key = str(device)
        if key not in self._constants:
            self._constants[key] = tuple(
                torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)
                for values in (self.mean, self.std)
            )
        return self._constants[key]

    # --- the torchvision reference -----------------------------------------------------------

    def torchvision_transforms(
        self, size: tuple[int, int], *, scale: bool
    ) -> tuple[Transform | None, Transform | None]:
        """The per-image torchvision training and evaluation pipelines this augmentation
        reproduces (``None`` where a pipeline would do nothing).

        Args:
            size: Image height and width (crops keep the image's size).
            scale: Whether images are uint8 and need ``ToDtype(float32, scale=True)``.
        """
        to_float = [v2.ToDtype(torch.float32, scale=True)] if scale else []
        if self.mean is not None:
            to_float.append(v2.Normalize(list(self.mean), list(self.std)))
        train = [v2.RandomCrop(size, padding=self.padding)] if self.padding else []
        if self.flip:
            train.append(v2.RandomHorizontalFlip())
        train += to_float
        return (
            v2.Compose(train) if train else None,
            v2.Compose(to_float) if to_float else None,
        )
