"""What every DataModule shares: the seeded validation split, the index-returning split data
set, and loader construction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

Transform = Callable[[Any], torch.Tensor]

_KNOWN_AFTER_SETUP = frozenset(
    {
        "num_classes",
        "in_channels",
        "image_size",
        "num_train_samples",
        "class_names",
        "train_targets",
        "train_augmentation",
    }
)


def split_indices(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions ``0..len(labels)-1`` into a kept part and a held-out part, reproducibly.

    The split is stratified by class where it can hold every class (each class has two or
    more samples and each part at least one sample per class), else uniform at random.

    Args:
        labels: Class of each sample.
        fraction: Share of samples held out, strictly between 0 and 1.
        seed: Seed of the split; the same seed always gives the same split.

    Returns:
        Sorted positions of the kept and of the held-out samples.

    Raises:
        ValueError: If ``fraction`` is outside (0, 1) or leaves either part empty.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {fraction}")
    labels = np.asarray(labels)
    n = len(labels)
    n_held = round(fraction * n)
    if not 0 < n_held < n:
        raise ValueError(f"val_fraction={fraction} of {n} samples leaves a split empty")
    counts = np.unique(labels, return_counts=True)[1]
    can_stratify = counts.min() >= 2 and len(counts) <= min(n_held, n - n_held)
    kept, held = train_test_split(
        np.arange(n),
        test_size=n_held,
        random_state=seed,
        stratify=labels if can_stratify else None,
    )
    return np.sort(kept), np.sort(held)


def balanced_subset(labels: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` positions of a class-balanced selection (first samples of each class).

    Takes the first sample of every class, then the second of every class, and so on, so each
    class contributes ``n // num_classes`` or one more.

    Returns:
        Sorted positions.
    """
    labels = np.asarray(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f"subset must lie in 1..{len(labels)}, got {n}")
    rank = np.empty(len(labels), dtype=np.int64)  # position of each sample within its class
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    return np.sort(np.lexsort((labels, rank))[:n])


class SplitDataset(Dataset):
    """One split of a source data set, yielding ``(image, target, index)``.

    ``index`` is the sample's position within this split (``0..len(self)-1``), stable across
    epochs: CRD's memory bank and other per-sample caches are indexed by it.

    Args:
        source: Data set whose items are ``(image, target)``.
        positions: Positions in ``source`` that make up this split; ``None`` for all of it.
        transform: Applied to each image; ``None`` for none.
    """

    def __init__(
        self,
        source: Dataset,
        positions: Sequence[int] | np.ndarray | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.source = source
        self.positions = np.arange(len(source)) if positions is None else np.asarray(positions)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, target = self.source[int(self.positions[index])]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target), index


class BaseDataModule(L.LightningDataModule):
    """A training pool, a validation split carved from it with a fixed seed, and a test set.

    Subclasses implement :meth:`load_sources` (and :meth:`build_transforms` where they
    transform images); this class splits, wraps and serves them. After ``prepare_data()`` and
    ``setup()``, every subclass exposes ``num_classes``, ``in_channels``, ``image_size``,
    ``num_train_samples`` and ``class_names``; the validation split uses the evaluation
    transforms, so model selection never sees augmentation or the test set.

    Args:
        val_fraction: Share of the training pool held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Samples per batch, for all three loaders.
        num_workers: Loader worker processes; 0 loads in the main process.
        drop_last: Whether the training loader drops the last incomplete batch.
    """

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    num_train_samples: int
    class_names: list[str]

    def __init__(
        self,
        *,
        val_fraction: float,
        seed: int,
        batch_size: int,
        num_workers: int,
        drop_last: bool,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        self.val_fraction = val_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.train_set: SplitDataset | None = None
        self.val_set: SplitDataset | None = None
        self.test_set: SplitDataset | None = None

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: name what is missing instead of a bare error.
        if name in _KNOWN_AFTER_SETUP:
            raise AttributeError(
                f"{type(self).__name__}.{name} is known only after prepare_data() and setup()"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def load_sources(self) -> tuple[Dataset, Sequence[int] | np.ndarray, Dataset]:
        """Loads the data; sets any of the public attributes that only the data can tell.

        Returns:
            The training pool, its labels, and the test set, each yielding
            ``(image, target)`` with untransformed images.
        """
        raise NotImplementedError

    def build_transforms(
        self, pool: Dataset, train_positions: np.ndarray
    ) -> tuple[Transform | None, Transform | None]:
        """The training and evaluation transforms (``None`` for none).

        ``pool`` and ``train_positions`` (the training split within the pool) are given for
        transforms that depend on training statistics.
        """
        return None, None

    def setup(self, stage: str | None = None) -> None:
        """Builds all three splits on the first call; later calls do nothing."""
        if self.train_set is not None:
            return
        pool, labels, test = self.load_sources()
        train_positions, val_positions = split_indices(labels, self.val_fraction, self.seed)
        train_transform, eval_transform = self.build_transforms(pool, train_positions)
        self.val_set = SplitDataset(pool, val_positions, eval_transform)
        self.test_set = SplitDataset(test, None, eval_transform)
        self.num_train_samples = len(train_positions)
        # Labels of the training split by index (CRD's class-aware negatives need them).
        self.train_targets = torch.as_tensor(np.asarray(labels)[train_positions], dtype=torch.long)
        self.train_set = SplitDataset(pool, train_positions, train_transform)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def _loader(self, dataset: SplitDataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for loaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
