"""MS COCO (Lin et al., ECCV 2014) object detection from an instances JSON and its image
folder, read with torchvision's ``CocoDetection`` (pycocotools); never downloaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection
from torchvision.transforms.v2 import functional as F

from distill_zoo.data.dense_transforms import (
    DetectionDataModule,
    DetectionTarget,
    detection_target,
    no_classes,
    raise_if_missing,
)


class _CocoBoxes(Dataset):
    """CocoDetection items as ``(Image uint8 [3, H, W], {"boxes", "labels"})``: crowd
    annotations dropped, ``bbox`` (x, y, w, h) turned into (x1, y1, x2, y2), category ids
    mapped through ``label_of``."""

    def __init__(self, dataset: CocoDetection, label_of: dict[int, int], source: str) -> None:
        self.dataset = dataset
        self.label_of = label_of
        self.source = source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, DetectionTarget]:
        image, annotations = self.dataset[index]
        image = tv_tensors.Image(F.pil_to_tensor(image))
        boxes, labels = [], []
        for ann in annotations:
            if ann.get("iscrowd", 0):
                continue
            category = ann["category_id"]
            if category not in self.label_of:
                raise ValueError(
                    f"{self.source}: annotation {ann.get('id')} has category_id {category}, "
                    "which is not among the training file's categories"
                )
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[category])
        return image, detection_target(boxes, labels, tuple(image.shape[-2:]))


class COCODetectionDataModule(DetectionDataModule):
    """COCO-format object detection (COCO 2017 by default: 80 categories, so
    ``num_classes = 81`` with background 0).

    Files (paths relative to ``root``, or absolute): the training images folder and its
    instances JSON (``train2017/``, ``annotations/instances_train2017.json``: 118,287 images)
    are the training pool, from which ``val_fraction`` is held out; the official validation
    images and JSON (``val2017/``, ``annotations/instances_val2017.json``: 5,000 images) are
    the test split. Category ids (COCO's run 1..90 with gaps) are mapped to contiguous labels
    ``1..K`` in sorted category-id order of the training file (the test file must list the
    same categories); ``class_names[label]`` is the category name, ``class_names[0]``
    ``"background"`` and ``category_ids[label]`` the original id (for converting predictions
    back; ``-1`` for the background). Crowd annotations (``iscrowd=1``) are dropped; boxes go
    from (x, y, w, h) to (x1, y1, x2, y2). Every image is kept: images without annotations
    yield empty targets.
    Any data set in COCO's instances format works (e.g. a custom one exported by a labelling
    tool).

    Args:
        root: Folder the other paths are relative to.
        train_images: Folder of the training images.
        train_annotations: Instances JSON of the training images.
        test_images: Folder of the test images.
        test_annotations: Instances JSON of the test images.
        image_size: ``(H, W)`` or one int for a square.
        crop_scale: Area share range of the training crop.
        val_fraction: Share of the training pool held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Images per batch.
        num_workers: Loader worker processes.
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Must stay ``False``.
    """

    def __init__(
        self,
        *,
        root: str,
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        test_images: str = "val2017",
        test_annotations: str = "annotations/instances_val2017.json",
        image_size: int | Sequence[int] = 640,
        crop_scale: Sequence[float] = (0.5, 1.0),
        val_fraction: float = 0.01,
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
        self.root = Path(root).expanduser()
        self.train_images = self.root / train_images
        self.train_annotations = self.root / train_annotations
        self.test_images = self.root / test_images
        self.test_annotations = self.root / test_annotations

    def check_files(self) -> None:
        expected = {
            self.train_images: "dir",
            self.train_annotations: "file",
            self.test_images: "dir",
            self.test_annotations: "file",
        }
        raise_if_missing(
            type(self).__name__,
            [
                p
                for p, kind in expected.items()
                if not (p.is_dir() if kind == "dir" else p.is_file())
            ],
            "Expected the training images folder and instances JSON (data.train_images, "
            "data.train_annotations) and the test ones (data.test_images, "
            f"data.test_annotations), relative to data.root={self.root.absolute()}: by default "
            "<root>/train2017/, <root>/val2017/ and "
            "<root>/annotations/instances_{train,val}2017.json. Download train2017.zip, "
            "val2017.zip and annotations_trainval2017.zip from https://cocodataset.org/#download "
            "and extract them under data.root (or $DISTILL_ZOO_DATA/coco); nothing is "
            "downloaded for you.",
        )

    def load_sources(self) -> tuple[Dataset, np.ndarray, Dataset]:
        pool = CocoDetection(str(self.train_images), str(self.train_annotations))
        test = CocoDetection(str(self.test_images), str(self.test_annotations))
        categories = _categories(pool, self.train_annotations)
        if _categories(test, self.test_annotations) != categories:
            raise ValueError(
                f"{self.test_annotations} and {self.train_annotations} list different "
                "categories (ids and names must match)"
            )
        self.category_ids = [-1, *(c for c, _ in categories)]
        self.class_names = ["background", *(name for _, name in categories)]
        self.num_classes = len(self.class_names)
        label_of = {c: label for label, c in enumerate(self.category_ids) if label}
        return (
            _CocoBoxes(pool, label_of, str(self.train_annotations)),
            no_classes(pool),
            _CocoBoxes(test, label_of, str(self.test_annotations)),
        )


def _categories(dataset: CocoDetection, source: Any) -> list[tuple[int, str]]:
    """``(category id, name)`` of every category, in sorted id order."""
    categories = sorted((int(c["id"]), str(c["name"])) for c in dataset.coco.cats.values())
    if not categories:
        raise ValueError(f"{source} lists no categories")
    return categories
