"""Scenes of real CIFAR-10 objects on larger canvases, with exact boxes and box masks, for
detection and segmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill_zoo.data.base import split_indices
from distill_zoo.data.cifar10_jpeg import CIFAR10JPEGDataModule
from distill_zoo.data.dense_device import SceneDataModule, render_scenes, split_counts
from distill_zoo.data.digit_scenes import square, to_uint8

TEST_SEED = 0  # the test scenes are fixed, like an official split, whatever the seed
STREAMS = {"train": 21, "val": 22, "test": 23}
CHUNK = 256  # scenes rendered at once (bounds the memory of one paste)
BACKGROUNDS = ("noise", "plain")


def backgrounds(n: int, size: tuple[int, int], kind: str, rng: np.random.Generator) -> Tensor:
    """``n`` uint8 RGB canvases ``[n, 3, H, W]``.

    ``"plain"``: one random colour per canvas. ``"noise"``: a smooth random colour field (a
    random 4x4 colour grid upsampled bilinearly) plus per-pixel Gaussian noise (std 12), so
    that the background is textured but unlike any object.
    """
    height, width = size
    if kind == "plain":
        colour = torch.from_numpy(rng.integers(0, 256, (n, 3, 1, 1), dtype=np.uint8))
        return colour.expand(n, 3, height, width).contiguous()
    coarse = torch.from_numpy(rng.uniform(0, 1, (n, 3, 4, 4))).float()
    smooth = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    noise = torch.from_numpy(rng.standard_normal((n, 3, height, width), dtype=np.float32))
    return to_uint8(noise.mul_(12 / 255).add_(smooth).clamp_(0, 1))


def render_object_scenes(
    objects: np.ndarray,
    object_labels: np.ndarray,
    num_scenes: int,
    rng: np.random.Generator,
    *,
    image_size: tuple[int, int],
    background: str,
    min_objects: int,
    max_objects: int,
    min_scale: int,
    max_scale: int,
    min_visible: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draws and renders ``num_scenes`` scenes of square objects.

    Each scene holds ``min_objects..max_objects`` objects (uniform) drawn uniformly from
    ``objects`` (uint8 ``[N, h, w, 3]``), each resized (bilinear, antialiased) to a random
    side ``min_scale..max_scale`` and placed wholly inside the canvas; every pixel of its
    square is the object's (its instance and its box mask), the last pasted wins.

    Returns:
        uint8 images ``[N, 3, H, W]``, uint8 instance maps ``[N, H, W]``, int64 slot labels
        ``[N, max_objects]`` (class + 1, 0 for an empty slot), and the object of each slot
        (int64 ``[N, max_objects]``, a row of ``objects``; -1 where empty).
    """
    source = torch.from_numpy(objects).permute(0, 3, 1, 2)  # uint8 NCHW
    span = torch.arange(max_scale)

    def patches(src: Tensor, side: int) -> Tensor:
        scaled = F.interpolate(
            source[src].float().div_(255),
            size=(side, side),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        return to_uint8(scaled.clamp_(0, 1))

    def opaque(patches: Tensor, sizes: Tensor) -> Tensor:
        within = span[None, :] < sizes[:, None]  # [n, P]
        return within[:, :, None] & within[:, None, :]

    return render_scenes(
        rng,
        num_scenes,
        choose=lambda rng, shape: rng.integers(0, len(objects), shape),
        labels=torch.from_numpy(np.asarray(object_labels, dtype=np.int64)) + 1,
        patches=patches,
        opaque=opaque,
        background=lambda n, rng: backgrounds(n, image_size, background, rng),
        image_size=image_size,
        min_objects=min_objects,
        max_objects=max_objects,
        min_scale=min_scale,
        max_scale=max_scale,
        min_visible=min_visible,
        blend_max=False,
        chunk=CHUNK,
    )


class CIFAR10ScenesDataModule(SceneDataModule):
    """Scenes of 1-3 real CIFAR-10 images (Krizhevsky 2009) pasted at random sizes on a larger
    canvas, from the project's JPEG archive (read and cached by
    :class:`~distill_zoo.data.cifar10_jpeg.CIFAR10JPEGDataModule`), for object detection and
    for segmentation by box masks.

    Classes: 0 background, ``c + 1`` for CIFAR-10 class ``c`` (11 in all). Each object is a
    whole 32x32 CIFAR image (its own background included), resized to a square of
    ``min_scale..max_scale`` pixels and placed wholly inside the canvas; the last pasted wins.
    Its mask is its visible square and its box the tight box of that (pixel-edge coordinates,
    see :func:`~distill_zoo.data.dense_device.instance_boxes`), so boxes are exact. An object
    that would hide more than ``1 - min_visible`` of an earlier one is left out of its
    scene. The canvas is a smooth colour field with pixel noise (``background="noise"``) or one
    plain colour.

    Objects of the training and validation scenes come from CIFAR-10's training images, split
    (stratified, ``val_fraction``, ``seed``) into disjoint parts; those of the test scenes from
    its test images, and the test scenes are fixed whatever ``seed``.

    Batches (see :class:`~distill_zoo.data.dense_device.SceneDataModule`): segmentation images
    normalised with the training scenes' per-channel mean and std, detection images in
    [0, 1]. Training augmentation (both tasks): random crop with ``padding`` pixels of zero
    padding (background 0 in masks) and horizontal flips, jointly on image, mask and boxes.

    ``prepare_data()`` decodes the archive once into ``cache_dir`` (shared with
    ``CIFAR10JPEGDataModule``); a missing archive raises FileNotFoundError naming the path
    and the fix (``data.archive=...``).

    Args:
        task: ``"segmentation"`` or ``"detection"``.
        archive: The CIFAR-10 JPEG ``.tar.gz`` (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).
        cache_dir: Folder of the decoded arrays.
        image_size: Canvas side, or ``(height, width)``.
        num_train: Training scenes.
        num_val: Validation scenes.
        num_test: Test scenes.
        min_objects: Fewest objects drawn per scene (0 allows empty scenes).
        max_objects: Most objects per scene.
        min_scale: Smallest object side in pixels (CIFAR images are 32).
        max_scale: Largest object side in pixels.
        min_visible: Share of each object that later objects must leave visible.
        background: ``"noise"`` or ``"plain"``.
        padding: Zero padding of the training crop; 0: no crop.
        flip: Horizontal flips in training.
        val_fraction: Share of CIFAR-10's training images whose objects make validation scenes.
        seed: Seed of the object split and of the training and validation scenes.
        batch_size: Scenes per batch.
        num_workers: Unused (batches are gathered from memory).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the scenes on the training device and build batches there.
        shuffle_seed: Seed of the order and augmentation.
        augment_rounds: Replay this many fixed augmentation rounds (FKD); ``None``: fresh
            crops and flips every epoch.
    """

    def __init__(
        self,
        *,
        task: str = "segmentation",
        archive: str = "../shared/data/cifar10-jpeg.tar.gz",
        cache_dir: str = "~/.cache/distill_zoo/cifar10_jpeg",
        image_size: int | Sequence[int] = 96,
        num_train: int = 2000,
        num_val: int = 300,
        num_test: int = 300,
        min_objects: int = 1,
        max_objects: int = 3,
        min_scale: int = 24,
        max_scale: int = 48,
        min_visible: float = 0.5,
        background: str = "noise",
        padding: int = 12,
        flip: bool = True,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        drop_last: bool = False,
        on_device: bool = True,
        shuffle_seed: int = 0,
        augment_rounds: int | None = None,
    ) -> None:
        super().__init__(
            task=task,
            padding=padding,
            flip=flip,
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            on_device=on_device,
            shuffle_seed=shuffle_seed,
            augment_rounds=augment_rounds,
        )
        self.image_size = square(image_size)
        self._check_layout(min_scale, max_scale, min_objects, max_objects, "objects")
        if not 0 <= min_visible <= 1:
            raise ValueError(f"min_visible must lie in [0, 1], got {min_visible}")
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
        self.reader = CIFAR10JPEGDataModule(archive=archive, cache_dir=cache_dir)
        self.in_channels = 3
        self.counts = split_counts(num_train, num_val, num_test)
        self.min_objects, self.max_objects = min_objects, max_objects
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_visible = min_visible
        self.background = background
        self.num_classes = 11  # until setup() has read the archive's classes

    def prepare_data(self) -> None:
        """Decodes the archive into the cache unless a current cache is there."""
        self.reader.prepare_data()

    def make_splits(self) -> dict[str, dict[str, Tensor]]:
        train_images, train_labels, test_images, test_labels, names = self.reader.load_arrays()
        self.num_classes = len(names) + 1
        self.class_names = ["background", *names]
        train, val = split_indices(train_labels, self.val_fraction, self.seed)
        pools = {
            "train": (train_images[train], train_labels[train]),
            "val": (train_images[val], train_labels[val]),
            "test": (test_images, test_labels),
        }
        # Rows of the archive's training (train, val) or test (test) images behind each split.
        self.source_objects = {"train": train, "val": val, "test": np.arange(len(test_labels))}

        def render(name: str, count: int, rng: np.random.Generator) -> tuple[Tensor, ...]:
            objects, labels = pools[name]
            return render_object_scenes(
                objects,
                labels,
                count,
                rng,
                image_size=self.image_size,
                background=self.background,
                min_objects=self.min_objects,
                max_objects=self.max_objects,
                min_scale=self.min_scale,
                max_scale=self.max_scale,
                min_visible=self.min_visible,
            )

        splits, used = self._render_splits(render, STREAMS, TEST_SEED)
        self.scene_sources: dict[str, Tensor] = {}  # split -> source row of each slot
        for name, slots in used.items():
            rows = torch.from_numpy(self.source_objects[name])
            self.scene_sources[name] = torch.where(slots >= 0, rows[slots.clamp_min(0)], -1)
        return splits
