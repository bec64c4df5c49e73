"""Small, learnable random images of any shape, for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from distill_zoo.data.device import InMemoryDataModule


class SyntheticDataModule(InMemoryDataModule):
    """Random images whose class can be learnt: each class has a fixed random pattern (smooth,
    drawn at 4x4 and upsampled, so that small CNNs pick it up quickly) and each image is its
    class's pattern plus Gaussian noise. Everything is drawn from ``seed``; classes are
    balanced. Images are already float and centred, so no transform is applied (on the
    device path, training batches carry augmentation keys of 0).

    Args:
        num_samples: Size of the training pool, before the validation split.
        num_test_samples: Size of the test set.
        num_classes: Number of classes.
        in_channels: Channels per image.
        image_size: Side of square images, or ``(height, width)``.
        noise: Standard deviation of the noise; patterns have unit scale.
        val_fraction: Share of the training pool held out for validation, in (0, 1).
        seed: Seed of the patterns, the noise and the validation split.
        batch_size: Samples per batch.
        num_workers: Loader worker processes (DataLoader path).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the data set on the training device and build batches there.
        shuffle_seed: Seed of the on-device order.
        augment_rounds: Accepted for a uniform interface; without augmentation it changes
            nothing.
    """

    def __init__(
        self,
        *,
        num_samples: int = 256,
        num_test_samples: int = 64,
        num_classes: int = 4,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 16,
        noise: float = 0.5,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
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
        self.num_samples = num_samples
        self.num_test_samples = num_test_samples
        self.num_classes = num_classes
        self.in_channels = in_channels
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.image_size = (int(size[0]), int(size[1]))
        self.noise = noise
        self.class_names = [f"class_{c}" for c in range(num_classes)]

    def load_sources(self) -> tuple[Dataset, torch.Tensor, Dataset]:
        generator = torch.Generator().manual_seed(self.seed)
        coarse = torch.randn(self.num_classes, self.in_channels, 4, 4, generator=generator)
        patterns = F.interpolate(coarse, self.image_size, mode="bilinear", align_corners=False)

        def draw(n: int) -> TensorDataset:
            targets = (torch.arange(n) % self.num_classes)[torch.randperm(n, generator=generator)]
            noise = torch.randn(n, self.in_channels, *self.image_size, generator=generator)
            return TensorDataset(patterns[targets] + self.noise * noise, targets)

        pool = draw(self.num_samples)
        return pool, pool.tensors[1].numpy(), draw(self.num_test_samples)
