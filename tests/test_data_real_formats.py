"""Segmentation and detection DataModules on tiny files written in the official formats (PASCAL
VOC 2012, COCO instances JSON, Cityscapes): the batch contract, the joint augmentation, the
splits and the missing-files messages."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from distill_zoo.data import (
    CityscapesDataModule,
    COCODetectionDataModule,
    VOCDetectionDataModule,
    VOCSegmentationDataModule,
    detection_collate,
)
from distill_zoo.data.cityscapes import CITYSCAPES_CLASS_NAMES, label_id_to_train_id
from distill_zoo.data.dense_transforms import detection_transforms, segmentation_transforms
from distill_zoo.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from distill_zoo.data.voc import VOC_CLASS_NAMES

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"

# Every image is H x W = 40 x 60, grey, with one red square over x in [10, 30), y in [5, 25)
# (left of centre, so a horizontal flip moves it); at 2x (image_size 80 x 120) the box is
# [20, 10, 60, 50] and, flipped, [60, 10, 100, 50].
H, W = 40, 60
SQUARE = (10, 5, 30, 25)  # x1, y1, x2, y2
GREY, RED = (128, 128, 128), (220, 20, 20)
PERSON = VOC_CLASS_NAMES.index("person")  # 15
DOG = VOC_CLASS_NAMES.index("dog")  # 12
BIG = (80, 120)


def _image(square: bool = True) -> Image.Image:
    pixels = np.full((H, W, 3), GREY, dtype=np.uint8)
    if square:
        x1, y1, x2, y2 = SQUARE
        pixels[y1:y2, x1:x2] = RED
    return Image.fromarray(pixels)


def _palette_mask(value: int, square: bool = True) -> Image.Image:
    """A VOC SegmentationClass PNG: palette indices, the square of class ``value`` with a
    one-pixel 255 border (as VOC outlines objects)."""
    mask = np.zeros((H, W), dtype=np.uint8)
    if square:
        x1, y1, x2, y2 = SQUARE
        mask[y1 - 1 : y2 + 1, x1 - 1 : x2 + 1] = 255
        mask[y1:y2, x1:x2] = value
    image = Image.fromarray(mask, mode="P")
    palette = [0, 0, 0] * 256
    palette[3 * 255 : 3 * 256] = [224, 224, 192]
    palette[3 * value : 3 * value + 3] = [192, 128, 128]
    image.putpalette(palette)
    return image


def _voc_xml(name: str, objects: list[tuple[str, tuple[int, ...], int]]) -> str:
    parts = [
        f"<annotation><folder>VOC2012</folder><filename>{name}.jpg</filename>"
        f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>"
        "<segmented>0</segmented>"
    ]
    for cls, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """VOCdevkit/VOC2012 with 10 train and 3 val images, masks and XML annotations.

    Train image 3 has no object; train image 4 also holds a difficult dog; all other objects
    are persons on the red square.
    """
    root = tmp_path_factory.mktemp("voc")
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations"):
        (base / sub).mkdir(parents=True)
    names = {"train": [f"2008_{i:06d}" for i in range(10)], "val": ["2009_000001", "2009_000002"]}
    names["val"].append("2009_000003")
    for split, ids in names.items():
        for i, name in enumerate(ids):
            square = not (split == "train" and i == 3)
            _image(square).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            _palette_mask(PERSON, square).save(base / "SegmentationClass" / f"{name}.png")
            objects = [("person", SQUARE, 0)] if square else []
            if split == "train" and i == 4:
                objects.append(("dog", (40, 2, 55, 12), 1))
            (base / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, objects))
    for task in ("Segmentation", "Main"):
        (base / "ImageSets" / task).mkdir(parents=True)
        for split, ids in names.items():
            (base / "ImageSets" / task / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def _setup(module):
    module.prepare_data()
    module.setup()
    return module


def _voc_seg(root: Path, **kwargs) -> VOCSegmentationDataModule:
    args = dict(root=str(root), image_size=BIG, val_fraction=0.3, batch_size=4, num_workers=0)
    return _setup(VOCSegmentationDataModule(**(args | kwargs)))


def _voc_det(root: Path, **kwargs) -> VOCDetectionDataModule:
    args = dict(root=str(root), image_size=BIG, val_fraction=0.3, batch_size=4, num_workers=0)
    return _setup(VOCDetectionDataModule(**(args | kwargs)))


def _first_batch(loader):
    return next(iter(loader))


# --- VOC segmentation -------------------------------------------------------------------------


def test_voc_segmentation_contract(voc_root):
    data = _voc_seg(voc_root)
    assert data.task == "segmentation"
    assert (data.num_classes, data.in_channels, data.ignore_index) == (21, 3, 255)
    assert data.image_size == BIG and data.input_shape == (3, *BIG)
    assert data.class_names[0] == "background" and data.class_names[PERSON] == "person"
    assert len(data.class_names) == 21
    assert data.num_train_samples == 7 and len(data.val_set) == 3
    assert len(data.test_set) == 3  # the official val list
    assert data.train_targets is None

    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        images, masks, indices = _first_batch(loader)
        assert type(images) is torch.Tensor and type(masks) is torch.Tensor
        assert images.dtype == torch.float32 and images.shape == (len(indices), 3, *BIG)
        assert masks.dtype == torch.int64 and masks.shape == (len(indices), *BIG)
        assert indices.dtype == torch.int64
        assert set(masks.unique().tolist()) <= {0, PERSON, 255}

    images, masks, indices = _first_batch(data.test_dataloader())
    assert indices.tolist() == [0, 1, 2]
    # Resize 2x: source pixel (y=15, x=20) inside the square is person, (0, 0) background,
    # the border ring (source y=4) stays 255.
    assert (masks[:, 30, 40] == PERSON).all()
    assert (masks[:, 0, 0] == 0).all()
    assert (masks[:, 8, 40] == 255).all()
    # ImageNet normalisation: the grey background maps to (128/255 - mean) / std.
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(images[0, :, 2, 2], expected, atol=0.05, rtol=0)


def _red_region(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Where a normalised image is red (the square), as a bool [H, W] map."""
    rgb = image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (rgb[0] > 0.6) & (rgb[1] < 0.35)


