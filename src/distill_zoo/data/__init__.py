"""DataModules yielding ``(images, targets, indices)`` batches (training batches on the
on-device path add ``aug_keys``); one file per data set."""

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.base import BaseDataModule, SplitDataset, balanced_subset, split_indices
from distill_zoo.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CifarDataModule
from distill_zoo.data.cifar10_jpeg import CIFAR10JPEGDataModule
from distill_zoo.data.device import IndexBatch, IndexBatches, InMemoryDataModule
from distill_zoo.data.digits import DigitsDataModule
from distill_zoo.data.imagefolder import ImageFolderDataModule
from distill_zoo.data.synthetic import SyntheticDataModule

__all__ = [
    "BaseDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFAR10JPEGDataModule",
    "CifarDataModule",
    "CropFlip",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "IndexBatch",
    "IndexBatches",
    "SplitDataset",
    "SyntheticDataModule",
    "balanced_subset",
    "split_indices",
]
