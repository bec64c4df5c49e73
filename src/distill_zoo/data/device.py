"""The on-device data path: data sets that fit in memory live on the training device as one
tensor, and each batch is gathered, augmented and normalised there.

Loaders yield :class:`IndexBatch` (positions within a split and augmentation keys, drawn from a
CPU generator seeded by ``(shuffle_seed, epoch)``); the DataModule's
``transfer_batch_to_device`` hook turns them into image batches on the device that Lightning
names, with :class:`~distill_zoo.data.augment.CropFlip`. There are no DataLoader workers and no
per-image Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.base import BaseDataModule, Transform

SHUFFLE_STREAM, AUGMENT_STREAM = 0, 1


def seeded_generator(seed: int, stream: int, epoch: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, stream, epoch)`` alone (not by any global RNG
    state), well mixed by numpy's ``SeedSequence`` so nearby seeds give unrelated streams."""
    words = np.random.SeedSequence([seed % 2**64, stream, epoch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))


class IndexBatch(NamedTuple):
    """What the on-device loaders yield: a batch before its images exist.

    Attributes:
        split: ``"train"``, ``"val"`` or ``"test"``.
        indices: Positions within the split, int64 ``[B]``.
        aug_keys: Augmentation key of each sample (train only), int64 ``[B]``; ``None`` for
            evaluation splits.
    """

    split: str
    indices: Tensor
    aug_keys: Tensor | None = None


