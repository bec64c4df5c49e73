"""Pose regression on real handwritten digits: where, how large and how turned a digit is."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.dense_device import (
    InMemoryDenseDataModule,
    Split,
    channel_stats,
    split_counts,
    split_rng,
)
from distill_zoo.data.digit_scenes import TEST_SEED, digit_images, digit_source_splits, to_uint8

STREAMS = {"train": 11, "val": 12, "test": 13}
TARGET_NAMES = ["centre_x", "centre_y", "scale", "sin_rotation", "cos_rotation"]
CHUNK = 2048


def similarity_grid(
    centre: Tensor,
    side: Tensor,
    angle: Tensor,
    size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``grid_sample`` grid that renders an 8x8 source onto ``size`` canvases under a
    similarity transform.

    The source square (8 pixels a side, centre at its middle) is scaled to ``side`` canvas
    pixels, turned by ``angle`` and its centre put at ``centre``. Canvas coordinates are
    continuous pixel-edge coordinates: pixel ``(row i, column j)`` has its centre at
    ``(x, y) = (j + 0.5, i + 0.5)``, ``x`` to the right, ``y`` down. A source point at offset
    ``v`` (source pixels, ``(x, y)``) from the source centre lands at
    ``centre + side / 8 * R(angle) v`` with ``R = [[cos, -sin], [sin, cos]]``: with ``y`` down,
    a positive angle turns clockwise on screen.

    Args:
        centre: ``[n, 2]`` canvas ``(x, y)`` of the source centre.
        side: ``[n]`` side of the source square on the canvas, in pixels.
        angle: ``[n]`` rotation in radians.
        size: Canvas ``(height, width)``.
        dtype: Of the grid (the transform itself is computed in float64).

    Returns:
        ``[n, H, W, 2]`` for ``grid_sample(..., align_corners=False)``.
    """
    height, width = size
    centre, side, angle = (t.to(torch.float64) for t in (centre, side, angle))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Source normalised coordinate u = (2 / side) R^T (q - centre), q the canvas point in
    # pixels, q = (x_norm + 1) * (W / 2, H / 2) for the canvas's normalised coordinate.
    inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # R^T
    inv = inv * (2 / side)[:, None, None]
    half = torch.tensor([width / 2, height / 2], dtype=torch.float64)
    theta = torch.cat([inv * half[None, None, :], (inv @ (half[None, :] - centre)[:, :, None])], 2)
    return F.affine_grid(theta, [len(theta), 1, height, width], align_corners=False).to(dtype)


