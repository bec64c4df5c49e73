"""Embedded real-image data for segmentation, detection and regression: digit scenes, digit
pose, diabetes, CIFAR-10 scenes. Exact masks/boxes/targets, joint augmentation, determinism,
disjoint sources, the batch contract and the YAMLs."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_diabetes, load_digits
from torch import nn
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import functional as TF

from distill_zoo.data import (
    CIFAR10ScenesDataModule,
    DigitPoseDataModule,
    DigitScenesDataModule,
    DigitsDataModule,
    TabularRegressionDataModule,
)
from distill_zoo.data.dense_device import (
    Slot,
    compose_scenes,
    crop_flip_maps,
    instance_boxes,
    segmentation_masks,
)
from distill_zoo.data.digit_pose import render_pose

PROJECT = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = PROJECT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SMALL = {"num_train": 160, "num_val": 40, "num_test": 40}


@pytest.fixture(scope="module")
def scenes() -> DigitScenesDataModule:
    dm = DigitScenesDataModule(**SMALL, seed=3, shuffle_seed=5, batch_size=16)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def flipped_detection() -> DigitScenesDataModule:
    dm = DigitScenesDataModule(**SMALL, task="detection", flip=True, padding=10, batch_size=40)
    dm.setup()
    return dm


def tight_box(pixels: torch.Tensor) -> torch.Tensor:
    """The pixel-edge box of a bool ``[H, W]`` mask: masks_to_boxes plus one on the far side."""
    return masks_to_boxes(pixels[None].float())[0] + torch.tensor([0.0, 0.0, 1.0, 1.0])


def check_scene(mask: torch.Tensor, target: dict, instances: torch.Tensor | None = None) -> None:
    """Mask classes = box labels; boxes inside the image; a class present once has the tight box
    of its mask pixels; with the instance map, every box is the tight box of its instance."""
    height, width = mask.shape
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
    assert labels.dtype == torch.int64
    assert sorted(set(mask.unique().tolist()) - {0}) == sorted(set(labels.tolist()))
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    for cls in labels.unique():
        if (labels == cls).sum() == 1:
            assert torch.equal(boxes[labels == cls][0], tight_box(mask == cls))
    if instances is not None:
        ids = [i for i in instances.unique().tolist() if i > 0]
        assert len(ids) == len(labels)
        for box, i in zip(boxes, ids, strict=True):
            assert torch.equal(box, tight_box(instances == i))


# --- digit scenes -------------------------------------------------------------------------------


def test_digit_scenes_are_deterministic_and_seeded(scenes):
    again = DigitScenesDataModule(**SMALL, seed=3)
    again.setup()
    other = DigitScenesDataModule(**SMALL, seed=4)
    other.setup()
    for split in ("train", "val", "test"):
        for key, tensor in scenes.splits[split].items():
            assert torch.equal(tensor, again.splits[split][key]), (split, key)
    assert not torch.equal(scenes.splits["train"]["images"], other.splits["train"]["images"])
    assert not torch.equal(scenes.splits["val"]["images"], other.splits["val"]["images"])
    # The test scenes are fixed, like an official test set, whatever the seed.
    assert torch.equal(scenes.splits["test"]["images"], other.splits["test"]["images"])


def test_digit_scenes_use_disjoint_source_digits(scenes):
    sources = scenes.source_digits
    sets = {split: set(positions.tolist()) for split, positions in sources.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert sum(len(s) for s in sets.values()) == 1797
    digits = load_digits().target
    for split, used in scenes.scene_sources.items():
        drawn = used[used >= 0]
        assert set(drawn.tolist()) <= sets[split], split
        # Each slot's class is its source digit's label + 1.
        labels = scenes.splits[split]["labels"]
        assert torch.equal(labels[used >= 0], torch.from_numpy(digits[drawn.numpy()]) + 1)
        assert (labels[used < 0] == 0).all()
    # The test digits are those the digits classifier tests on.
    dm = DigitsDataModule()
    dm.setup()
    assert dm.test_set.source.tensors[1].tolist() == digits[sources["test"]].tolist()


def test_digit_scene_masks_boxes_and_image_agree(scenes):
    split = scenes.splits["train"]
    images, instances, labels = split["images"], split["instances"], split["labels"]
    threshold = scenes.stroke_threshold * 255
    # A pixel belongs to a digit exactly where the image is brighter than the stroke threshold.
    assert torch.equal(instances > 0, images[:, 0] > threshold)
    counts = (labels > 0).sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and counts.float().mean() > 1.5
    detection = DigitScenesDataModule(**SMALL, seed=3, task="detection")
    detection.setup()
    masks = segmentation_masks(instances, labels)
    (_, targets, indices), *_ = detection.batches("val")
    for i, target in zip(indices.tolist(), targets, strict=True):
        val = detection.splits["val"]
        check_scene(
            segmentation_masks(val["instances"][i : i + 1], val["labels"][i : i + 1])[0],
            target,
            val["instances"][i],
        )
    # Over the training scenes too (boxes from the stored instance maps).
    boxes, present = instance_boxes(instances, labels.shape[1])
    assert torch.equal(present, labels > 0)
    for i in range(len(labels)):
        keep = labels[i] > 0
        check_scene(masks[i], {"boxes": boxes[i][keep], "labels": labels[i][keep]}, instances[i])


def test_last_pasted_wins_and_hidden_objects_are_dropped():
    """Two 4x4 opaque squares overlapping by two columns on an 8x8 canvas."""

    def slot(value: int, left: int, label: int) -> Slot:
        return Slot(
            patches=torch.full((1, 1, 4, 4), value, dtype=torch.uint8),
            opaque=torch.ones(1, 4, 4, dtype=torch.bool),
            top=torch.tensor([2]),
            left=torch.tensor([left]),
            labels=torch.tensor([label]),
            active=torch.tensor([True]),
        )

    background = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image, instances, labels = compose_scenes(
        background, iter([slot(100, 0, 3), slot(200, 2, 5)]), min_visible=0.5, blend_max=True
    )
    assert labels.tolist() == [[3, 5]]
    assert (image[0, 0, 2:6, 2:6] == 200).all() and (image[0, 0, 2:6, :2] == 100).all()
    assert (instances[0, 2:6, 2:6] == 2).all() and (instances[0, 2:6, :2] == 1).all()
    boxes, _ = instance_boxes(instances, 2)
    assert boxes[0].tolist() == [[0, 2, 2, 6], [2, 2, 6, 6]]  # the first: its visible part
    # Hiding more than half of the first object: the second is not pasted at all.
    image, instances, labels = compose_scenes(
        background, iter([slot(100, 0, 3), slot(200, 1, 5)]), min_visible=0.5, blend_max=True
    )
    assert labels.tolist() == [[3, 0]] and (instances <= 1).all() and image.max() == 100
    # min_visible=0: pasted, and an object hidden entirely is dropped.
    image, instances, labels = compose_scenes(
        background, iter([slot(100, 1, 3), slot(200, 1, 5)]), min_visible=0.0, blend_max=True
    )
    assert labels.tolist() == [[0, 5]] and image.max() == 200


def test_segmentation_batches_follow_the_contract(scenes):
    images, masks, indices, keys = scenes.fetch(next(iter(scenes.train_dataloader())))
    assert images.dtype == torch.float32 and images.shape == (16, 3, 64, 64)
    assert masks.dtype == torch.int64 and masks.shape == (16, 64, 64)
    assert indices.dtype == torch.int64 and keys.dtype == torch.int64
    assert masks.min() >= 0 and masks.max() <= 10
    images, masks, indices = scenes.fetch(next(iter(scenes.val_dataloader())))
    assert indices.tolist() == list(range(16))
    val = scenes.splits["val"]
    expected = segmentation_masks(val["instances"][:16], val["labels"][:16])
    assert torch.equal(masks, expected)
    mean, std = scenes.mean[0], scenes.std[0]
    raw = val["images"][:16].float().div(255).sub(mean).div(std).expand(-1, 3, -1, -1)
    torch.testing.assert_close(images, raw)
    # Normalised with the training scenes' statistics.
    train_pixels = scenes.splits["train"]["images"].float() / 255
    assert mean == pytest.approx(train_pixels.mean().item(), rel=1e-5)
    assert std == pytest.approx(train_pixels.std(correction=0).item(), rel=1e-5)
    assert scenes.task == "segmentation" and scenes.num_classes == 11
    assert scenes.class_names == ["background", *"0123456789"]
    assert scenes.in_channels == 3 and scenes.image_size == (64, 64)
    assert scenes.input_shape == (3, 64, 64) and scenes.num_train_samples == 160
    assert scenes.ignore_index == 255


def test_joint_augmentation_keeps_image_and_mask_aligned(scenes):
    """After the crop, masks still mark exactly the bright pixels, and equal torchvision's
    pad-crop of the stored mask (fill 0) at the same offsets."""
    train = scenes.splits["train"]
    threshold = scenes.stroke_threshold * 255
    aug = scenes.train_augmentation
    assert aug.padding == 8 and not aug.flip  # digit default: no mirrored digits
    mean, std = scenes.mean[0], scenes.std[0]
    seen_shift = False
    for images, masks, indices, keys in scenes.batches("train", epoch=1)[:3]:
        raw = (images[:, 0] * std + mean) * 255
        assert torch.equal(masks > 0, raw > threshold + 1e-3)
        stored = segmentation_masks(train["instances"][indices], train["labels"][indices])
        for mask, full, key in zip(masks, stored, keys.tolist(), strict=True):
            oy, ox, flip = (int(t) for t in aug.decode(torch.tensor(key)))
            view = TF.crop(TF.pad(full[None], [8, 8, 8, 8], fill=0), oy, ox, 64, 64)[0]
            view = TF.horizontal_flip(view) if flip else view
            assert torch.equal(mask, view)
            seen_shift |= (oy, ox) != (8, 8)
    assert seen_shift


def test_joint_augmentation_moves_boxes_with_the_image(flipped_detection):
    dm = flipped_detection
    aug = dm.train_augmentation
    assert aug.flip and aug.padding == 10
    train = dm.splits["train"]
    flips = moved_boxes = 0
    ((images, targets, indices, keys),) = dm.batches("train", epoch=2)[:1]
    assert images.min() >= 0 and images.max() <= 1  # detection images are not normalised
    threshold = dm.stroke_threshold * 255
    for row, (i, key, target) in enumerate(
        zip(indices.tolist(), keys.tolist(), targets, strict=True)
    ):
        oy, ox, flip = (int(t) for t in aug.decode(torch.tensor(key)))
        flips += flip
        instances = train["instances"][i]
        view = crop_flip_maps(train["instances"], torch.tensor([i]), torch.tensor([key]), aug)[0]
        mask = segmentation_masks(view[None], train["labels"][i : i + 1])[0]
        check_scene(mask, target, view)
        # Objects wholly inside the crop keep their box, shifted (and mirrored).
        boxes, present = instance_boxes(instances[None], train["labels"].shape[1])
        dx, dy = ox - 10, oy - 10
        moved = boxes[0] - torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
        if flip:
            moved = torch.stack([64 - moved[:, 2], moved[:, 1], 64 - moved[:, 0], moved[:, 3]], 1)
        whole = present[0] & (moved[:, :2] >= 0).all(1) & (moved[:, 2:] <= 64).all(1)
        for box in moved[whole & (train["labels"][i] > 0)]:
            assert (target["boxes"] == box).all(1).any()
            moved_boxes += 1
        # The image moved the same way: its bright pixels are the mask's pixels.
        assert torch.equal(images[row, 0] * 255 > threshold + 1e-3, mask > 0)
    assert 0 < flips < len(targets) and moved_boxes > 40


def test_detection_batches_follow_the_contract_and_allow_empty_scenes():
    dm = DigitScenesDataModule(
        **SMALL, task="detection", min_digits=0, max_digits=2, channels=1, batch_size=40
    )
    dm.setup()
    images, targets, indices = dm.fetch(next(iter(dm.test_dataloader())))
    assert images.shape == (40, 1, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and dm.mean is None
    assert isinstance(targets, list) and len(targets) == 40 and indices.dtype == torch.int64
    empty = [t for t in targets if len(t["labels"]) == 0]
    assert empty and all(t["boxes"].shape == (0, 4) for t in empty)
    assert all(t["boxes"].dtype == torch.float32 for t in targets)
    assert all(((t["labels"] >= 1) & (t["labels"] <= 10)).all() for t in targets)


def test_order_and_augmentation_follow_shuffle_seed_and_epoch(scenes):
    first = scenes.batches("train", epoch=0)
    again = scenes.batches("train", epoch=0)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    later = scenes.batches("train", epoch=1)
    assert not torch.equal(first[0][2], later[0][2]) or not torch.equal(first[0][3], later[0][3])
    # The CPU path (on_device=False) gives the very same batches.
    host = DigitScenesDataModule(**SMALL, seed=3, shuffle_seed=5, batch_size=16, on_device=False)
    host.setup()
    loader = host.train_dataloader()
    loader.set_epoch(0)
    cpu = torch.device("cpu")
    for a, b in zip(first, loader, strict=True):
        b = host.transfer_batch_to_device(b, cpu, 0)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class TinySegmenter(L.LightningModule):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        images, masks, indices, keys = batch
        self.seen.append((images.shape, masks.dtype, keys.dtype))
        return F.cross_entropy(self.net(images), masks, ignore_index=255)

    def validation_step(self, batch, batch_idx):
        images, masks, indices = batch
        self.seen.append((images.shape, masks.dtype, indices.dtype))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("on_device", [True, False])
def test_lightning_fits_on_the_batches(on_device, tmp_path):
    dm = DigitScenesDataModule(**SMALL, batch_size=16, on_device=on_device)
    model = TinySegmenter(3, 11)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    shape, long = (16, 3, 64, 64), torch.int64
    assert model.seen == [(shape, long, long)] * 3


class TinyDetector(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(3, 1, 1)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        images, targets, indices, keys = batch
        self.seen += [(images.dtype, t["boxes"].dtype, t["labels"].dtype) for t in targets]
        return self.net(images).float().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("on_device", [True, False])
def test_half_precision_casts_images_but_not_boxes(on_device, tmp_path):
    dm = DigitScenesDataModule(**SMALL, task="detection", batch_size=8, on_device=on_device)
    model = TinyDetector()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        precision="bf16-true",
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen == [(torch.bfloat16, torch.float32, torch.int64)] * 8


# --- digit pose -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pose() -> DigitPoseDataModule:
    dm = DigitPoseDataModule(num_train=300, num_val=50, num_test=50, seed=1)
    dm.setup()
    return dm


def test_render_pose_is_exact():
    digits = torch.from_numpy(load_digits().images[:4]).double().div(16)[:, None]
    centre = torch.full((4, 2), 4.0, dtype=torch.float64)
    side = torch.full((4,), 8.0, dtype=torch.float64)
    identity = render_pose(digits, centre, side, torch.zeros(4), (8, 8))
    torch.testing.assert_close(identity, digits, atol=1e-12, rtol=0)
    quarter = render_pose(digits, centre, side, torch.full((4,), math.pi / 2), (8, 8))
    clockwise = torch.rot90(digits, -1, (-2, -1))  # +pi/2 turns clockwise on screen (y down)
    torch.testing.assert_close(quarter, clockwise, atol=1e-6, rtol=0)
    # A blob symmetric about the frame's centre lands with its centre of mass on the pose's
    # centre; an off-centre blob where the similarity transform sends its centre of mass
    # (bilinear interpolation keeps the centre of mass; sampling the turned blob on the canvas
    # grid moves it by a few hundredths of a pixel, a wrong convention by half a pixel or more).
    grid = torch.arange(8, dtype=torch.float64) + 0.5  # source pixel centres
    blob = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    blob[0, 0] = torch.exp(-((grid[:, None] - 4) ** 2 + (grid[None, :] - 4) ** 2) / 2)
    blob[1, 0] = torch.exp(-((grid[:, None] - 2.5) ** 2 + (grid[None, :] - 4) ** 2) / 1.28)
    weights = blob[1, 0] / blob[1, 0].sum()
    offset = torch.stack([(weights * grid[None, :]).sum(), (weights * grid[:, None]).sum()]) - 4
    rng = np.random.default_rng(0)
    size = 48
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float64) + 0.5,
        torch.arange(size, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    for _ in range(10):
        c = torch.from_numpy(rng.uniform(16, 32, 2))
        s = float(rng.uniform(10, 16))
        a = float(rng.uniform(-math.pi, math.pi))
        out = render_pose(
            blob, c.expand(2, 2), torch.full((2,), s).double(), torch.full((2,), a), (size, size)
        )[:, 0]
        mass = out.sum((1, 2))
        com = torch.stack([(out * xs).sum((1, 2)) / mass, (out * ys).sum((1, 2)) / mass], 1)
        turn = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]).double()
        torch.testing.assert_close(com[0], c, atol=0.05, rtol=0)
        torch.testing.assert_close(com[1], c + s / 8 * turn @ offset, atol=0.05, rtol=0)


def test_digit_pose_targets_are_the_rendered_pose(pose):
    digits = torch.from_numpy(load_digits().images).float().div(16)[:, None]
    for split in ("train", "test"):
        poses = pose.poses[split]
        targets = pose.unstandardise(pose.splits[split]["targets"]).double()
        size = pose.image_size[0]
        expected = torch.stack(
            [
                poses[:, 0] / size,
                poses[:, 1] / size,
                poses[:, 2] / size,
                torch.sin(poses[:, 3]),
                torch.cos(poses[:, 3]),
            ],
            1,
        )
        torch.testing.assert_close(targets, expected, atol=1e-5, rtol=0)
        # Each image is its source digit rendered at its pose.
        src = pose.sample_sources[split][:8]
        again = render_pose(digits[src], poses[:8, :2], poses[:8, 2], poses[:8, 3], (size, size))
        stored = pose.splits[split]["images"][:8].float() / 255
        assert (again - stored).abs().max() <= 0.5 / 255 + 1e-6
    # The turned 8x8 frame stays inside the canvas; rotations stay in range.
    p = pose.poses["train"]
    half = p[:, 2] / 2 * (p[:, 3].cos().abs() + p[:, 3].sin().abs())
    assert (p[:, 0] - half >= -1e-9).all() and (p[:, 0] + half <= 32 + 1e-9).all()
    assert (p[:, 3].abs() <= math.pi / 2).all()


def test_digit_pose_standardisation_split_and_batches(pose):
    train = pose.splits["train"]["targets"]
    torch.testing.assert_close(train.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, correction=0), torch.ones(5), atol=1e-4, rtol=0)
    assert pose.target_mean.dtype == torch.float32 and pose.target_mean.shape == (5,)
    assert pose.target_names == ["centre_x", "centre_y", "scale", "sin_rotation", "cos_rotation"]
    assert pose.task == "regression" and pose.num_classes == 5
    assert pose.input_shape == (3, 32, 32) and pose.image_size == (32, 32)
    sets = {k: set(v.tolist()) for k, v in pose.sample_sources.items()}
    allowed = {k: set(v.tolist()) for k, v in pose.source_digits.items()}
    assert all(sets[k] <= allowed[k] for k in sets)
    assert not allowed["train"] & allowed["val"] and not allowed["train"] & allowed["test"]
    images, targets, indices, keys = pose.fetch(next(iter(pose.train_dataloader())))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert targets.shape == (64, 5) and targets.dtype == torch.float32
    assert torch.equal(targets, pose.splits["train"]["targets"][indices])
    assert (keys == 0).all()
    images, targets, indices = pose.fetch(next(iter(pose.val_dataloader())))
    assert indices.tolist() == list(range(50))
    again = DigitPoseDataModule(num_train=300, num_val=50, num_test=50, seed=1)
    again.setup()
    other = DigitPoseDataModule(num_train=300, num_val=50, num_test=50, seed=2)
    other.setup()
    assert torch.equal(again.splits["train"]["images"], pose.splits["train"]["images"])
    assert torch.equal(again.splits["train"]["targets"], pose.splits["train"]["targets"])
    assert not torch.equal(other.splits["train"]["images"], pose.splits["train"]["images"])


# --- diabetes ---------------------------------------------------------------------------------


def test_tabular_regression_is_the_real_data_standardised_on_train():
    dm = TabularRegressionDataModule(seed=2)
    dm.setup()
    data = load_diabetes(scaled=False)
    sizes = dm.dataset_sizes()
    assert sizes == {"train": 320, "val": 56, "test": 66}
    rows = {k: set(v.tolist()) for k, v in dm.positions.items()}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"]
    assert len(rows["train"] | rows["val"] | rows["test"]) == 442
    train_x = data.data[dm.positions["train"]]
    torch.testing.assert_close(
        dm.feature_mean, torch.from_numpy(train_x.mean(0)).float(), rtol=1e-6, atol=0
    )
    x = dm.splits["train"]["inputs"]
    torch.testing.assert_close(x.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0, correction=0), torch.ones(10), atol=1e-5, rtol=0)
    assert not torch.allclose(dm.splits["val"]["inputs"].mean(0), torch.zeros(10), atol=1e-3)
    for split, positions in dm.positions.items():
        back = dm.unstandardise(dm.splits[split]["targets"])[:, 0].double()
        torch.testing.assert_close(
            back, torch.from_numpy(data.target[positions]), atol=1e-3, rtol=0
        )
    assert dm.target_mean.shape == (1,) and dm.target_std.shape == (1,)
    assert dm.target_mean.item() == pytest.approx(data.target[dm.positions["train"]].mean())
    inputs, targets, indices, keys = dm.fetch(next(iter(dm.train_dataloader())))
    assert inputs.shape == (32, 10) and targets.shape == (32, 1)
    assert inputs.dtype == targets.dtype == torch.float32 and indices.dtype == torch.int64
    assert dm.task == "regression" and dm.image_size is None and dm.input_shape == (10,)
    assert dm.in_channels == 10 and dm.num_classes == 1
    assert dm.target_names == ["disease_progression"]
    other = TabularRegressionDataModule(seed=3)
    other.setup()
    assert np.array_equal(other.positions["test"], dm.positions["test"])  # fixed test split
    assert not np.array_equal(other.positions["train"], dm.positions["train"])


# --- CIFAR-10 scenes ----------------------------------------------------------------------------

CLASSES = ["cat", "dog", "ship"]


def write_archive(path: Path, n_train: int = 10, n_test: int = 3) -> Path:
    """A tiny tar.gz in the layout of cifar10-jpeg.tar.gz, each class one bright colour."""
    colours = [(250, 30, 30), (30, 250, 30), (30, 30, 250)]
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", n_train), ("test", n_test)):
            for cls, name in enumerate(CLASSES):
                for i in range(n):
                    pixels = np.empty((32, 32, 3), np.uint8)
                    pixels[:] = colours[cls]
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = len(buffer.getvalue())
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return path


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cifar_scenes")
    return write_archive(root / "tiny.tar.gz"), root / "cache"


def test_cifar10_scenes_have_exact_boxes_and_box_masks(tiny_archive):
    archive, cache = tiny_archive
    kwargs = dict(
        archive=str(archive),
        cache_dir=str(cache),
        num_train=60,
        num_val=20,
        num_test=20,
        image_size=64,
        min_scale=12,
        max_scale=24,
        val_fraction=0.2,
    )
    dm = CIFAR10ScenesDataModule(
        task="detection", background="plain", padding=0, flip=False, **kwargs
    )
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 4 and dm.class_names == ["background", *CLASSES]
    assert set(dm.source_objects["train"].tolist()).isdisjoint(dm.source_objects["val"].tolist())
    checked = 0
    for split in ("train", "val", "test"):
        data = dm.splits[split]
        masks = segmentation_masks(data["instances"], data["labels"])
        images, targets, indices = dm.batches(split)[0][:3]
        for row, (i, target) in enumerate(zip(indices.tolist(), targets, strict=True)):
            check_scene(masks[i], target, data["instances"][i])
            for box, label in zip(target["boxes"].long().tolist(), target["labels"], strict=True):
                x0, y0, x1, y1 = box
                if (masks[i, y0:y1, x0:x1] == label).all():  # a rectangle of the object
                    checked += 1
                    colour = images[row, :, y0:y1, x0:x1].mean((1, 2))
                    assert colour.argmax().item() == label - 1  # each class its own colour
            if len(target["boxes"]):  # the last pasted is whole: a square of its drawn size
                x0, y0, x1, y1 = target["boxes"][-1].tolist()
                assert x1 - x0 == y1 - y0 and 12 <= x1 - x0 <= 24
    assert checked > 50
    again = CIFAR10ScenesDataModule(
        task="detection", background="plain", padding=0, flip=False, **kwargs
    )
    again.setup()
    assert torch.equal(again.splits["train"]["images"], dm.splits["train"]["images"])
    seg = CIFAR10ScenesDataModule(**kwargs)  # segmentation, noise background by default
    seg.setup()
    images, masks, indices, keys = seg.batches("train")[0]
    assert images.shape == (32, 3, 64, 64) and masks.dtype == torch.int64
    assert seg.train_augmentation.flip and len(seg.mean) == 3 and seg.task == "segmentation"


def test_cifar10_scenes_without_archive_say_where_to_put_it(tmp_path):
    dm = CIFAR10ScenesDataModule(archive=str(tmp_path / "gone.tar.gz"), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.archive=") as error:
        dm.setup()
    assert str(tmp_path / "gone.tar.gz") in str(error.value)


@pytest.mark.slow
@pytest.mark.data
def test_cifar10_scenes_from_the_real_archive(tmp_path):
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"needs the CIFAR-10 JPEG archive at {REAL_ARCHIVE}")
    dm = CIFAR10ScenesDataModule(
        archive=str(REAL_ARCHIVE), task="detection", num_train=200, num_val=50, num_test=50
    )
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 11 and dm.class_names[1] == "airplane"
    images, targets, indices = dm.fetch(next(iter(dm.val_dataloader())))
    assert images.shape == (32, 3, 96, 96)
    masks = segmentation_masks(dm.splits["val"]["instances"], dm.splits["val"]["labels"])
    for i, target in zip(indices.tolist(), targets, strict=True):
        check_scene(masks[i], target, dm.splits["val"]["instances"][i])


# --- configs ---------------------------------------------------------------------------------

CONFIGS = {
    "digit_scenes": ("DigitScenesDataModule", "segmentation"),
    "digit_pose": ("DigitPoseDataModule", "regression"),
    "tabular_regression": ("TabularRegressionDataModule", "regression"),
    "cifar10_scenes": ("CIFAR10ScenesDataModule", "segmentation"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_instantiate(name):
    cls, task = CONFIGS[name]
    data = OmegaConf.load(PROJECT / "conf" / "data" / f"{name}.yaml")
    cfg = OmegaConf.create({"seed": 7, "split_seed": 123, "data": data})
    dm = instantiate(cfg.data)
    assert type(dm).__name__ == cls and dm.task == task
    assert dm.seed == 123 and dm.shuffle_seed == 7 and dm.on_device
    if "task" in data:  # the chosen task config picks the batch form
        cfg = OmegaConf.create(
            {"seed": 7, "split_seed": 123, "task": {"name": "detection"}, "data": data}
        )
        assert instantiate(cfg.data).task == "detection"


def test_tiny_config_builds_and_serves_a_batch():
    data = OmegaConf.load(PROJECT / "conf" / "data" / "digit_scenes.yaml")
    cfg = OmegaConf.create({"seed": 0, "split_seed": 0, "data": data})
    dm = instantiate(cfg.data, num_train=32, num_val=8, num_test=8)
    dm.setup()
    images, masks, indices = dm.fetch(next(iter(dm.test_dataloader())))
    assert images.shape == (8, 3, 64, 64) and masks.shape == (8, 64, 64)
