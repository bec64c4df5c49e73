"""In-memory data for segmentation, detection and regression, served on the device.

Scene data sets (:mod:`~distill_zoo.data.digit_scenes`, :mod:`~distill_zoo.data.cifar10_scenes`)
store each split as three tensors: the images (uint8 ``[N, c, H, W]``), an *instance map*
(uint8 ``[N, H, W]``: 0 for background, ``m + 1`` where object slot ``m`` is visible) and the
class of each slot (int64 ``[N, M]``, 1..K-1, or 0 for a slot left empty). Everything a task
needs follows from them on the device, after augmentation: the segmentation mask is the slot
class looked up through the instance map, and each detection box is the tight box of its
instance's visible pixels. So one random crop and flip, applied by one gather to the image and
to the instance map, moves masks and boxes with the image exactly.

Regression data sets store inputs and standardised targets.

Batches are built as on the classification path (:mod:`~distill_zoo.data.device`): loaders
yield :class:`~distill_zoo.data.device.IndexBatch` es with augmentation keys drawn from
``(shuffle_seed, epoch)``, and :meth:`InMemoryDenseDataModule.transfer_batch_to_device` builds
the batch where Lightning runs (``on_device=True``), or the loader builds it on the CPU
(``on_device=False``). Training batches end with the augmentation keys, as classification
ones do: ``(inputs, targets, indices, aug_keys)``; evaluation batches are
``(inputs, targets, indices)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.base import BaseDataModule
from distill_zoo.data.device import IndexBatch, IndexBatches, check_augment_rounds

SPLITS = ("train", "val", "test")
IGNORE_INDEX = 255
"""The segmentation ignore index of the contract; our scene masks never need it (see
:class:`InMemoryDenseDataModule`), but a task can rely on this value."""

Split = dict[str, Tensor]


def split_counts(num_train: int, num_val: int, num_test: int) -> dict[str, int]:
    """``{"train": num_train, "val": num_val, "test": num_test}``, each checked to be >= 1."""
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"num_{name} must be an integer >= 1, got {count!r}")
    return counts


def split_rng(seed: int, stream: int) -> np.random.Generator:
    """A numpy generator determined by ``(seed, stream)`` alone."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, stream]))


# --- joint crop and flip --------------------------------------------------------------------


def crop_flip_maps(maps: Tensor, rows: Tensor, keys: Tensor, aug: CropFlip, fill: int = 0):
    """``maps[rows]`` cropped and flipped as ``aug.apply`` crops and flips images.

    The same gather as :meth:`~distill_zoo.data.augment.CropFlip.apply`, for per-pixel maps
    (masks, instance maps) instead of images: padding is filled with ``fill``.

    Args:
        maps: ``[N, H, W]`` (any dtype), on any device.
        rows: Rows of ``maps`` in the batch, int64 ``[B]``.
        keys: Augmentation key of each sample, int64 ``[B]``.
        aug: The augmentation whose keys these are.
        fill: Value of the padded pixels.

    Returns:
        ``[B, H, W]``, the dtype of ``maps``.
    """
    _, height, width = maps.shape
    offset_y, offset_x, flip = aug.decode(keys)
    ys = torch.arange(height, device=maps.device)
    xs = torch.arange(width, device=maps.device)
    src_y = ys + offset_y[:, None] - aug.padding
    cols = torch.where(flip[:, None].bool(), width - 1 - xs, xs)
    src_x = cols + offset_x[:, None] - aug.padding
    inside = ((src_y >= 0) & (src_y < height))[:, :, None] & ((src_x >= 0) & (src_x < width))[
        :, None, :
    ]
    out = maps[
        rows[:, None, None],
        src_y.clamp(0, height - 1)[:, :, None],
        src_x.clamp(0, width - 1)[:, None, :],
    ]
    return out.masked_fill_(~inside, fill)


