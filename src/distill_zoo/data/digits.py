"""The embedded default data set: scikit-learn's handwritten digits, held in memory."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.base import split_indices
from distill_zoo.data.device import InMemoryDataModule

TEST_FRACTION = 0.2
TEST_SEED = 0  # the test split is fixed, like an official one, whatever the run's seed


class DigitsDataModule(InMemoryDataModule):
    """Handwritten digits (UCI "Optical Recognition of Handwritten Digits", Alpaydin & Kaynak
    1998, as shipped by scikit-learn's ``load_digits``): 1,797 real 8x8 grey images with values
    0..16, 10 classes, no download.

    A stratified 20% test split is fixed (seed 0, whatever ``seed``); ``val_fraction`` of the
    rest is held out for validation with ``seed``. Images are upsampled once to ``image_size``
    (bilinear) because some zoo CNNs (VGG with four max-pools) need 16x16, scaled to [0, 1]
    and normalised with the training split's mean and std. Training augmentation is a random
    crop with ``image_size // 8`` pixels of zero padding (2 at 16x16); no horizontal flip,
    since digits are not mirror-invariant. Batches come from DataLoaders, or with
    ``on_device`` are built on the training device
    (:class:`~distill_zoo.data.device.InMemoryDataModule`).

    Args:
        image_size: Side of the square images after upsampling, at least 8.
        val_fraction: Share of the non-test images held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Samples per batch.
        num_workers: Loader worker processes; 0 suits data this small.
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the data set on the training device and build batches there.
        shuffle_seed: Seed of the on-device order and augmentation.
        augment_rounds: Replay this many fixed augmentation rounds (FKD); ``None``: fresh
            crops every epoch.
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        *,
        image_size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        drop_last: bool = False,
        on_device: bool = False,
        shuffle_seed: int = 0,
        augment_rounds: int | None = None,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            on_device=on_device,
            shuffle_seed=shuffle_seed,
            augment_rounds=augment_rounds,
        )
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 (digits are 8x8), got {image_size}")
        self.image_size = (image_size, image_size)
        self.class_names = [str(digit) for digit in range(10)]

    def load_sources(self) -> tuple[Dataset, np.ndarray, Dataset]:
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        targets = torch.from_numpy(digits.target).long()
        pool, test = split_indices(digits.target, TEST_FRACTION, TEST_SEED)
        return (
            TensorDataset(images[pool], targets[pool]),
            digits.target[pool],
            TensorDataset(images[test], targets[test]),
        )

    def crop_flip(self, pool: TensorDataset, train_positions: np.ndarray) -> CropFlip:
        train_images = pool.tensors[0][train_positions]
        # Zero padding is the background; no flip.
        return CropFlip(
            padding=self.image_size[0] // 8,
            mean=(train_images.mean().item(),),
            std=(train_images.std().item(),),
        )