def test_segmentation_augmentation_keeps_mask_on_the_image(voc_root):
    data = _voc_seg(voc_root, crop_scale=(0.3, 1.0))
    flipped = unflipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, mask, _ = data.train_set[0]
        assert image.shape == (3, *BIG) and mask.shape == BIG and mask.dtype == torch.int64
        red, person = _red_region(image), mask == PERSON
        if person.sum() < 20:  # the crop missed (most of) the square
            assert red.sum() <= person.sum() + 2 * (BIG[0] + BIG[1])
            continue
        overlap = (red & person).sum() / (red | person).sum()
        assert overlap > 0.8, f"seed {seed}: mask and image disagree (IoU {overlap:.2f})"
        centre_x = person.nonzero()[:, 1].float().mean()
        flipped += int(centre_x > BIG[1] / 2)
        unflipped += int(centre_x < BIG[1] / 2)
    assert flipped and unflipped  # both branches of the flip were checked


def _nearest(found: tuple[float, ...], expected: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The expected value within 2 pixels of ``found`` (a full-area crop may still lose a
    pixel row or column to rounding)."""
    for value in expected:
        if max(abs(a - b) for a, b in zip(found, value, strict=True)) <= 2:
            return value
    raise AssertionError(f"{found} is none of {expected}")


def test_segmentation_flip_without_crop(voc_root):
    # crop_scale (1, 1): the crop is (nearly) the whole image, so the flip remains.
    data = _voc_seg(voc_root, crop_scale=(1.0, 1.0))
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        _, mask, _ = data.train_set[0]
        cols = (mask == PERSON).any(0).nonzero()[:, 0]
        seen.add(_nearest((cols.min().item(), cols.max().item() + 1), [(20, 60), (60, 100)]))
    assert seen == {(20, 60), (60, 100)}


# --- VOC detection ----------------------------------------------------------------------------


def test_voc_detection_contract(voc_root):
    data = _voc_det(voc_root)
    assert data.task == "detection" and data.num_classes == 21
    assert data.class_names == list(VOC_CLASS_NAMES) and data.input_shape == (3, *BIG)
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        images, targets, indices = _first_batch(loader)
        assert type(images) is torch.Tensor and images.dtype == torch.float32
        assert images.shape == (len(indices), 3, *BIG)
        assert images.min() >= 0 and images.max() <= 1  # not normalised
        assert indices.dtype == torch.int64 and isinstance(targets, list)
        assert len(targets) == len(indices)
        for target in targets:
            assert set(target) == {"boxes", "labels"}
            assert type(target["boxes"]) is torch.Tensor
            assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
            assert target["labels"].dtype == torch.int64
            assert len(target["labels"]) == len(target["boxes"])
            assert ((target["labels"] >= 1) & (target["labels"] <= 20)).all()

    images, targets, _ = _first_batch(data.test_dataloader())
    # The person box [10, 5, 30, 25] of a 40 x 60 image, resized to 80 x 120.
    for target in targets:
        torch.testing.assert_close(target["boxes"], torch.tensor([[20.0, 10.0, 60.0, 50.0]]))
        assert target["labels"].tolist() == [PERSON]


def _pool_item(data, pool_position: int):
    """The evaluation-transformed sample at a position of the training pool."""
    return data.val_set.transform(*data.val_set.source[pool_position])


def test_voc_detection_empty_image_and_difficult(voc_root):
    data = _voc_det(voc_root)
    image, target = _pool_item(data, 3)  # no objects
    assert image.shape == (3, *BIG)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    _, target = _pool_item(data, 4)  # person + difficult dog, kept by default
    assert target["labels"].tolist() == [PERSON, DOG]
    torch.testing.assert_close(target["boxes"][1], torch.tensor([80.0, 4.0, 110.0, 24.0]))
    _, target = _pool_item(_voc_det(voc_root, keep_difficult=False), 4)
    assert target["labels"].tolist() == [PERSON]

    # An empty image goes through the training pipeline and the collate too.
    torch.manual_seed(0)
    batch = detection_collate(
        [data.train_set.transform(*data.train_set.source[3]) + (0,) for _ in range(2)]
    )
    assert batch[0].shape == (2, 3, *BIG) and batch[1][0]["boxes"].shape == (0, 4)


def _red_box(image: torch.Tensor) -> torch.Tensor | None:
    red = (image[0] > 0.6) & (image[1] < 0.35)
    if red.sum() < 20:
        return None
    ys, xs = red.nonzero().unbind(1)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def test_detection_augmentation_keeps_boxes_on_the_object(voc_root):
    data = _voc_det(voc_root, crop_scale=(0.3, 1.0))
    flipped = unflipped = 0
    for seed in range(16):
        torch.manual_seed(seed)
        image, target, _ = data.train_set[0]
        boxes, labels = target["boxes"], target["labels"]
        assert len(boxes) == len(labels) <= 1
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= BIG[1]).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= BIG[0]).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()  # no degenerate box survives
        seen = _red_box(image)
        if seen is None:  # the square left the crop (or nearly): so must its box
            assert len(boxes) == 0 or (boxes[0, 2:] - boxes[0, :2]).prod() < 40
            continue
        assert len(boxes) == 1 and labels.tolist() == [PERSON]
        assert (boxes[0] - seen).abs().max() <= 2.5, f"seed {seed}: {boxes[0]} vs {seen}"
        centre = (boxes[0, 0] + boxes[0, 2]) / 2
        flipped += int(centre > BIG[1] / 2)
        unflipped += int(centre < BIG[1] / 2)
    assert flipped and unflipped


def test_detection_flip_without_crop(voc_root):
    data = _voc_det(voc_root, crop_scale=(1.0, 1.0))
    expected = [(20.0, 10.0, 60.0, 50.0), (60.0, 10.0, 100.0, 50.0)]
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        _, target, _ = data.train_set[0]
        seen.add(_nearest(tuple(target["boxes"][0].tolist()), expected))
    assert seen == set(expected)


# --- COCO ---------------------------------------------------------------------------------------

# Category ids are non-contiguous and listed out of order: sorted, 3 -> 1, 7 -> 2, 12 -> 3.
COCO_CATEGORIES = [
    {"id": 12, "name": "kite", "supercategory": "sports"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 7, "name": "train", "supercategory": "vehicle"},
]


def _coco_split(folder: Path, json_path: Path, count: int, first_id: int) -> None:
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        image_id = first_id + i
        name = f"{image_id:012d}.jpg"
        _image(square=i != 1).save(folder / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        if i == 1:
            continue  # an image without annotations
        for k, (category, bbox, crowd) in enumerate(
            [
                (7, [10, 5, 20, 20], 0),  # the red square, COCO xywh
                (12, [40.5, 30, 15, 8], 0),
                (3, [0, 0, 50, 30], 1),  # a crowd region: dropped
            ]
        ):
            annotations.append(
                {
                    "id": 100 * image_id + k,
                    "image_id": image_id,
                    "category_id": category,
                    "iscrowd": crowd,
                    "bbox": bbox,
                    "area": float(bbox[2] * bbox[3]),
                    "segmentation": {"counts": [], "size": [H, W]} if crowd else [],
                }
            )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": COCO_CATEGORIES})
    )


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    _coco_split(root / "train2017", root / "annotations" / "instances_train2017.json", 10, 1)
    _coco_split(root / "val2017", root / "annotations" / "instances_val2017.json", 3, 1000)
    return root


def _coco(root: Path, **kwargs) -> COCODetectionDataModule:
    args = dict(root=str(root), image_size=BIG, val_fraction=0.2, batch_size=3, num_workers=0)
    return _setup(COCODetectionDataModule(**(args | kwargs)))


def test_coco_detection_contract(coco_root):
    data = _coco(coco_root)
    assert data.task == "detection" and data.num_classes == 4
    assert data.class_names == ["background", "car", "train", "kite"]
    assert data.category_ids == [-1, 3, 7, 12]
    assert data.num_train_samples == 8 and len(data.val_set) == 2 and len(data.test_set) == 3

    images, targets, indices = _first_batch(data.test_dataloader())
    assert images.shape == (3, 3, *BIG) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert indices.tolist() == [0, 1, 2]
    # Image 1000: the train (id 7 -> 2) on the square, the kite (id 12 -> 3); crowd car gone.
    assert targets[0]["labels"].tolist() == [2, 3]
    torch.testing.assert_close(
        targets[0]["boxes"], torch.tensor([[20.0, 10.0, 60.0, 50.0], [81.0, 60.0, 111.0, 76.0]])
    )
    # Image 1001 has no annotations.
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["boxes"].dtype == torch.float32
    assert targets[1]["labels"].shape == (0,) and targets[1]["labels"].dtype == torch.int64

    images, targets, _ = _first_batch(data.train_dataloader())
    for target in targets:
        assert ((target["labels"] >= 1) & (target["labels"] <= 3)).all()
        assert 1 not in target["labels"].tolist()  # the only car is a crowd region


def test_coco_test_categories_must_match(coco_root, tmp_path):
    other = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    other["categories"] = other["categories"][:2]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different categories"):
        _coco(coco_root, test_annotations=str(path))


# --- Cityscapes -------------------------------------------------------------------------------

ROAD, CAR, UNLABELED, LICENSE_PLATE = 7, 26, 0, -1  # label ids; train ids 0, 13, 255, 255


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory) -> Path:
    """leftImg8bit/gtFine trees: train has 2 cities (6 images), val 1 city (2 images)."""
    root = tmp_path_factory.mktemp("cityscapes")
    layout = {"train": {"zurich": 3, "aachen": 3}, "val": {"frankfurt": 2}}
    for split, cities in layout.items():
        for city, count in cities.items():
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for i in range(count):
                stem = f"{city}_{i:06d}_000019"
                pixels = np.array(_image())
                pixels[:, W - 6 :] = (10, 10, 10)
                Image.fromarray(pixels).save(
                    root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                )
                labels = np.full((H, W), ROAD, dtype=np.uint8)
                x1, y1, x2, y2 = SQUARE
                labels[y1:y2, x1:x2] = CAR
                labels[:, W - 6 :] = UNLABELED
                gt = root / "gtFine" / split / city
                Image.fromarray(labels).save(gt / f"{stem}_gtFine_labelIds.png")
                Image.fromarray(labels).save(gt / f"{stem}_gtFine_color.png")  # ignored
    return root


def test_cityscapes_contract(cityscapes_root):
    data = CityscapesDataModule(
        root=str(cityscapes_root), image_size=BIG, val_fraction=0.34, batch_size=2, num_workers=0
    )
    _setup(data)
    assert data.task == "segmentation" and data.num_classes == 19 and data.ignore_index == 255
    assert data.class_names == list(CITYSCAPES_CLASS_NAMES)
    assert data.class_names[0] == "road" and data.class_names[13] == "car"
    assert data.class_names[18] == "bicycle" and "unlabeled" not in data.class_names
    assert data.num_train_samples == 4 and len(data.val_set) == 2 and len(data.test_set) == 2
    # Files are read in sorted order (aachen before zurich), whatever the file system says.
    assert "aachen_000000" in data.train_set.source.dataset.images[0]

    images, masks, indices = _first_batch(data.test_dataloader())
    assert images.shape == (2, 3, *BIG) and images.dtype == torch.float32
    assert masks.shape == (2, *BIG) and masks.dtype == torch.int64
    assert indices.tolist() == [0, 1]
    assert (masks[:, 30, 40] == 13).all()  # car
    assert (masks[:, 70, 0] == 0).all()  # road
    assert (masks[:, :, -4:] == 255).all()  # unlabeled -> ignored
    assert set(masks.unique().tolist()) == {0, 13, 255}

    torch.manual_seed(0)
    images, masks, _ = _first_batch(data.train_dataloader())
    assert masks.shape == (2, *BIG) and set(masks.unique().tolist()) <= {0, 13, 255}


def test_cityscapes_label_table():
    table = label_id_to_train_id()
    assert table.dtype == torch.uint8 and table.shape == (256,)
    assert table[ROAD] == 0 and table[CAR] == 13 and table[UNLABELED] == 255
    assert table[33] == 18  # bicycle
    assert table[255] == 255 and table[34] == 255  # license plate (-1) is not in the table
    assert sorted(set(table.tolist()) - {255}) == list(range(19))


# --- shared -----------------------------------------------------------------------------------


def test_missing_root_names_what_to_put_where(tmp_path):
    cases = [
        (
            VOCSegmentationDataModule,
            ["VOCdevkit/VOC2012/JPEGImages", "ImageSets/Segmentation", "train.txt", "VOC2012"],
        ),
        (VOCDetectionDataModule, ["VOCdevkit/VOC2012/Annotations", "ImageSets/Main", "val.txt"]),
        (
            COCODetectionDataModule,
            ["train2017", "annotations/instances_val2017.json", "cocodataset.org"],
        ),
        (CityscapesDataModule, ["leftImg8bit/train", "gtFine/val", "_gtFine_labelIds.png"]),
    ]
    for cls, fragments in cases:
        data = cls(root=str(tmp_path / "nowhere"), num_workers=0)
        with pytest.raises(FileNotFoundError) as error:
            data.prepare_data()
        message = str(error.value)
        assert "data.root" in message and str(tmp_path / "nowhere") in message
        for fragment in fragments:
            assert fragment in message, (cls.__name__, fragment, message)
        with pytest.raises(FileNotFoundError):
            data.setup()


def test_split_is_deterministic(voc_root, coco_root):
    def val_images(**kwargs):
        data = _voc_seg(voc_root, **kwargs)
        return [data.val_set.source.dataset.images[p] for p in data.val_set.positions]

    assert val_images(seed=3) == val_images(seed=3)
    assert len({tuple(val_images(seed=s)) for s in range(6)}) > 1
    data = _voc_seg(voc_root, seed=3)
    pool = set(data.train_set.positions) | set(data.val_set.positions)
    assert pool == set(range(10)) and not set(data.train_set.positions) & set(
        data.val_set.positions
    )
    coco = [_coco(coco_root, seed=5).val_set.positions.tolist() for _ in range(2)]
    assert coco[0] == coco[1]


def test_splits_pickle_for_loader_workers(voc_root, coco_root, cityscapes_root):
    modules = [
        _voc_seg(voc_root),
        _voc_det(voc_root),
        _coco(coco_root),
        _setup(CityscapesDataModule(root=str(cityscapes_root), val_fraction=0.34, num_workers=0)),
    ]
    for data in modules:
        for split in (data.train_set, data.val_set, data.test_set):
            copy = pickle.loads(pickle.dumps(split))
            assert len(copy) == len(split)
            torch.manual_seed(0)
            image, target, index = copy[0]
            assert image.shape == (3, *data.image_size) and index == 0


def test_bad_arguments_fail_early(voc_root):
    with pytest.raises(ValueError, match="on_device"):
        VOCSegmentationDataModule(root=str(voc_root), on_device=True)
    with pytest.raises(ValueError, match="crop_scale"):
        VOCDetectionDataModule(root=str(voc_root), crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="image_size"):
        CityscapesDataModule(root=str(voc_root), image_size=(1, 2, 3))
    with pytest.raises(AttributeError, match="after prepare_data"):
        COCODetectionDataModule(root=str(voc_root)).num_train_samples  # noqa: B018


def test_transform_builders_on_their_own():
    from torchvision import tv_tensors

    image = tv_tensors.Image(torch.from_numpy(np.array(_image())).permute(2, 0, 1))
    mask = tv_tensors.Mask(torch.zeros(H, W, dtype=torch.uint8))
    out_image, out_mask = segmentation_transforms(32, train=False)(image, mask)
    assert out_image.shape == (3, 32, 32) and out_mask.dtype == torch.int64
    boxes = tv_tensors.BoundingBoxes([[10, 5, 30, 25]], format="XYXY", canvas_size=(H, W))
    target = {"boxes": boxes, "labels": torch.tensor([1])}
    out_image, out_target = detection_transforms((20, 30), train=False)(image, target)
    assert out_image.shape == (3, 20, 30) and out_image.dtype == torch.float32
    torch.testing.assert_close(out_target["boxes"], boxes.new_tensor([[5.0, 2.5, 15.0, 12.5]]))


@pytest.mark.parametrize(
    "name, cls",
    [
        ("voc_segmentation", VOCSegmentationDataModule),
        ("voc_detection", VOCDetectionDataModule),
        ("coco_detection", COCODetectionDataModule),
        ("cityscapes", CityscapesDataModule),
    ],
)
def test_yaml_instantiates(name, cls, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_ZOO_DATA", str(tmp_path))
    node = OmegaConf.load(CONF / f"{name}.yaml")
    cfg = OmegaConf.create({"split_seed": 7, "data": node})
    data = instantiate(cfg.data)
    assert type(data) is cls and data.seed == 7 and not data.on_device
    assert Path(data.root).parent == tmp_path
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.prepare_data()
