"""PASCAL VOC (Everingham et al., IJCV 2010) segmentation and detection, read with
torchvision's ``VOCSegmentation`` / ``VOCDetection`` from an extracted
``<root>/VOCdevkit/VOC2012/`` (never downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import VOCDetection, VOCSegmentation, wrap_dataset_for_transforms_v2
from torchvision.transforms.v2 import functional as F

from distill_zoo.data.dense_transforms import (
    DetectionDataModule,
    DetectionTarget,
    SegmentationDataModule,
    detection_target,
    no_classes,
    raise_if_missing,
)

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 20 VOC object classes, ids 1..20 in this order (0 is the background)."""

VOC_CLASS_NAMES = ("background", *VOC_CLASSES)


class _VOCMasks(Dataset):
    """VOCSegmentation items as ``(Image uint8 [3, H, W], Mask uint8 [H, W])``: the palette
    indices of ``SegmentationClass/*.png`` (0..20, and 255 on object borders)."""

    def __init__(self, dataset: VOCSegmentation) -> None:
        self.dataset = wrap_dataset_for_transforms_v2(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image, mask = self.dataset[index]  # mask: [1, H, W]
        return tv_tensors.Image(F.pil_to_tensor(image)), tv_tensors.Mask(mask.squeeze(0))


class _VOCBoxes(Dataset):
    """VOCDetection items as ``(Image uint8 [3, H, W], {"boxes", "labels"})``: boxes are the
    XML's ``(xmin, ymin, xmax, ymax)`` as written (torchvision's convention), labels the
    1-based position of the name in :data:`VOC_CLASSES`; objects marked ``difficult`` are
    dropped unless ``keep_difficult``."""

    def __init__(self, dataset: VOCDetection, keep_difficult: bool) -> None:
        self.dataset = dataset
        self.keep_difficult = keep_difficult

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, DetectionTarget]:
        image, annotation = self.dataset[index]
        image = tv_tensors.Image(F.pil_to_tensor(image))
        boxes, labels = [], []
        for obj in annotation["annotation"].get("object", []):
            if not self.keep_difficult and int(obj.get("difficult", 0)):
                continue
            name = obj["name"].strip()
            if name not in VOC_CLASSES:
                raise ValueError(
                    f"{self.dataset.annotations[index]}: unknown VOC class {name!r}; expected "
                    f"one of {', '.join(VOC_CLASSES)}"
                )
            box = obj["bndbox"]
            boxes.append([float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(VOC_CLASSES.index(name) + 1)
        return image, detection_target(boxes, labels, tuple(image.shape[-2:]))


class _VOCFiles:
    """What the VOC DataModules share: the files of ``<root>/VOCdevkit/VOC{year}/``, two of
    its image sets (the training pool and the test split) and the classes.

    Subclasses set ``_folders`` (the folders they read) and ``_image_set_dir`` (the folder
    of their image set lists under ``ImageSets/``), and implement :meth:`_read`.
    """

    num_classes = len(VOC_CLASS_NAMES)
    _folders: tuple[str, ...]
    _image_set_dir: str

    def _set_files(self, root: str, year: str, train_set: str, test_set: str) -> None:
        self.root = Path(root).expanduser()
        self.year = str(year)
        self.train_set_name, self.test_set_name = train_set, test_set
        self.class_names = list(VOC_CLASS_NAMES)

    def _read(self, image_set: str) -> Dataset:
        """The images (and targets) of ``image_set``."""
        raise NotImplementedError

    def check_files(self) -> None:
        base = self.root / "VOCdevkit" / f"VOC{self.year}"
        image_sets = (self.train_set_name, self.test_set_name)
        expected = [base / f for f in self._folders] + [
            base / "ImageSets" / self._image_set_dir / f"{s}.txt" for s in image_sets
        ]
        raise_if_missing(
            type(self).__name__,
            [p for p in expected if not p.exists()],
            f"Expected <root>/VOCdevkit/VOC{self.year}/{{{','.join(self._folders)}}} and "
            f"<root>/VOCdevkit/VOC{self.year}/ImageSets/{self._image_set_dir}/{{"
            f"{','.join(f'{s}.txt' for s in image_sets)}}} with root={self.root.absolute()}. "
            f"Download the VOC{self.year} trainval archive (VOCtrainval_*.tar) from the "
            "official site (http://host.robots.ox.ac.uk/pascal/VOC/) and extract it under "
            "data.root (or $DISTILL_ZOO_DATA/voc), so that data.root holds VOCdevkit/; nothing "
            "is downloaded for you.",
        )

    def load_sources(self) -> tuple[Dataset, np.ndarray, Dataset]:
        pool = self._read(self.train_set_name)
        return pool, no_classes(pool), self._read(self.test_set_name)


class VOCSegmentationDataModule(_VOCFiles, SegmentationDataModule):
    """PASCAL VOC 2012 semantic segmentation: 21 classes (0 = background, 1..20 the objects of
    :data:`VOC_CLASSES`), border pixels 255 (ignored).

    Files: ``<root>/VOCdevkit/VOC{year}/JPEGImages/*.jpg``, ``SegmentationClass/*.png``
    (palette PNGs) and ``ImageSets/Segmentation/{train_set,test_set}.txt``. The official
    ``train`` list (1,464 images) is the training pool, from which ``val_fraction`` is held
    out for model selection; the official ``val`` list (1,449) is the test split. (The SBD
    "trainaug" set is not read.) Training: RandomResizedCrop to ``image_size`` and horizontal
    flip; evaluation: Resize to ``image_size`` (metrics are computed at that size). Images are
    normalised with the ImageNet mean and std.

    Args:
        root: Folder holding ``VOCdevkit/``.
        year: VOC release, ``"2007"``..``"2012"``.
        train_set: Image set of the training pool.
        test_set: Image set of the test split.
        image_size: ``(H, W)`` or one int for a square.
        crop_scale: Area share range of the training crop.
        val_fraction: Share of the training pool held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Images per batch.
        num_workers: Loader worker processes.
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Must stay ``False``.
    """

    _folders = ("JPEGImages", "SegmentationClass")
    _image_set_dir = "Segmentation"

    def __init__(
        self,
        *,
        root: str,
        year: str = "2012",
        train_set: str = "train",
        test_set: str = "val",
        image_size: int | Sequence[int] = 512,
        crop_scale: Sequence[float] = (0.25, 1.0),
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 4,
        drop_last: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size,
            crop_scale=crop_scale,
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            on_device=on_device,
        )
        self._set_files(root, year, train_set, test_set)

    def _read(self, image_set: str) -> _VOCMasks:
        return _VOCMasks(VOCSegmentation(self.root, self.year, image_set, download=False))


class VOCDetectionDataModule(_VOCFiles, DetectionDataModule):
    """PASCAL VOC 2012 object detection: 21 classes (0 = background, 1..20 the objects of
    :data:`VOC_CLASSES`).

    Files: ``<root>/VOCdevkit/VOC{year}/JPEGImages/*.jpg``, ``Annotations/*.xml`` and
    ``ImageSets/Main/{train_set,test_set}.txt``. The official ``train`` list (5,717 images) is
    the training pool, from which ``val_fraction`` is held out; the official ``val`` list
    (5,823) is the test split. Objects marked ``difficult`` are kept by default (as
    detectron2 trains) and then count as ordinary objects in mAP, unlike the official VOC
    evaluation, which ignores them; ``keep_difficult=False`` drops them from every split.
    Boxes are the XML's pixel coordinates (torchvision's convention), moved with the image.
    Images with no (kept) objects yield empty targets.

    Args:
        root: Folder holding ``VOCdevkit/``.
        year: VOC release, ``"2007"``..``"2012"``.
        train_set: Image set of the training pool.
        test_set: Image set of the test split.
        keep_difficult: Whether objects marked ``difficult`` are kept.
        image_size: ``(H, W)`` or one int for a square.
        crop_scale: Area share range of the training crop.
        val_fraction: Share of the training pool held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Images per batch.
        num_workers: Loader worker processes.
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Must stay ``False``.
    """

    _folders = ("JPEGImages", "Annotations")
    _image_set_dir = "Main"

    def __init__(
        self,
        *,
        root: str,
        year: str = "2012",
        train_set: str = "train",
        test_set: str = "val",
        keep_difficult: bool = True,
        image_size: int | Sequence[int] = 512,
        crop_scale: Sequence[float] = (0.5, 1.0),
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 4,
        drop_last: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size,
            crop_scale=crop_scale,
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            on_device=on_device,
        )
        self._set_files(root, year, train_set, test_set)
        self.keep_difficult = keep_difficult

    def _read(self, image_set: str) -> _VOCBoxes:
        dataset = VOCDetection(self.root, self.year, image_set, download=False)
        return _VOCBoxes(dataset, self.keep_difficult)
