"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official python-pickle files."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets.utils import download_and_extract_archive

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.device import InMemoryDataModule

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


def cifar_crop_flip(mean: tuple[float, ...], std: tuple[float, ...]) -> CropFlip:
    """The KD literature's CIFAR recipe: RandomCrop(32, padding=4) and RandomHorizontalFlip for
    training, then (training and evaluation) scaling to [0, 1] and Normalize, i.e. the classic
    ``ToTensor`` + ``Normalize``."""
    return CropFlip(padding=4, flip=True, mean=tuple(mean), std=tuple(std))


def _tensor_set(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """uint8 NHWC images and their labels as a data set of uint8 CHW tensors."""
    return TensorDataset(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.as_tensor(labels, dtype=torch.long),
    )


class CifarDataModule(InMemoryDataModule):
    """32x32 RGB images held in memory as uint8, with :func:`cifar_crop_flip`, served by
    DataLoaders or on the training device (``on_device``, see
    :class:`~distill_zoo.data.device.InMemoryDataModule`).

    Subclasses give ``num_classes``, ``mean``, ``std`` and :meth:`load_arrays`.
    """

    in_channels = 3
    image_size = (32, 32)
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def load_arrays(self) -> Arrays:
        """Returns training images (uint8 [N, 32, 32, 3]) and labels, test images and labels,
        and the class names."""
        raise NotImplementedError

    def load_sources(self) -> tuple[Dataset, np.ndarray, Dataset]:
        train_images, train_labels, test_images, test_labels, class_names = self.load_arrays()
        for labels in (train_labels, test_labels):
            if len(labels) and not 0 <= labels.min() <= labels.max() < self.num_classes:
                raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        self.class_names = class_names
        return (
            _tensor_set(train_images, train_labels),
            train_labels,
            _tensor_set(test_images, test_labels),
        )

    def crop_flip(self, pool: TensorDataset, train_positions: np.ndarray) -> CropFlip:
        return cifar_crop_flip(self.mean, self.std)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds only dicts, lists, strings and numpy arrays, so a planted file cannot run code
    (the spirit of ``torch.load(weights_only=True)``)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # the official files (numpy 1.x, Python 2)
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),  # pickle protocol 5 under numpy 2.x
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol <3 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    # Keys are str in the Python 2 originals read as latin1, bytes in files from Python 3.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


class _OfficialCifarDataModule(CifarDataModule):
    """Reads the official python version of CIFAR-10/100 itself rather than through
    ``torchvision.datasets.CIFAR10``: torchvision insists on the md5 of the official files,
    which small files written by tests cannot have. ``download=True`` still goes through
    torchvision, which checks the archive's md5 before extracting it."""

    torchvision_class: type[torchvision.datasets.CIFAR10]
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str

    def __init__(
        self,
        *,
        root: str = "data",
        download: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 2,
        drop_last: bool = False,
        on_device: bool = False,
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
        self.root = Path(root).expanduser()
        self.download = download

    @property
    def folder(self) -> Path:
        return self.root / self.torchvision_class.base_folder

    def _missing(self) -> list[str]:
        names = (*self.train_files, *self.test_files, self.meta_file)
        return [name for name in names if not (self.folder / name).is_file()]

    def prepare_data(self) -> None:
        """Downloads the data set if asked to and it is missing; checks that it is there."""
        tv = self.torchvision_class
        if self.download and self._missing():
            download_and_extract_archive(tv.url, self.root, filename=tv.filename, md5=tv.tgz_md5)
        self._check_present()

    def _check_present(self) -> None:
        missing = self._missing()
        if missing:
            expected = ",".join((*self.train_files, *self.test_files, self.meta_file))
            raise FileNotFoundError(
                f"{type(self).__name__}: expected {self.folder.absolute()}/{{{expected}}} "
                f"(missing: {', '.join(missing)}). Set data.download=true to fetch them where "
                "internet is available, or point data.root (or $DISTILL_ZOO_DATA) at the "
                f"folder that holds {self.folder.name}/."
            )

    def _read(self, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in files:
            entry = _unpickle(self.folder / name)
            data = np.asarray(entry.get("data", ()), dtype=np.uint8)
            if (
                data.ndim != 2
                or data.shape[1] != 3072
                or len(entry.get(self.label_key, ())) != len(data)
            ):
                raise ValueError(
                    f"{self.folder / name} is not a CIFAR batch: it needs 'data' "
                    f"(uint8 [N, 3072]) and N '{self.label_key}'"
                )
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(entry[self.label_key])
        return np.concatenate(images).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)

    def load_arrays(self) -> Arrays:
        self._check_present()
        names = _unpickle(self.folder / self.meta_file)[self.names_key]
        class_names = [n.decode() if isinstance(n, bytes) else n for n in names]
        return *self._read(self.train_files), *self._read(self.test_files), class_names


class CIFAR10DataModule(_OfficialCifarDataModule):
    """CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"):
    50,000 training and 10,000 test 32x32 RGB images in 10 classes, from the official python
    files ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.

    Args:
        root: Folder holding ``cifar-10-batches-py/``.
        download: Fetch the official archive into ``root`` if the files are missing.
        val_fraction: Share of the training images held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Samples per batch.
        num_workers: Loader worker processes (DataLoader path).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the data set on the training device and build batches there.
        shuffle_seed: Seed of the on-device order and augmentation.
        augment_rounds: Replay this many fixed augmentation rounds (FKD); ``None``: fresh
            crops and flips every epoch.
    """

    num_classes = 10
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    torchvision_class = torchvision.datasets.CIFAR10
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file, label_key, names_key = "batches.meta", "labels", "label_names"


class CIFAR100DataModule(_OfficialCifarDataModule):
    """CIFAR-100 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 RGB images in 100
    fine classes, from the official python files ``<root>/cifar-100-python/{train,test,meta}``.

    Args:
        root: Folder holding ``cifar-100-python/``.
        download: Fetch the official archive into ``root`` if the files are missing.
        val_fraction: Share of the training images held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Samples per batch.
        num_workers: Loader worker processes (DataLoader path).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the data set on the training device and build batches there.
        shuffle_seed: Seed of the on-device order and augmentation.
        augment_rounds: Replay this many fixed augmentation rounds (FKD); ``None``: fresh
            crops and flips every epoch.
    """

    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    torchvision_class = torchvision.datasets.CIFAR100
    train_files = ("train",)
    test_files = ("test",)
    meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
