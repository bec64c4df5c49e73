"""What the dense-prediction DataModules (segmentation, detection) share: joint image / mask /
box pipelines built from ``torchvision.transforms.v2``, the split data set that applies them,
the detection collate, and :class:`DenseDataModule`, their common base.

Samples travel through the pipelines as ``tv_tensors``: the image as ``Image`` (uint8
``[3, H, W]``), a segmentation target as ``Mask`` (``[H, W]``), a detection target as a dict
``{"boxes": BoundingBoxes (XYXY, absolute pixels), "labels": int64 [N]}``. Every geometric
transform therefore moves image, mask and boxes together, masks are resampled with nearest
neighbours (labels never blend), and boxes are clipped to each crop and dropped once degenerate
(``v2.SanitizeBoundingBoxes``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from distill_zoo.data.base import BaseDataModule, SplitDataset, split_indices
from distill_zoo.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
"""Mask value of pixels that count for neither the loss nor the metrics."""

JointTransform = Callable[[Any, Any], tuple[Any, Any]]
DetectionTarget = dict[str, Tensor]


def as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``: an int gives a square."""
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or [H, W], got {image_size!r}")
    return size  # type: ignore[return-value]


def _crop_params(
    size: tuple[int, int], crop_scale: Sequence[float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Scale range and aspect-ratio range of a RandomResizedCrop to ``size``: crops keep the
    target's aspect ratio within a factor 4/3, so objects are not squashed when the target is
    not square (Cityscapes' 1:2)."""
    scale = tuple(float(s) for s in crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(
            f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {crop_scale}"
        )
    aspect = size[1] / size[0]
    return scale, (aspect * 3 / 4, aspect * 4 / 3)  # type: ignore[return-value]


def _geometry(
    image_size: int | Sequence[int], train: bool, crop_scale: Sequence[float]
) -> list[v2.Transform]:
    """Training: RandomResizedCrop to ``image_size`` (area share ``crop_scale``, aspect ratio
    of ``image_size`` within 3/4..4/3) and RandomHorizontalFlip; evaluation: Resize to
    ``image_size``."""
    size = as_size(image_size)
    if not train:
        return [v2.Resize(size, antialias=True)]
    scale, ratio = _crop_params(size, crop_scale)
    return [
        v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True),
        v2.RandomHorizontalFlip(),
    ]


def segmentation_transforms(
    image_size: int | Sequence[int],
    *,
    train: bool,
    crop_scale: Sequence[float] = (0.25, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Joint pipeline for ``(Image, Mask)`` samples.

    Training: RandomResizedCrop to ``image_size`` (area share ``crop_scale``, aspect ratio of
    ``image_size`` within 3/4..4/3) and RandomHorizontalFlip; evaluation: Resize to
    ``image_size``. Then the image is scaled to [0, 1] float32 and normalised with ``mean`` /
    ``std``; the mask becomes int64 with its values (and the ignore value 255) untouched.
    """
    return v2.Compose(
        [
            *_geometry(image_size, train, crop_scale),
            v2.ToDtype(
                {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                scale=True,
            ),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def detection_transforms(
    image_size: int | Sequence[int],
    *,
    train: bool,
    crop_scale: Sequence[float] = (0.5, 1.0),
) -> v2.Compose:
    """Joint pipeline for ``(Image, {"boxes", "labels"})`` samples.

    Training: RandomResizedCrop to ``image_size`` (as in :func:`segmentation_transforms`) and
    RandomHorizontalFlip; evaluation: Resize to ``image_size``. Boxes follow the image, are
    clipped to it, and boxes (with their labels) narrower or shorter than 1 pixel or under
    1 pixel of area are removed. The image is scaled to [0, 1] float32 and *not* normalised:
    torchvision detectors normalise inside the model.
    """
    return v2.Compose(
        [
            *_geometry(image_size, train, crop_scale),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(),
            v2.ToDtype(torch.float32, scale=True),  # images only
        ]
    )


def detection_target(boxes: Any, labels: Any, canvas_size: tuple[int, int]) -> DetectionTarget:
    """A detection target in pipeline form: XYXY float32 ``BoundingBoxes`` on a canvas of
    ``(H, W)`` pixels (``[0, 4]`` when there are no objects) and int64 labels."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas_size),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
    }


def no_classes(pool: Dataset) -> np.ndarray:
    """One label, 0, per image of ``pool``: the labels :meth:`DenseDataModule.load_sources`
    returns when images have no single class, so the validation split is uniform."""
    return np.zeros(len(pool), dtype=np.int64)


def raise_if_missing(module: str, missing: Sequence[Path], advice: str) -> None:
    """Raises ``FileNotFoundError("<module>: missing <absolute paths>. <advice>")`` unless
    ``missing`` is empty."""
    if missing:
        raise FileNotFoundError(
            f"{module}: missing {', '.join(str(p.absolute()) for p in missing)}. {advice}"
        )


def _plain(value: Any) -> Any:
    """Strips the ``tv_tensors`` subclass (and any nesting in dicts): batches hold plain
    tensors."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Tensor):
        return value.as_subclass(Tensor)
    return value


class DenseSplitDataset(SplitDataset):
    """One split of a dense source data set, yielding ``(image, target, index)``.

    Like :class:`~distill_zoo.data.base.SplitDataset`, but the transform sees image and target
    together (``transform(image, target)``), so crops and flips move masks and boxes with the
    image. ``index`` is the sample's position within this split.

    Args:
        source: Data set whose items are ``(tv_tensors.Image, Mask or detection dict)``.
        positions: Positions in ``source`` that make up this split; ``None`` for all of it.
        transform: Joint transform; ``None`` for none.
    """

    transform: JointTransform | None

    def __getitem__(self, index: int) -> tuple[Tensor, Any, int]:  # type: ignore[override]
        image, target = self.source[int(self.positions[index])]
        if self.transform is not None:
            image, target = self.transform(image, target)
        return _plain(image), _plain(target), index


def detection_collate(
    batch: Sequence[tuple[Tensor, DetectionTarget, int]],
) -> tuple[Tensor, list[DetectionTarget], Tensor]:
    """Stacks images (all of one size) and indices; keeps targets as a list of dicts, one per
    image, as torchvision detectors take them."""
    images, targets, indices = zip(*batch, strict=True)
    return torch.stack(images), list(targets), torch.as_tensor(indices, dtype=torch.int64)


class DenseDataModule(BaseDataModule):
    """Base of the segmentation and detection DataModules: a training pool read from files, a
    validation split carved from it with a fixed seed (uniformly: images have no single
    class), and the format's official validation split as the test split.

    Subclasses set ``task`` and implement :meth:`check_files` and :meth:`load_sources`. After
    ``setup()``: ``task``, ``num_classes``, ``in_channels`` (3), ``image_size`` (``(H, W)`` of
    every batch), ``input_shape`` (``(3, H, W)``), ``num_train_samples``, ``class_names``
    (index = class id), and ``train_targets = None`` (no per-image class, so CRD needs its
    uniform negative sampling).

    Args:
        image_size: ``(H, W)`` (or one int for a square) every image is cropped/resized to.
        crop_scale: Area share range of the training RandomResizedCrop.
        val_fraction: Share of the training pool held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Images per batch.
        num_workers: Loader worker processes, which decode and augment the images.
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Must stay ``False``: images are decoded from files by loader workers.
    """

    task: str
    in_channels = 3
    on_device = False
    augment_rounds = None

    def __init__(
        self,
        *,
        image_size: int | Sequence[int],
        crop_scale: Sequence[float],
        val_fraction: float,
        seed: int,
        batch_size: int,
        num_workers: int,
        drop_last: bool,
        on_device: bool = False,
    ) -> None:
        if on_device:
            raise ValueError(
                f"{type(self).__name__} decodes image files in DataLoader workers and has no "
                "on-device path: set data.on_device=false."
            )
        super().__init__(
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
        )
        self.image_size = as_size(image_size)
        _crop_params(self.image_size, crop_scale)  # validates early
        self.crop_scale = tuple(float(s) for s in crop_scale)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image."""
        return (self.in_channels, *self.image_size)

    def check_files(self) -> None:
        """Raises ``FileNotFoundError`` naming what to put where when files are missing."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Checks that the files are there (nothing is ever downloaded)."""
        self.check_files()

    def load_sources(self) -> tuple[Dataset, np.ndarray, Dataset]:
        """The training pool, one (dummy) label per pool image, and the test set, each yielding
        ``(tv_tensors.Image, target)``; sets ``num_classes`` and ``class_names``."""
        raise NotImplementedError

    def build_joint_transforms(self) -> tuple[JointTransform, JointTransform]:
        """The training and evaluation joint transforms."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Builds all three splits on the first call; later calls do nothing."""
        if self.train_set is not None:
            return
        self.check_files()
        pool, labels, test = self.load_sources()
        train_positions, val_positions = split_indices(labels, self.val_fraction, self.seed)
        train_transform, eval_transform = self.build_joint_transforms()
        self.val_set = DenseSplitDataset(pool, val_positions, eval_transform)
        self.test_set = DenseSplitDataset(test, None, eval_transform)
        self.num_train_samples = len(train_positions)
        self.train_targets = None
        self.train_set = DenseSplitDataset(pool, train_positions, train_transform)

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """The loaders' collate function; ``None`` for PyTorch's default."""
        return None

    def _loader(self, dataset: Any, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for loaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn(),
        )


class SegmentationDataModule(DenseDataModule):
    """A :class:`DenseDataModule` whose batches are ``(images float32 [B, 3, H, W]``
    normalised with ``mean``/``std``, ``masks int64 [B, H, W]`` with values
    ``0..num_classes-1`` or ``ignore_index`` (255), ``indices int64 [B])``."""

    task = "segmentation"
    ignore_index = IGNORE_INDEX
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def build_joint_transforms(self) -> tuple[JointTransform, JointTransform]:
        def make(train: bool) -> v2.Compose:
            return segmentation_transforms(
                self.image_size,
                train=train,
                crop_scale=self.crop_scale,
                mean=self.mean,
                std=self.std,
            )

        return make(True), make(False)


class DetectionDataModule(DenseDataModule):
    """A :class:`DenseDataModule` whose batches are ``(images float32 [B, 3, H, W]`` in
    [0, 1], ``targets``: a list of B dicts ``{"boxes": float32 [N, 4]`` XYXY pixels of the
    resized image, ``"labels": int64 [N]`` in ``1..num_classes-1}``, ``indices int64 [B])``;
    class 0 is the background."""

    task = "detection"

    def build_joint_transforms(self) -> tuple[JointTransform, JointTransform]:
        return (
            detection_transforms(self.image_size, train=True, crop_scale=self.crop_scale),
            detection_transforms(self.image_size, train=False),
        )

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return detection_collate
