"""Tabular regression on real data shipped with scikit-learn: the diabetes data set."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import Tensor

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.base import split_indices
from distill_zoo.data.dense_device import InMemoryDenseDataModule, Split

TEST_FRACTION = 0.15
TEST_SEED = 0  # the test split is fixed, like an official one, whatever the run's seed


class TabularRegressionDataModule(InMemoryDenseDataModule):
    """The diabetes data set (Efron, Hastie, Johnstone & Tibshirani, "Least Angle
    Regression", Annals of Statistics 2004, as shipped by scikit-learn's ``load_diabetes``):
    442 real patients, 10 baseline features (age, sex, body mass index, blood pressure, six
    blood serum measurements), target a measure of disease progression one year later. No
    download.

    A random 15% test split is fixed (seed 0, whatever ``seed``); ``val_fraction`` of the
    rest is held out for validation with ``seed`` (default: 320 / 56 / 66 samples). Features
    (the raw, unscaled values) are standardised with the training split's mean and
    (population) std; so is the target, whose statistics are exposed as ``target_mean`` and
    ``target_std`` (float32 ``[1]``) to report errors in the original units.

    Batches: ``(features float32 [B, 10], targets float32 [B, 1], indices int64 [B])``,
    training ones followed by augmentation keys of 0 (there is no augmentation).
    ``in_channels`` is the number of features, ``image_size`` is ``None``.

    Args:
        val_fraction: Share of the non-test samples held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Samples per batch.
        num_workers: Unused (batches are gathered from memory).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the data on the training device and build batches there.
        shuffle_seed: Seed of the order.
        augment_rounds: Accepted for a uniform interface; it changes nothing.
    """

    task = "regression"
    image_size = None

    def __init__(
        self,
        *,
        val_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 32,
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
        self.num_classes = 1
        self.target_names = ["disease_progression"]
        self.class_names = self.target_names
        self.feature_names = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
        self.in_channels = len(self.feature_names)
        self.input_shape = (self.in_channels,)
        self.train_augmentation = CropFlip()

    def make_splits(self) -> dict[str, Split]:
        data = load_diabetes(scaled=False)
        features = np.asarray(data.data, dtype=np.float64)
        target = np.asarray(data.target, dtype=np.float64)[:, None]
        if list(data.feature_names) != self.feature_names:
            raise ValueError(f"unexpected diabetes features {data.feature_names}")
        ids = np.arange(len(target))  # unique labels: the splits are uniform, not stratified
        pool, test = split_indices(ids, TEST_FRACTION, TEST_SEED)
        train, val = split_indices(ids[pool], self.val_fraction, self.seed)
        positions = {"train": pool[train], "val": pool[val], "test": test}
        self.positions = positions  # rows of load_diabetes() in each split
        x_mean = features[positions["train"]].mean(0)
        x_std = features[positions["train"]].std(0)
        y_mean = target[positions["train"]].mean(0)
        y_std = target[positions["train"]].std(0)
        self.feature_mean = torch.from_numpy(x_mean).float()
        self.feature_std = torch.from_numpy(x_std).float()
        self.target_mean = torch.from_numpy(y_mean).float()
        self.target_std = torch.from_numpy(y_std).float()
        return {
            name: {
                "inputs": torch.from_numpy((features[rows] - x_mean) / x_std).float(),
                "targets": torch.from_numpy((target[rows] - y_mean) / y_std).float(),
            }
            for name, rows in positions.items()
        }

    def make_batch(self, split: Split, rows: Tensor, keys: Tensor | None) -> tuple[Tensor, Tensor]:
        return split["inputs"][rows], split["targets"][rows]

    def unstandardise(self, targets: Tensor) -> Tensor:
        """Targets (or predictions) in the original units, from standardised ones."""
        return targets * self.target_std.to(targets) + self.target_mean.to(targets)
