"""Any ``root/{train,val}/<class>/<image>`` tree (ImageNet, Tiny-ImageNet) via ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from distill_zoo.data.base import BaseDataModule, Transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(BaseDataModule):
    """Images in class folders, with the standard ImageNet (Deng et al. 2009) recipe.

    ``root/train/`` is the training pool, from which ``val_fraction`` is held out for model
    selection; ``root/val/`` (ImageNet's official validation set) serves as the test split.
    The default 0.02 holds out about 25,600 ImageNet images (about 26 per class) or 2,000
    Tiny-ImageNet images (10 per class). Both ``val/`` folders must first be sorted into class
    folders (ImageNet's ship flat; Tiny-ImageNet's come with ``val_annotations.txt``).
    Training: RandomResizedCrop(image_size) and RandomHorizontalFlip; evaluation:
    Resize(image_size * 256 / 224) and CenterCrop(image_size); both then scale to [0, 1] and
    normalise with the ImageNet mean and std.

    Args:
        root: Folder holding ``train/`` and ``val/``.
        image_size: Side of the square crops fed to the model.
        val_fraction: Share of ``train/`` held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Samples per batch (per process under DDP).
        num_workers: Loader worker processes, which decode the images.
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Must stay ``False``: images are decoded from files by DataLoader workers
            (pinned memory, persistent workers); only in-memory data sets have an on-device
            path.
    """

    in_channels = 3

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 224,
        val_fraction: float = 0.02,
        seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 4,
        drop_last: bool = False,
        on_device: bool = False,
    ) -> None:
        if on_device:
            raise ValueError(
                "ImageFolderDataModule decodes image files in DataLoader workers and has no "
                "on-device path (the data set does not fit in memory): set "
                "data.on_device=false. In-memory data sets (cifar10, cifar100, cifar10_jpeg, "
                "digits, synthetic) have one."
            )
        super().__init__(
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
        )
        self.root = Path(root).expanduser()
        self.image_size = (image_size, image_size)

    def prepare_data(self) -> None:
        """Checks that the folder layout is there."""
        missing = [split for split in ("train", "val") if not (self.root / split).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"ImageFolderDataModule: {self.root.absolute()} lacks {' and '.join(missing)}/; "
                "expected root/train/<class>/<image> and root/val/<class>/<image>, with the "
                "same class folders in both. Point data.root at such a folder."
            )

    def load_sources(self) -> tuple[Dataset, list[int], Dataset]:
        self.prepare_data()
        pool, test = ImageFolder(self.root / "train"), ImageFolder(self.root / "val")
        if test.classes != pool.classes:
            raise ValueError(f"{self.root}/val/ and {self.root}/train/ have different classes")
        self.class_names = pool.classes
        self.num_classes = len(pool.classes)
        return pool, pool.targets, test

    def build_transforms(
        self, pool: Dataset, train_positions: np.ndarray
    ) -> tuple[Transform, Transform]:
        size = self.image_size[0]
        to_float = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
        train = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *to_float])
        evaluate = v2.Compose([v2.Resize(int(size * 256 / 224)), v2.CenterCrop(size), *to_float])
        return train, evaluate