class IndexBatches:
    """Batches of positions ``0..num_samples-1`` of one split, for one rank.

    Each epoch, the order is ``torch.randperm`` from a generator seeded by ``(seed, epoch)``
    (or ``0..n-1`` without shuffling); under DDP every rank draws the same order, pads it by
    repeating its start to a multiple of ``world_size`` (as ``DistributedSampler`` does) and
    keeps every ``world_size``-th position from ``rank`` on, so all ranks yield the same
    number of batches. With ``augmentation``, each batch carries the keys of its samples:
    the keys of all samples are drawn once per *round* from ``(seed, round)``, where round is
    the epoch, or ``epoch % augment_rounds`` to replay ``augment_rounds`` fixed rounds (FKD,
    Shen & Xing, ECCV 2022).

    The epoch is read from ``epoch_source`` when it gives one (the trainer's current epoch),
    else it is the value of :meth:`set_epoch`, else the number of passes started so far.

    Args:
        split: Name carried by every batch, ``"train"``, ``"val"`` or ``"test"``.
        num_samples: Size of the split.
        batch_size: Samples per batch.
        shuffle: Whether to draw a new order each epoch.
        drop_last: Whether to drop the last batch of a rank's shard if it is incomplete.
        seed: Seed of the order and the augmentation.
        augmentation: Draws the keys; ``None``: batches carry no keys (evaluation).
        augment_rounds: Number of augmentation rounds to replay; ``None``: a fresh round per
            epoch.
        rank: This process's rank.
        world_size: Number of processes.
        epoch_source: Returns the current epoch, or ``None`` when it cannot tell.
    """

    def __init__(
        self,
        split: str,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        augmentation: CropFlip | None = None,
        augment_rounds: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        epoch_source: Callable[[], int | None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 1:
            raise ValueError(f"the {split} split is empty")
        check_augment_rounds(augment_rounds)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in 0..world_size-1 ({world_size})")
        self.split = split
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.augmentation = augmentation
        self.augment_rounds = augment_rounds
        self.rank = rank
        self.world_size = world_size
        self.epoch_source = epoch_source
        self._epoch: int | None = None
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        """Fixes the epoch of the next passes, as ``DistributedSampler.set_epoch`` does."""
        self._epoch = epoch

    @property
    def shard_size(self) -> int:
        """Samples this rank sees per epoch, padding included."""
        return math.ceil(self.num_samples / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[IndexBatch]:
        # A generator: the epoch is read at the first batch, not when Lightning calls iter().
        epoch = self.epoch_source() if self.epoch_source is not None else None
        if epoch is None:
            epoch = self._passes if self._epoch is None else self._epoch
        self._passes += 1
        yield from self.batches(epoch)

    def order(self, epoch: int) -> Tensor:
        """This rank's positions for ``epoch``, in order, padding included."""
        if self.shuffle:
            generator = seeded_generator(self.seed, SHUFFLE_STREAM, epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        if self.world_size == 1:
            return order
        total = self.shard_size * self.world_size
        order = order.repeat(math.ceil(total / self.num_samples))[:total]
        return order[self.rank :: self.world_size]

    def keys(self, epoch: int) -> Tensor | None:
        """Augmentation keys of all samples of the split for ``epoch`` (by position)."""
        if self.augmentation is None:
            return None
        round_ = epoch if self.augment_rounds is None else epoch % self.augment_rounds
        generator = seeded_generator(self.seed, AUGMENT_STREAM, round_)
        return self.augmentation.sample_keys(self.num_samples, generator)

    def batches(self, epoch: int) -> list[IndexBatch]:
        """The batches of ``epoch`` on this rank."""
        chunks = list(self.order(epoch).split(self.batch_size))
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()
        keys = self.keys(epoch)
        return [
            IndexBatch(self.split, chunk, None if keys is None else keys[chunk])
            for chunk in chunks
        ]


def check_augment_rounds(augment_rounds: int | None) -> None:
    """Raises a ValueError unless ``augment_rounds`` is ``None`` or a positive integer."""
    if augment_rounds is None:
        return
    if isinstance(augment_rounds, bool) or not isinstance(augment_rounds, int):
        raise ValueError(f"augment_rounds must be an integer or null, not {augment_rounds!r}")
    if augment_rounds < 1:
        raise ValueError(f"augment_rounds must be >= 1 or null, got {augment_rounds}")


@dataclass
class _Stored:
    """A data module's tensors on one device."""

    pool_images: Tensor
    pool_targets: Tensor
    test_images: Tensor
    test_targets: Tensor
    rows: dict[str, Tensor]  # split -> rows of the pool (train, val)


class IndexBatchDataModule(BaseDataModule):
    """What the DataModules whose loaders yield :class:`IndexBatch` es share.

    Loaders are :class:`IndexBatches`, sharded over the trainer's ranks and following its
    epoch; :meth:`transfer_batch_to_device` turns each batch into tensors with :meth:`fetch`,
    from the data copied once to each device they are built on (``on_device=True``), or
    on the CPU and then moved (``on_device=False``).

    Subclasses implement :meth:`_split_size`, :meth:`_store` and :meth:`_build`, and set
    ``train_augmentation`` (a :class:`~distill_zoo.data.augment.CropFlip`, whose keys the
    training loader draws).

    Args:
        on_device: Build batches on the training device (else on the CPU).
        shuffle_seed: Seed of the order and of the augmentation.
        augment_rounds: Replay this many fixed augmentation rounds (FKD); ``None``: fresh
            augmentation every epoch.
        **kwargs: Those of :class:`~distill_zoo.data.base.BaseDataModule`.
    """

    def __init__(
        self,
        *,
        on_device: bool,
        shuffle_seed: int,
        augment_rounds: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_augment_rounds(augment_rounds)
        self.on_device = on_device
        self.shuffle_seed = shuffle_seed
        self.augment_rounds = augment_rounds
        self._stored: dict[str, Any] = {}  # str(device) -> what _store put there

    # --- what subclasses give -----------------------------------------------------------------

    def _split_size(self, split: str) -> int:
        """Samples of ``split``; raises a RuntimeError before ``setup()``."""
        raise NotImplementedError

    def _store(self, device: torch.device) -> Any:
        """The data, copied to ``device``; raises a RuntimeError before ``setup()``."""
        raise NotImplementedError

    def _build(
        self, stored: Any, split: str, indices: Tensor, keys: Tensor | None
    ) -> tuple[Any, Any]:
        """``(inputs, targets)`` of ``split``'s samples ``indices`` from ``stored``, augmented
        by ``keys`` (``None``: no augmentation)."""
        raise NotImplementedError

    def _yields_index_batches(self) -> bool:
        """Whether the loaders are :class:`IndexBatches` (else those of
        :class:`~distill_zoo.data.base.BaseDataModule`)."""
        return True

    # --- loaders -----------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader | IndexBatches:
        if self._yields_index_batches():
            return self._index_batches("train")
        return super().train_dataloader()

    def val_dataloader(self) -> DataLoader | IndexBatches:
        if self._yields_index_batches():
            return self._index_batches("val")
        return super().val_dataloader()

    def test_dataloader(self) -> DataLoader | IndexBatches:
        if self._yields_index_batches():
            return self._index_batches("test")
        return super().test_dataloader()

    def _index_batches(self, split: str) -> IndexBatches:
        num_samples = self._split_size(split)
        rank, world_size = 0, 1
        if self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
        train = split == "train"
        return IndexBatches(
            split,
            num_samples,
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

    # --- batches on the device ---------------------------------------------------------------

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        """Builds :class:`IndexBatch` es on ``device`` (or on the CPU and copies them there,
        with ``on_device=False``); moves anything else as Lightning does."""
        if not isinstance(batch, IndexBatch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if self.on_device:
            built = self.fetch(batch, device)
        else:
            built = super().transfer_batch_to_device(
                self.fetch(batch, "cpu"), device, dataloader_idx
            )
        if self.trainer is not None:
            # Lightning casts inputs for "16-true"/"bf16-true" before the transfer, when our
            # batch held only indices: cast them now.
            built = self._convert_input(built)
        return built

    def _convert_input(self, batch: tuple) -> tuple:
        """``batch`` cast to the trainer's precision (its floating tensors)."""
        return self.trainer.precision_plugin.convert_input(batch)

    def fetch(self, batch: IndexBatch, device: torch.device | str | None = None) -> tuple:
        """The inputs, targets, indices (and, for training, augmentation keys) of ``batch``.

        Lightning calls this through :meth:`transfer_batch_to_device`; outside Lightning,
        ``dm.fetch(batch, "cuda")`` does the same.

        Args:
            batch: A batch from this module's loaders.
            device: Where to build it; ``None``: where ``batch.indices`` lie.
        """
        device = batch.indices.device if device is None else torch.device(device)
        stored = self._on(device)
        indices = batch.indices.to(device, non_blocking=True)
        if batch.aug_keys is None:
            return (*self._build(stored, batch.split, indices, None), indices)
        keys = batch.aug_keys.to(device, non_blocking=True)
        return (*self._build(stored, batch.split, indices, keys), indices, keys)

    def _on(self, device: torch.device) -> Any:
        key = str(device)
        if key not in self._stored:
            self._stored[key] = self._store(device)
        return self._stored[key]


class InMemoryDataModule(IndexBatchDataModule):
    """A DataModule whose splits are tensors in memory, served by DataLoaders or on the device.

    Subclasses return :class:`~torch.utils.data.TensorDataset` s from ``load_sources`` and
    describe their augmentation with :meth:`crop_flip`; the torchvision transforms of the
    DataLoader path are derived from it, so both paths apply the same recipe.

    With ``on_device=True`` the training pool and the test set are stored once (uint8 where the
    source is) and copied to a device the first time a batch goes there (once per device).
    Loaders then yield :class:`IndexBatch` es, and :meth:`transfer_batch_to_device` turns them
    into ``(images, targets, indices, aug_keys)`` for training and ``(images, targets,
    indices)`` for validation and testing, images float32 and normalised. ``num_workers`` is
    unused there. Under DDP, every split is sharded over the ranks, padded with repeated
    samples so ranks see equal batch counts (as Lightning's ``DistributedSampler`` does for
    the DataLoader path; torchmetrics syncs the metrics).

    Args:
        on_device: Serve batches on the training device instead of through DataLoaders.
        shuffle_seed: Seed of the on-device order and augmentation (the run's ``seed``); the
            split stays fixed by ``seed``.
        augment_rounds: ``K``: replay ``K`` fixed augmentation rounds, round ``epoch % K``
            (FKD, Shen & Xing, ECCV 2022), so teacher outputs keyed by ``(index, aug_key)``
            can be cached; ``None``: fresh crops and flips every epoch. Needs ``on_device``.
        **kwargs: Those of :class:`~distill_zoo.data.base.BaseDataModule`.
    """

    _stored: dict[str, _Stored]

    def __init__(
        self,
        *,
        on_device: bool = False,
        shuffle_seed: int = 0,
        augment_rounds: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            on_device=on_device,
            shuffle_seed=shuffle_seed,
            augment_rounds=augment_rounds,
            **kwargs,
        )
        if augment_rounds is not None and not on_device:
            raise ValueError(
                "augment_rounds replays augmentations on the on-device path only: set "
                "data.on_device=true, or data.augment_rounds=null"
            )

    def crop_flip(self, pool: TensorDataset, train_positions: np.ndarray) -> CropFlip:
        """The training augmentation and normalisation; default: none.

        ``pool`` and ``train_positions`` are given for statistics of the training split.
        """
        return CropFlip()

    def build_transforms(
        self, pool: Dataset, train_positions: np.ndarray
    ) -> tuple[Transform | None, Transform | None]:
        if not isinstance(pool, TensorDataset):
            raise TypeError(f"{type(self).__name__}.load_sources must return TensorDatasets")
        self.train_augmentation = self.crop_flip(pool, train_positions)
        scale = pool.tensors[0].dtype == torch.uint8
        return self.train_augmentation.torchvision_transforms(self.image_size, scale=scale)

    def _yields_index_batches(self) -> bool:
        return self.on_device

    def _split_size(self, split: str) -> int:
        dataset = getattr(self, f"{split}_set")
        if dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for loaders")
        return len(dataset)

    def _build(
        self, stored: _Stored, split: str, indices: Tensor, keys: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        if split == "test":
            images, targets, rows = stored.test_images, stored.test_targets, indices
        else:
            images, targets = stored.pool_images, stored.pool_targets
            rows = stored.rows[split][indices]
        if keys is None:
            return self.train_augmentation.normalise(images[rows]), targets[rows]
        return self.train_augmentation.apply(images, rows, keys), targets[rows]

    def _store(self, device: torch.device) -> _Stored:
        if self.train_set is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before fetching batches")
        pool_images, pool_targets = self.train_set.source.tensors
        test_images, test_targets = self.test_set.source.tensors
        return _Stored(
            pool_images=pool_images.to(device),
            pool_targets=pool_targets.to(device),
            test_images=test_images.to(device),
            test_targets=test_targets.to(device),
            rows={
                split: torch.as_tensor(dataset.positions, dtype=torch.long, device=device)
                for split, dataset in (("train", self.train_set), ("val", self.val_set))
            },
        )