def instance_boxes(instances: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """The tight box of each instance's pixels, in pixel-edge coordinates.

    Pixel ``(row i, column j)`` covers ``[j, j + 1) x [i, i + 1)``, so an instance whose
    pixels span columns ``j0..j1`` and rows ``i0..i1`` has the box ``(j0, i0, j1 + 1, i1 + 1)``
    (``torchvision.ops.masks_to_boxes`` plus one on the far corner): a one-pixel object has a
    box of area 1, never a degenerate one.

    Args:
        instances: Instance maps, ``[B, H, W]``: 0 background, ``m + 1`` for slot ``m``.
        num_slots: ``M``, the number of slots.

    Returns:
        Boxes float32 ``[B, M, 4]`` (xyxy, zeros for absent slots) and whether each slot has
        any pixel, bool ``[B, M]``.
    """
    _, height, width = instances.shape
    slots = torch.arange(1, num_slots + 1, device=instances.device, dtype=instances.dtype)
    onehot = instances[:, None] == slots[None, :, None, None]  # [B, M, H, W]
    rows, cols = onehot.any(3), onehot.any(2)  # [B, M, H], [B, M, W]
    present = rows.any(2)
    ys = torch.arange(height, device=instances.device)
    xs = torch.arange(width, device=instances.device)
    y0 = torch.where(rows, ys, height).amin(2)
    y1 = torch.where(rows, ys, -1).amax(2) + 1
    x0 = torch.where(cols, xs, width).amin(2)
    x1 = torch.where(cols, xs, -1).amax(2) + 1
    boxes = torch.stack([x0, y0, x1, y1], 2).to(torch.float32)
    return boxes.masked_fill_(~present[:, :, None], 0), present


def detection_targets(instances: Tensor, slot_labels: Tensor) -> list[dict[str, Tensor]]:
    """torchvision detection targets of a batch of instance maps.

    Args:
        instances: ``[B, H, W]`` uint8, 0 background, ``m + 1`` for slot ``m``.
        slot_labels: ``[B, M]`` int64 class of each slot (0: empty slot).

    Returns:
        ``B`` dicts ``{"boxes": float32 [N, 4] xyxy, "labels": int64 [N]}``, one box per slot
        that has a class and at least one visible pixel, in slot order.
    """
    boxes, present = instance_boxes(instances, slot_labels.shape[1])
    keep = present & (slot_labels > 0)
    counts = keep.sum(1).tolist()  # the one synchronisation
    kept_boxes = boxes[keep].split(counts)
    kept_labels = slot_labels[keep].split(counts)
    return [{"boxes": b, "labels": lab} for b, lab in zip(kept_boxes, kept_labels, strict=True)]


def segmentation_masks(instances: Tensor, slot_labels: Tensor) -> Tensor:
    """Class masks, int64 ``[B, H, W]``: the class of the slot each pixel shows, 0 for
    background."""
    table = torch.cat([slot_labels.new_zeros(len(slot_labels), 1), slot_labels], 1)
    flat = instances.reshape(len(instances), -1).long()
    return table.gather(1, flat).view(instances.shape)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 or [0, 1] images
    ``[N, C, H, W]``, in [0, 1] units (accumulated in float64, a chunk at a time)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(256):
        x = chunk.to(torch.float64)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    count = images.numel() // channels
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt() / scale
    return tuple((mean / scale).tolist()), tuple(std.clamp_min(1e-6).tolist())


# --- the DataModule ---------------------------------------------------------------------------


class InMemoryDenseDataModule(BaseDataModule):
    """A DataModule whose three splits are tensors built by :meth:`make_splits`, served as
    batches of one task (``segmentation``, ``detection`` or ``regression``).

    Subclasses implement :meth:`make_splits` (which also sets the public attributes the data
    decide: ``num_classes``, ``class_names``, normalisation, ...) and :meth:`make_batch`, and
    set ``train_augmentation`` (a :class:`~distill_zoo.data.augment.CropFlip`; its
    normalisation is applied to evaluation batches too). Every split keeps its own tensors,
    so a batch's ``indices`` are rows of its split.

    Loaders yield :class:`~distill_zoo.data.device.IndexBatch` es on both paths;
    :meth:`transfer_batch_to_device` builds each batch on the device (``on_device=True``: the
    data are copied there once) or on the CPU and copies it over (``on_device=False``).
    ``num_workers`` is accepted for the shared interface and unused: a batch is one gather
    from memory. Under "16-true"/"bf16-true" precision only the inputs are cast; targets
    (boxes, regression values) stay float32.

    Args:
        val_fraction: Share of the non-test source data held out for validation, in (0, 1).
        seed: Seed of the source split and of the training and validation data.
        batch_size: Samples per batch.
        num_workers: Unused (see above).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the data on the training device and build batches there; else build
            them on the CPU and copy them to the device.
        shuffle_seed: Seed of the order and of the augmentation (the run's ``seed``).
        augment_rounds: Replay this many fixed augmentation rounds (FKD); ``None``: fresh
            augmentation every epoch.
    """

    task: str
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        *,
        val_fraction: float,
        seed: int,
        batch_size: int,
        num_workers: int,
        drop_last: bool,
        on_device: bool,
        shuffle_seed: int,
        augment_rounds: int | None,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
        )
        check_augment_rounds(augment_rounds)
        self.on_device = on_device
        self.shuffle_seed = shuffle_seed
        self.augment_rounds = augment_rounds
        self.splits: dict[str, Split] | None = None
        self._stored: dict[str, dict[str, Split]] = {}

    # --- what subclasses give -------------------------------------------------------------

    def make_splits(self) -> dict[str, Split]:
        """Builds ``{"train": {...}, "val": {...}, "test": {...}}`` of CPU tensors with the
        samples along dimension 0, and sets the attributes only the data can tell."""
        raise NotImplementedError

    def make_batch(self, split: Split, rows: Tensor, keys: Tensor | None) -> tuple[Any, Any]:
        """``(inputs, targets)`` of ``split``'s samples ``rows``, augmented by ``keys``
        (``None``: evaluation, no augmentation), all on ``split``'s device."""
        raise NotImplementedError

    # --- setup and loaders ----------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Builds all three splits on the first call; later calls do nothing."""
        if self.splits is not None:
            return
        splits = self.make_splits()
        for name in SPLITS:
            if not len(next(iter(splits[name].values()))):
                raise ValueError(f"{type(self).__name__}: the {name} split is empty")
        self.num_train_samples = len(next(iter(splits["train"].values())))
        self.splits = splits

    def dataset_sizes(self) -> dict[str, int]:
        """Samples per split (after ``setup()``)."""
        self._require_setup()
        return {name: len(next(iter(s.values()))) for name, s in self.splits.items()}

    def train_dataloader(self) -> IndexBatches:
        return self._loader("train")

    def val_dataloader(self) -> IndexBatches:
        return self._loader("val")

    def test_dataloader(self) -> IndexBatches:
        return self._loader("test")

    def _require_setup(self) -> None:
        if self.splits is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for data")

    def _loader(self, split: str) -> IndexBatches:
        self._require_setup()
        rank, world_size = 0, 1
        if self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
        train = split == "train"
        return IndexBatches(
            split,
            self.dataset_sizes()[split],
            self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            seed=self.shuffle_seed,
            augmentation=self.train_augmentation if train else None,
            augment_rounds=self.augment_rounds,
            rank=rank,
            world_size=world_size,
            epoch_source=self._trainer_epoch,
        )

    def _trainer_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    # --- batches --------------------------------------------------------------------------

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        """Builds :class:`IndexBatch` es on ``device`` (or on the CPU and copies them there,
        with ``on_device=False``); moves anything else as Lightning does."""
        if not isinstance(batch, IndexBatch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if self.on_device:
            inputs, *rest = self.fetch(batch, device)
        else:
            built = self.fetch(batch, "cpu")
            inputs, *rest = super().transfer_batch_to_device(built, device, dataloader_idx)
        if self.trainer is not None:
            # Lightning casts floating inputs for "16-true"/"bf16-true" before the transfer,
            # when our batch held only indices: cast the inputs now (targets stay float32).
            inputs = self.trainer.precision_plugin.convert_input(inputs)
        return (inputs, *rest)

    def fetch(self, batch: IndexBatch, device: torch.device | str | None = None) -> tuple:
        """The inputs, targets, indices (and, for training, augmentation keys) of ``batch``.

        Args:
            batch: A batch from this module's loaders.
            device: Where to build it; ``None``: where ``batch.indices`` lie.
        """
        device = batch.indices.device if device is None else torch.device(device)
        split = self._on(device)[batch.split]
        indices = batch.indices.to(device, non_blocking=True)
        if batch.aug_keys is None:
            return (*self.make_batch(split, indices, None), indices)
        keys = batch.aug_keys.to(device, non_blocking=True)
        return (*self.make_batch(split, indices, keys), indices, keys)

    def _on(self, device: torch.device) -> dict[str, Split]:
        self._require_setup()
        key = str(device)
        if key not in self._stored:
            self._stored[key] = {
                name: {k: v.to(device) for k, v in split.items()}
                for name, split in self.splits.items()
            }
        return self._stored[key]

    def batches(self, split: str, device: torch.device | str = "cpu", epoch: int = 0):
        """Every batch of ``split`` for ``epoch`` built on ``device`` (for scripts and tests:
        the order and augmentation Lightning would see)."""
        return [self.fetch(b, device) for b in self._loader(split).batches(epoch)]


class SceneDataModule(InMemoryDenseDataModule):
    """Images with objects, served as segmentation or detection batches.

    Splits hold ``images`` (uint8 ``[N, c, H, W]``; grey images are stored once and repeated
    to ``in_channels`` in the batch), ``instances`` (uint8 ``[N, H, W]``) and ``labels``
    (int64 ``[N, M]``). Segmentation batches are ``(images float32 normalised, masks int64
    [B, H, W], indices)``; detection batches ``(images float32 in [0, 1], list of
    {"boxes", "labels"}, indices)``. The training augmentation (``padding``, ``flip``)
    serves both tasks: the crop's zero padding is background in the mask (0: nothing is
    there; the padded pixels are black) and boxes are the tight boxes of what stays visible
    (an object cropped out entirely is dropped).

    Args:
        task: ``"segmentation"`` or ``"detection"``.
        padding: Pixels of zero padding on each side before the random crop; 0: no crop.
        flip: Whether to flip horizontally with probability 0.5.
        **kwargs: Those of :class:`InMemoryDenseDataModule`.
    """

    tasks = ("segmentation", "detection")
    in_channels: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def __init__(self, *, task: str, padding: int, flip: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if task not in self.tasks:
            raise ValueError(
                f"{type(self).__name__} serves the tasks {', '.join(self.tasks)}, not {task!r}"
            )
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.task = task
        self.padding = padding
        self.flip = flip

    def set_augmentation(self, train_images: Tensor) -> None:
        """Sets ``train_augmentation``, ``mean`` and ``std`` (``None`` for detection, whose
        images stay in [0, 1]) from the training images."""
        if self.task == "segmentation":
            mean, std = channel_stats(train_images)
            stored = len(mean)
            self.mean = mean * (self.in_channels // stored)
            self.std = std * (self.in_channels // stored)
            self.train_augmentation = CropFlip(self.padding, self.flip, mean, std)
        else:
            self.mean = self.std = None
            self.train_augmentation = CropFlip(self.padding, self.flip)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)

    def make_batch(self, split: Split, rows: Tensor, keys: Tensor | None) -> tuple[Any, Any]:
        aug = self.train_augmentation
        images, instances, labels = split["images"], split["instances"], split["labels"]
        if keys is None:
            batch_images = aug.normalise(images[rows])
            batch_instances = instances[rows]
        else:
            batch_images = aug.apply(images, rows, keys)
            batch_instances = crop_flip_maps(instances, rows, keys, aug, fill=0)
        if batch_images.shape[1] != self.in_channels:  # grey stored once
            batch_images = batch_images.expand(-1, self.in_channels, -1, -1).contiguous()
        if self.task == "segmentation":
            return batch_images, segmentation_masks(batch_instances, labels[rows])
        return batch_images, detection_targets(batch_instances, labels[rows])


class Slot(NamedTuple):
    """One object per canvas of a chunk of scenes, to paste.

    Attributes:
        patches: uint8 ``[n, c, P, P]``, each object in its top-left corner.
        opaque: bool ``[n, P, P]``: the object's own pixels (they cover what lies below and
            become its instance); False outside the object.
        top: Canvas row of each patch's top-left corner, int64 ``[n]``.
        left: Canvas column of it, int64 ``[n]``.
        labels: Class of each object, int64 ``[n]`` (1..K-1).
        active: Whether the scene has this object at all, bool ``[n]``.
    """

    patches: Tensor
    opaque: Tensor
    top: Tensor
    left: Tensor
    labels: Tensor
    active: Tensor


def place(slot: Slot, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The patches of ``slot`` laid on ``height x width`` canvases at their positions.

    Returns:
        The layer (uint8 ``[n, c, H, W]``), where the object is opaque (bool ``[n, H, W]``)
        and where its patch lies (bool ``[n, H, W]``).
    """
    n, c, size, _ = slot.patches.shape
    ly = torch.arange(height)[None] - slot.top[:, None]  # [n, H]: row inside the patch
    lx = torch.arange(width)[None] - slot.left[:, None]
    inside = ((ly >= 0) & (ly < size))[:, :, None] & ((lx >= 0) & (lx < size))[:, None, :]
    # One flat gather per canvas pixel (much faster than 4-d advanced indexing).
    flat = (ly.clamp(0, size - 1)[:, :, None] * size + lx.clamp(0, size - 1)[:, None, :]).view(
        n, 1, height * width
    )
    layer = slot.patches.reshape(n, c, size * size).gather(2, flat.expand(n, c, -1))
    layer = layer.view(n, c, height, width)
    cover = slot.opaque.reshape(n, size * size).gather(1, flat[:, 0]).view(n, height, width)
    cover &= inside
    return layer, cover, inside


def compose_scenes(
    background: Tensor, slots: Iterator[Slot], min_visible: float, blend_max: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Pastes objects on canvases one slot after the other, vectorised over canvases.

    An object covers what lies below it where it is opaque (the last pasted wins, in the
    image and in the instance map). With ``blend_max``, elsewhere inside its patch the
    brighter of canvas and object shows (faint ink of a digit's edge over the background),
    which never changes which pixels are opaque. An object that would leave an earlier one
    less than ``min_visible`` of its own opaque pixels is not pasted at all; with
    ``min_visible=0`` every object is pasted, and one hidden entirely gets label 0.

    Args:
        background: uint8 ``[n, c, H, W]``, the empty canvases.
        slots: The objects, in pasting order.
        min_visible: Share of an object's pixels that must stay visible, in [0, 1].
        blend_max: See above.

    Returns:
        Images (uint8 ``[n, c, H, W]``), instance maps (uint8 ``[n, H, W]``: 0 background,
        ``m + 1`` where slot ``m`` is visible) and the class of each slot (int64 ``[n, M]``,
        0 where the slot holds nothing visible).
    """
    n, _, height, width = background.shape
    canvas = background.clone()
    instances = torch.zeros(n, height, width, dtype=torch.uint8)
    areas, labels = [], []
    for m, slot in enumerate(slots):
        layer, cover, inside = place(slot, height, width)
        accept = slot.active.clone()
        if min_visible > 0 and m > 0:
            # Pixels each earlier slot would keep outside this object's cover.
            left_visible = pixel_counts(torch.where(cover, 0, instances), m)[:, 1:]
            accept &= (left_visible >= min_visible * torch.stack(areas, 1)).all(1)
        cover &= accept[:, None, None]
        inside &= accept[:, None, None]
        if blend_max:
            below = torch.where(inside[:, None], torch.maximum(canvas, layer), canvas)
        else:
            below = canvas
        canvas = torch.where(cover[:, None], layer, below)
        instances.masked_fill_(cover, m + 1)
        areas.append(cover.sum((1, 2)))
        labels.append(torch.where(accept, slot.labels, 0))
    labels = torch.stack(labels, 1)
    visible = pixel_counts(instances, labels.shape[1])[:, 1:] > 0
    return canvas, instances, torch.where(visible, labels, 0)


def pixel_counts(instances: Tensor, num_slots: int) -> Tensor:
    """Pixels of each id ``0..num_slots`` in each instance map ``[n, H, W]``: int64
    ``[n, num_slots + 1]``."""
    flat = instances.reshape(len(instances), -1).long()
    counts = torch.zeros(len(instances), num_slots + 1, dtype=torch.long)
    return counts.scatter_add_(1, flat, torch.ones_like(flat))
