"""DataModules yielding ``(images, targets, indices)`` batches (training batches on the
on-device path add ``aug_keys``); one file per data set."""

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.base import BaseDataModule, SplitDataset, balanced_subset, split_indices
from distill_zoo.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CifarDataModule
from distill_zoo.data.cifar10_jpeg import CIFAR10JPEGDataModule
from distill_zoo.data.cifar10_scenes import CIFAR10ScenesDataModule
from distill_zoo.data.cityscapes import CityscapesDataModule
from distill_zoo.data.coco import COCODetectionDataModule
from distill_zoo.data.dense_device import InMemoryDenseDataModule, SceneDataModule
from distill_zoo.data.dense_transforms import (
    DenseDataModule,
    DenseSplitDataset,
    DetectionDataModule,
    SegmentationDataModule,
    detection_collate,
)
from distill_zoo.data.device import IndexBatch, IndexBatches, InMemoryDataModule
from distill_zoo.data.digit_pose import DigitPoseDataModule
from distill_zoo.data.digit_scenes import DigitScenesDataModule
from distill_zoo.data.digits import DigitsDataModule
from distill_zoo.data.imagefolder import ImageFolderDataModule
from distill_zoo.data.synthetic import SyntheticDataModule
from distill_zoo.data.tabular import TabularRegressionDataModule
from distill_zoo.data.text import TextDataModule
from distill_zoo.data.voc import VOCDetectionDataModule, VOCSegmentationDataModule

__all__ = [
    "TextDataModule",
    "BaseDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFAR10JPEGDataModule",
    "CIFAR10ScenesDataModule",
    "COCODetectionDataModule",
    "CifarDataModule",
    "CityscapesDataModule",
    "CropFlip",
    "DenseDataModule",
    "DenseSplitDataset",
    "DetectionDataModule",
    "DigitPoseDataModule",
    "DigitScenesDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "InMemoryDenseDataModule",
    "IndexBatch",
    "IndexBatches",
    "SceneDataModule",
    "SegmentationDataModule",
    "SplitDataset",
    "SyntheticDataModule",
    "TabularRegressionDataModule",
    "VOCDetectionDataModule",
    "VOCSegmentationDataModule",
    "balanced_subset",
    "detection_collate",
    "split_indices",
]
