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

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.device import IndexBatchDataModule

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


class InMemoryDenseDataModule(IndexBatchDataModule):
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
    _stored: dict[str, dict[str, Split]]

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
            on_device=on_device,
            shuffle_seed=shuffle_seed,
            augment_rounds=augment_rounds,
        )
        self.splits: dict[str, Split] | None = None

    # --- what subclasses give -------------------------------------------------------------

    def make_splits(self) -> dict[str, Split]:
        """Builds ``{"train": {...}, "val": {...}, "test": {...}}`` of CPU tensors with the
        samples along dimension 0, and sets the attributes only the data can tell."""
        raise NotImplementedError

    def make_batch(self, split: Split, rows: Tensor, keys: Tensor | None) -> tuple[Any, Any]:
        """``(inputs, targets)`` of ``split``'s samples ``rows``, augmented by ``keys``
        (``None``: evaluation, no augmentation), all on ``split``'s device."""
        raise NotImplementedError

    # --- setup ----------------------------------------------------------------------------

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

    def _require_setup(self) -> None:
        if self.splits is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for data")

    # --- batches (the rest is IndexBatchDataModule's) -------------------------------------

    def _split_size(self, split: str) -> int:
        return self.dataset_sizes()[split]

    def _convert_input(self, batch: tuple) -> tuple:
        # Only the inputs: targets (boxes, regression values) stay float32.
        inputs, *rest = batch
        return (self.trainer.precision_plugin.convert_input(inputs), *rest)

    def _build(
        self, stored: dict[str, Split], split: str, indices: Tensor, keys: Tensor | None
    ) -> tuple[Any, Any]:
        return self.make_batch(stored[split], indices, keys)

    def _store(self, device: torch.device) -> dict[str, Split]:
        self._require_setup()
        return {
            name: {k: v.to(device) for k, v in split.items()}
            for name, split in self.splits.items()
        }

    def batches(self, split: str, device: torch.device | str = "cpu", epoch: int = 0):
        """Every batch of ``split`` for ``epoch`` built on ``device`` (for scripts and tests:
        the order and augmentation Lightning would see)."""
        return [self.fetch(b, device) for b in self._index_batches(split).batches(epoch)]


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
    counts: dict[str, int]  # scenes of each split
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

    def _check_layout(
        self, min_scale: int, max_scale: int, min_objects: int, max_objects: int, noun: str
    ) -> None:
        """Raises a ValueError unless objects of sides ``min_scale..max_scale`` fit the canvas
        (``image_size``) and ``0 <= min_objects <= max_objects <= 254`` (instance ids are
        uint8); ``noun`` names the objects in the message (``min_<noun>``)."""
        if not 1 <= min_scale <= max_scale <= min(self.image_size):
            raise ValueError(
                f"need 1 <= min_scale <= max_scale <= the canvas side {min(self.image_size)}, "
                f"got {min_scale}..{max_scale}"
            )
        if not 0 <= min_objects <= max_objects or not 1 <= max_objects <= 254:
            raise ValueError(
                f"need 0 <= min_{noun} <= max_{noun} <= 254, got {min_objects}, {max_objects}"
            )

    def _render_splits(
        self,
        render: Callable[[str, int, np.random.Generator], tuple[Tensor, Tensor, Tensor, Tensor]],
        streams: dict[str, int],
        test_seed: int,
    ) -> tuple[dict[str, Split], dict[str, Tensor]]:
        """Renders ``counts[name]`` scenes of each split with ``render(name, count, rng)``
        (which returns images, instance maps, slot labels and the source of each slot, as
        :func:`render_scenes` does), ``rng`` drawn from ``(seed, streams[name])``, or
        ``(test_seed, ...)`` for the test split, and sets the augmentation from the training
        images.

        Returns:
            The splits and the source of each slot, by split.
        """
        splits, sources = {}, {}
        for name, count in self.counts.items():
            rng = split_rng(test_seed if name == "test" else self.seed, streams[name])
            images, instances, labels, sources[name] = render(name, count, rng)
            splits[name] = {"images": images, "instances": instances, "labels": labels}
        self.set_augmentation(splits["train"]["images"])
        return splits, sources

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