def render_pose(sources: Tensor, centre: Tensor, side: Tensor, angle: Tensor, size) -> Tensor:
    """``sources`` (float ``[n, C, h, w]``, any square source) rendered at the given poses
    (see :func:`similarity_grid`), bilinear, zero outside the source: float ``[n, C, H, W]``."""
    grid = similarity_grid(centre, side, angle, size, sources.dtype)
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DigitPoseDataModule(InMemoryDenseDataModule):
    """Regression of the pose of one real handwritten digit (scikit-learn's ``load_digits``,
    8x8) rendered on a black canvas under a random similarity transform: the small, offline
    analogue of camera-pose regression.

    Each sample draws a source digit, a side ``s`` uniform in ``[min_scale, max_scale]``
    pixels, a rotation ``a`` uniform in ``[-max_rotation, max_rotation)`` and a centre
    uniform among the positions that keep the turned 8x8 frame wholly inside the canvas, and
    renders the digit with :func:`render_pose` (bilinear). The target (D = 5) is exact by
    construction: ``(centre_x / S, centre_y / S, s / S, sin a, cos a)``, the centre of the
    digit's 8x8 frame in canvas fractions (pixel-edge coordinates: 0 is the left edge, 1 the
    right), its side as a fraction of the canvas side ``S``, and the rotation (positive:
    clockwise on screen). The default rotation range is a half turn, ``[-pi/2, pi/2)``: over
    a full turn a 6 turned by pi is a 9 and 0, 1, 8 look alike turned by pi, so the rotation
    would be ambiguous; set ``max_rotation`` to pi for the full circle.

    Targets are standardised with the training split's mean and (population) std, exposed as
    ``target_mean`` and ``target_std`` (float32 ``[5]``); images are normalised with the
    training images' mean and std. There is no augmentation (a flip or crop would change the
    pose); training batches carry augmentation keys of 0. Source digits of the three splits
    are disjoint, as in :class:`~distill_zoo.data.digit_scenes.DigitScenesDataModule` (the
    test digits and poses are fixed whatever ``seed``).

    Batches: ``(images float32 [B, C, S, S], targets float32 [B, 5], indices int64 [B])``,
    training ones followed by the augmentation keys.

    Args:
        image_size: Canvas side ``S``.
        channels: Channels of the served images: 1, or 3 (grey repeated).
        num_train: Training samples.
        num_val: Validation samples.
        num_test: Test samples.
        min_scale: Smallest side of the digit's 8x8 frame, in pixels.
        max_scale: Largest side, in pixels.
        max_rotation: Rotations are drawn from ``[-max_rotation, max_rotation)``, radians,
            at most pi.
        val_fraction: Share of the non-test digits used for validation samples.
        seed: Seed of the source split and of the training and validation samples.
        batch_size: Samples per batch.
        num_workers: Unused (batches are gathered from memory).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the data on the training device and build batches there.
        shuffle_seed: Seed of the order.
        augment_rounds: Accepted for a uniform interface; without augmentation it changes
            nothing.
    """

    task = "regression"

    def __init__(
        self,
        *,
        image_size: int = 32,
        channels: int = 3,
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 500,
        min_scale: float = 10.0,
        max_scale: float = 18.0,
        max_rotation: float = math.pi / 2,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        drop_last: bool = False,
        on_device: bool = True,
        shuffle_seed: int = 0,
        augment_rounds: int | None = None,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            on_device=on_device,
            shuffle_seed=shuffle_seed,
            augment_rounds=augment_rounds,
        )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not 0 < min_scale <= max_scale or max_scale * math.sqrt(2) > image_size:
            raise ValueError(
                f"need 0 < min_scale <= max_scale and max_scale * sqrt(2) <= image_size "
                f"({image_size}) so that a turned digit fits, got {min_scale}..{max_scale}"
            )
        if not 0 <= max_rotation <= math.pi:
            raise ValueError(f"max_rotation must lie in [0, pi], got {max_rotation}")
        self.image_size = (image_size, image_size)
        self.in_channels = channels
        self.input_shape = (channels, image_size, image_size)
        self.counts = split_counts(num_train, num_val, num_test)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.max_rotation = float(max_rotation)
        self.num_classes = len(TARGET_NAMES)
        self.target_names = list(TARGET_NAMES)
        self.class_names = self.target_names

    def draw_poses(self, n: int, rng: np.random.Generator) -> Tensor:
        """``n`` poses ``(centre_x, centre_y, side, angle)`` in pixels and radians, float64."""
        size = self.image_size[0]
        side = rng.uniform(self.min_scale, self.max_scale, n)
        angle = rng.uniform(-self.max_rotation, self.max_rotation, n)
        # Half the extent of the turned square along x and along y (equal for a square).
        half = side / 2 * (np.abs(np.cos(angle)) + np.abs(np.sin(angle)))
        centre = half[:, None] + rng.uniform(0, 1, (n, 2)) * (size - 2 * half)[:, None]
        return torch.from_numpy(np.stack([centre[:, 0], centre[:, 1], side, angle], 1))

    def render(self, digits: Tensor, poses: Tensor) -> Tensor:
        """uint8 ``[n, 1, S, S]`` images of ``digits`` (float ``[n, 1, 8, 8]``) at ``poses``."""
        out = []
        for start in range(0, len(poses), CHUNK):
            p = poses[start : start + CHUNK]
            rendered = render_pose(
                digits[start : start + CHUNK], p[:, :2], p[:, 2], p[:, 3], self.image_size
            )
            out.append(to_uint8(rendered))
        return torch.cat(out)

    def make_splits(self) -> dict[str, Split]:
        digits, _ = digit_images()
        sources = digit_source_splits(self.val_fraction, self.seed)
        self.source_digits = sources
        self.sample_sources: dict[str, Tensor] = {}
        self.poses: dict[str, Tensor] = {}  # split -> (centre_x, centre_y, side, angle), float64
        raw, images = {}, {}
        size = self.image_size[0]
        for name, count in self.counts.items():
            rng = split_rng(TEST_SEED if name == "test" else self.seed, STREAMS[name])
            chosen = torch.from_numpy(rng.choice(sources[name], count))
            poses = self.draw_poses(count, rng)
            self.sample_sources[name] = chosen
            self.poses[name] = poses
            images[name] = self.render(digits[chosen], poses)
            centre, side, angle = poses[:, :2] / size, poses[:, 2:3] / size, poses[:, 3:4]
            raw[name] = torch.cat([centre, side, torch.sin(angle), torch.cos(angle)], 1)
        self.target_mean = raw["train"].mean(0).float()
        self.target_std = raw["train"].std(0, correction=0).clamp_min(1e-6).float()
        mean, std = channel_stats(images["train"])
        self.train_augmentation = CropFlip(mean=mean, std=std)
        self.mean, self.std = mean * self.in_channels, std * self.in_channels
        return {
            name: {
                "images": images[name],
                "targets": (
                    (raw[name] - self.target_mean.double()) / self.target_std.double()
                ).float(),
            }
            for name in self.counts
        }

    def make_batch(self, split: Split, rows: Tensor, keys: Tensor | None) -> tuple[Tensor, Tensor]:
        images = self.train_augmentation.normalise(split["images"][rows])
        if images.shape[1] != self.in_channels:
            images = images.expand(-1, self.in_channels, -1, -1).contiguous()
        return images, split["targets"][rows]

    def unstandardise(self, targets: Tensor) -> Tensor:
        """Targets (or predictions) in the original units, from standardised ones."""
        return targets * self.target_std.to(targets) + self.target_mean.to(targets)
