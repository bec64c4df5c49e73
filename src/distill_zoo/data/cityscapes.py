"""Cityscapes (Cordts et al., CVPR 2016) semantic segmentation with the 19 evaluation classes,
read with torchvision's ``Cityscapes`` (fine annotations) from an extracted root; never
downloaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import Cityscapes
from torchvision.transforms.v2 import functional as F

from distill_zoo.data.dense_transforms import (
    IGNORE_INDEX,
    SegmentationDataModule,
    no_classes,
    raise_if_missing,
)

CITYSCAPES_CLASS_NAMES = tuple(
    c.name for c in sorted(Cityscapes.classes, key=lambda c: c.train_id) if 0 <= c.train_id < 255
)
"""The 19 evaluation classes (road, sidewalk, ..., bicycle), index = train id."""


def label_id_to_train_id() -> torch.Tensor:
    """Lookup table (uint8, 256 entries) from Cityscapes label ids (``*_gtFine_labelIds.png``)
    to train ids 0..18, with every other id (void classes, license plate, unknown values)
    mapped to the ignore value 255; the official table of cityscapesScripts' ``labels.py``."""
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
    for c in Cityscapes.classes:
        if 0 <= c.id < 256 and 0 <= c.train_id < 255:
            table[c.id] = c.train_id
    return table


class _CityscapesTrainIds(Dataset):
    """Cityscapes items as ``(Image uint8 [3, H, W], Mask uint8 [H, W])`` of train ids."""

    def __init__(self, dataset: Cityscapes) -> None:
        # torchvision lists the files in os.listdir order, which differs between machines:
        # sort, so positions (and the validation split) are the same everywhere.
        pairs = sorted(zip(dataset.images, dataset.targets, strict=True))
        dataset.images = [image for image, _ in pairs]
        dataset.targets = [target for _, target in pairs]
        missing = [t[0] for _, t in pairs if not Path(t[0]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Cityscapes: {len(missing)} image(s) in {dataset.images_dir} lack their label "
                f"file, e.g. {missing[0]} (each <name>_leftImg8bit.png needs "
                "gtFine/<split>/<city>/<name>_gtFine_labelIds.png)"
            )
        if not pairs:
            raise FileNotFoundError(f"Cityscapes: no images in {dataset.images_dir}/<city>/")
        self.dataset = dataset
        self.table = label_id_to_train_id()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image, target = self.dataset[index]
        label_ids = torch.from_numpy(np.array(target, dtype=np.uint8))
        if label_ids.ndim != 2:
            raise ValueError(f"{self.dataset.targets[index][0]} is not a one-channel label map")
        mask = tv_tensors.Mask(self.table[label_ids.long()])
        return tv_tensors.Image(F.pil_to_tensor(image)), mask


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes semantic segmentation on the 19 evaluation classes (the benchmark's "train
    ids", :data:`CITYSCAPES_CLASS_NAMES`): ``num_classes = 19`` and there is *no* background
    class; every other pixel (void classes, license plate) is 255, ignored.

    Files: ``<root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` and
    ``<root>/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png`` (label ids, mapped here to
    train ids with the official table). The official ``train`` split (2,975 images) is the
    training pool, from which ``val_fraction`` is held out; the official ``val`` split (500)
    is the test split (``test`` has no public labels). Training: RandomResizedCrop to
    ``image_size`` (crops keep about its 1:2 aspect) and horizontal flip; evaluation: Resize
    to ``image_size`` (metrics are computed at that size). Images are normalised with the
    ImageNet mean and std.

    Args:
        root: Folder holding ``leftImg8bit/`` and ``gtFine/``.
        image_size: ``(H, W)`` or one int for a square; default half resolution.
        crop_scale: Area share range of the training crop.
        val_fraction: Share of the training pool held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Images per batch.
        num_workers: Loader worker processes.
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Must stay ``False``.
    """

    num_classes = len(CITYSCAPES_CLASS_NAMES)

    def __init__(
        self,
        *,
        root: str,
        image_size: int | Sequence[int] = (512, 1024),
        crop_scale: Sequence[float] = (0.25, 1.0),
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
        self.root = Path(root).expanduser()
        self.class_names = list(CITYSCAPES_CLASS_NAMES)

    def check_files(self) -> None:
        expected = [
            self.root / folder / split
            for folder in ("leftImg8bit", "gtFine")
            for split in ("train", "val")
        ]
        raise_if_missing(
            type(self).__name__,
            [p for p in expected if not p.is_dir()],
            "Expected <root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and "
            "<root>/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png with "
            f"root={self.root.absolute()}. Download leftImg8bit_trainvaltest.zip and "
            "gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/ "
            "(free account) and extract both under data.root (or "
            "$DISTILL_ZOO_DATA/cityscapes); nothing is downloaded for you.",
        )

    def load_sources(self) -> tuple[Dataset, np.ndarray, Dataset]:
        def read(split: str) -> _CityscapesTrainIds:
            return _CityscapesTrainIds(
                Cityscapes(self.root, split=split, mode="fine", target_type="semantic")
            )

        pool = read("train")
        return pool, no_classes(pool), read("val")