def render_scenes(
    rng: np.random.Generator,
    num_scenes: int,
    *,
    choose: Callable[[np.random.Generator, tuple[int, int]], np.ndarray],
    labels: Tensor,
    patches: Callable[[Tensor, int], Tensor],
    opaque: Callable[[Tensor, Tensor], Tensor],
    background: Callable[[int, np.random.Generator], Tensor],
    image_size: tuple[int, int],
    min_objects: int,
    max_objects: int,
    min_scale: int,
    max_scale: int,
    min_visible: float,
    blend_max: bool,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draws and renders ``num_scenes`` scenes of square objects, ``chunk`` scenes at a time.

    Each scene holds ``min_objects..max_objects`` objects (uniform), each a source object
    drawn by ``choose``, resized to a random side ``min_scale..max_scale`` and placed
    uniformly at random wholly inside the canvas, pasted in slot order by
    :func:`compose_scenes` (``min_visible``, ``blend_max``). All of the layout is drawn from
    ``rng`` first (counts, sources, sides, rows, columns), then each chunk's canvases.

    Args:
        rng: Draws the layout (and whatever ``choose`` and ``background`` draw).
        num_scenes: ``N``.
        choose: ``choose(rng, (N, M))``: the source object of every slot, int64.
        labels: Class of every source object (1..K-1), int64.
        patches: ``patches(sources, side)``: uint8 ``[n, c, side, side]``, the objects
            ``sources`` (int64 ``[n]``) resized.
        opaque: ``opaque(patches, sides)``: where each patch (uint8 ``[n, c, P, P]``, objects
            of sides ``sides`` in its top-left corner) is its object's, bool ``[n, P, P]``.
        background: ``background(n, rng)``: ``n`` empty canvases, uint8 ``[n, c, H, W]``.
        image_size: ``(H, W)``.
        min_objects: Fewest objects per scene.
        max_objects: ``M``, the most objects per scene (the slots).
        min_scale: Smallest object side in pixels.
        max_scale: ``P``, the largest object side in pixels.
        min_visible: See :func:`compose_scenes`.
        blend_max: See :func:`compose_scenes`.
        chunk: Scenes rendered at once (bounds the memory of one paste).

    Returns:
        uint8 images ``[N, c, H, W]``, uint8 instance maps ``[N, H, W]``, int64 slot labels
        ``[N, M]`` (0 for an empty slot), and the source object of each slot (int64
        ``[N, M]``; -1 where empty).
    """
    height, width = image_size
    n, slots = num_scenes, max_objects
    counts = rng.integers(min_objects, max_objects + 1, n)
    chosen = choose(rng, (n, slots))
    sizes = rng.integers(min_scale, max_scale + 1, (n, slots))
    tops = rng.integers(0, height - sizes + 1)
    lefts = rng.integers(0, width - sizes + 1)
    images, instances, slot_labels = [], [], []
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        canvas = background(part.stop - start, rng)

        def slots_of(part: slice = part, channels: int = canvas.shape[1]) -> Iterator[Slot]:
            for m in range(slots):
                src = torch.from_numpy(chosen[part, m])
                size = torch.from_numpy(sizes[part, m])
                layer = torch.zeros(len(src), channels, max_scale, max_scale, dtype=torch.uint8)
                for s in size.unique().tolist():
                    rows = (size == s).nonzero().squeeze(1)
                    layer[rows, :, :s, :s] = patches(src[rows], s)
                yield Slot(
                    patches=layer,
                    opaque=opaque(layer, size),
                    top=torch.from_numpy(tops[part, m]),
                    left=torch.from_numpy(lefts[part, m]),
                    labels=labels[src],
                    active=torch.from_numpy(counts[part] > m),
                )

        image, instance, label = compose_scenes(canvas, slots_of(), min_visible, blend_max)
        images.append(image)
        instances.append(instance)
        slot_labels.append(label)
    slot_labels = torch.cat(slot_labels)
    used = torch.where(slot_labels > 0, torch.from_numpy(chosen), -1)
    return torch.cat(images), torch.cat(instances), slot_labels, used
