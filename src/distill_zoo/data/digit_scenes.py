"""Scenes of real handwritten digits, with exact masks and boxes, for segmentation and
detection without a download."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor

from distill_zoo.data.base import split_indices
from distill_zoo.data.dense_device import SceneDataModule, render_scenes, split_counts

TEST_FRACTION = 0.2
TEST_SEED = 0  # the test digits and scenes are fixed, like an official split, whatever the seed
STREAMS = {"train": 1, "val": 2, "test": 3}
CHUNK = 1024  # scenes rendered at once (bounds the memory of one paste)


def square(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of an int side or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = (int(v) for v in size)
    return height, width


def digit_source_splits(val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Positions in ``load_digits()`` of the source digits of each split, disjoint.

    The test digits are the stratified 20% that :class:`~distill_zoo.data.DigitsDataModule`
    tests on (fixed seed 0); ``val_fraction`` of the rest, stratified with ``seed``, are the
    validation digits (the digits classifier's validation split for the same values).
    """
    target = load_digits().target
    pool, test = split_indices(target, TEST_FRACTION, TEST_SEED)
    train, val = split_indices(target[pool], val_fraction, seed)
    return {"train": pool[train], "val": pool[val], "test": test}


def digit_images() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as float ``[N, 1, 8, 8]`` in [0, 1] and their labels int64 ``[N]``."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).div(16).unsqueeze(1)
    return images, torch.from_numpy(digits.target).long()


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] floats to uint8, rounded."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def render_digit_scenes(
    digits: Tensor,
    digit_labels: Tensor,
    sources: np.ndarray,
    num_scenes: int,
    rng: np.random.Generator,
    *,
    image_size: tuple[int, int],
    min_digits: int,
    max_digits: int,
    min_scale: int,
    max_scale: int,
    stroke_threshold: float,
    min_visible: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draws and renders ``num_scenes`` digit scenes.

    Each scene holds ``min_digits..max_digits`` digits (uniform), each drawn uniformly from
    ``sources``, upsampled bilinearly to a random side ``min_scale..max_scale`` and placed
    uniformly at random wholly inside the canvas, in slot order. A digit's *strokes* are its
    pixels brighter than ``stroke_threshold`` (of the full scale); they are opaque and make
    its instance; its fainter edge pixels show where nothing brighter lies below. So a pixel
    belongs to a digit exactly where the image is brighter than the threshold.

    Returns:
        uint8 images ``[N, 1, H, W]``, uint8 instance maps ``[N, H, W]``, int64 slot labels
        ``[N, max_digits]`` (digit + 1, or 0 for an empty slot), and the source digit of each
        slot (int64 ``[N, max_digits]``, a position in ``sources``' numbering; -1 where empty).
    """
    height, width = image_size
    threshold = stroke_threshold * 255

    def patches(src: Tensor, side: int) -> Tensor:
        scaled = F.interpolate(
            digits[src], size=(side, side), mode="bilinear", align_corners=False
        )
        return to_uint8(scaled)

    return render_scenes(
        rng,
        num_scenes,
        choose=lambda rng, shape: rng.choice(sources, shape),
        labels=digit_labels + 1,
        patches=patches,
        opaque=lambda patches, sizes: patches[:, 0] > threshold,
        background=lambda n, rng: torch.zeros(n, 1, height, width, dtype=torch.uint8),
        image_size=image_size,
        min_objects=min_digits,
        max_objects=max_digits,
        min_scale=min_scale,
        max_scale=max_scale,
        min_visible=min_visible,
        blend_max=True,
        chunk=CHUNK,
    )


class DigitScenesDataModule(SceneDataModule):
    """Scenes of 1-4 real handwritten digits (scikit-learn's ``load_digits``: UCI "Optical
    Recognition of Handwritten Digits", Alpaydin & Kaynak 1998, 8x8 images) on a black canvas,
    for semantic segmentation and object detection. No download; built in about a second.

    Classes: 0 background, ``d + 1`` for digit ``d`` (11 in all). Every mask and box is exact:
    a pixel is of digit class ``d + 1`` where a digit ``d``'s upsampled intensity exceeds
    ``stroke_threshold`` and no later digit's stroke covers it (the last pasted wins in image
    and mask), and a digit's box is the tight box (pixel-edge coordinates, see
    :func:`~distill_zoo.data.dense_device.instance_boxes`) of its visible stroke pixels. A digit
    that would hide more than ``1 - min_visible`` of an earlier digit's strokes is left out
    of its scene (with ``min_visible=0`` all are pasted and a digit hidden entirely is
    dropped), so a scene may hold fewer digits than drawn.

    The source digits of the three splits are disjoint: the test scenes are made of the 20%
    of digits :class:`~distill_zoo.data.DigitsDataModule` tests on and are fixed whatever
    ``seed`` (like an official test set); the rest is split with ``seed`` into training and
    validation digits (``val_fraction``), and the training and validation scenes are drawn
    from ``seed`` too.

    Batches (see :class:`~distill_zoo.data.dense_device.SceneDataModule`): segmentation images
    are normalised with the training scenes' mean and std (grey, repeated to
    ``in_channels``); detection images are in [0, 1]. The training augmentation is a random
    crop with ``padding`` pixels of zero padding (black, i.e. background; masks are padded
    with background 0) applied jointly to image, mask and boxes; no flip by default, since
    mirrored digits are not digits (a mirrored 2 is no 2). Order and augmentation follow
    ``shuffle_seed`` and the epoch.

    Args:
        task: ``"segmentation"`` (batches with masks) or ``"detection"`` (with boxes).
        image_size: Canvas side, or ``(height, width)``.
        channels: Channels of the served images: 1, or 3 (grey repeated, for RGB models).
        num_train: Training scenes.
        num_val: Validation scenes.
        num_test: Test scenes.
        min_digits: Fewest digits drawn per scene (0 allows empty scenes).
        max_digits: Most digits per scene.
        min_scale: Smallest digit side in pixels (digits are square, upsampled from 8x8).
        max_scale: Largest digit side in pixels.
        stroke_threshold: Intensity (of 1) above which a digit's pixel is a stroke.
        min_visible: Share of each digit's stroke pixels that later digits must leave visible.
        padding: Zero padding of the training crop; 0: no crop.
        flip: Horizontal flips in training (mirrors digits: off by default).
        val_fraction: Share of the non-test digits used for validation scenes.
        seed: Seed of the source split and of the training and validation scenes.
        batch_size: Scenes per batch.
        num_workers: Unused (batches are gathered from memory).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the scenes on the training device and build batches there.
        shuffle_seed: Seed of the order and augmentation.
        augment_rounds: Replay this many fixed augmentation rounds (FKD); ``None``: fresh
            crops every epoch.
    """

    def __init__(
        self,
        *,
        task: str = "segmentation",
        image_size: int | Sequence[int] = 64,
        channels: int = 3,
        num_train: int = 2000,
        num_val: int = 300,
        num_test: int = 300,
        min_digits: int = 1,
        max_digits: int = 4,
        min_scale: int = 12,
        max_scale: int = 28,
        stroke_threshold: float = 0.4,
        min_visible: float = 0.5,
        padding: int = 8,
        flip: bool = False,
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
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self._check_layout(min_scale, max_scale, min_digits, max_digits, "digits")
        if not 0 < stroke_threshold < 1:
            raise ValueError(f"stroke_threshold must lie in (0, 1), got {stroke_threshold}")
        if not 0 <= min_visible <= 1:
            raise ValueError(f"min_visible must lie in [0, 1], got {min_visible}")
        self.in_channels = channels
        self.counts = split_counts(num_train, num_val, num_test)
        self.min_digits, self.max_digits = min_digits, max_digits
        self.min_scale, self.max_scale = min_scale, max_scale
        self.stroke_threshold = stroke_threshold
        self.min_visible = min_visible
        self.num_classes = 11
        self.class_names = ["background", *(str(d) for d in range(10))]

    def make_splits(self) -> dict[str, dict[str, Tensor]]:
        digits, digit_labels = digit_images()
        sources = digit_source_splits(self.val_fraction, self.seed)
        self.source_digits = sources  # positions in load_digits() of each split's digits

        def render(name: str, count: int, rng: np.random.Generator) -> tuple[Tensor, ...]:
            return render_digit_scenes(
                digits,
                digit_labels,
                sources[name],
                count,
                rng,
                image_size=self.image_size,
                min_digits=self.min_digits,
                max_digits=self.max_digits,
                min_scale=self.min_scale,
                max_scale=self.max_scale,
                stroke_threshold=self.stroke_threshold,
                min_visible=self.min_visible,
            )

        splits, used = self._render_splits(render, STREAMS, TEST_SEED)
        self.scene_sources: dict[str, Tensor] = used  # split -> source digit of each slot
        return splits
