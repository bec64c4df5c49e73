"""DataModules: the batch contract, the splits, the official formats, caching, augmentation."""

from __future__ import annotations

import collections
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import v2

from distill_zoo.data import (
    CIFAR10DataModule,
    CIFAR10JPEGDataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from distill_zoo.data.cifar import CIFAR10_MEAN, CIFAR10_STD

PROJECT = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = PROJECT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
JPEG_CLASSES = ["cat", "dog", "ship"]
JPEG_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


# --- tiny data in the official formats --------------------------------------------------------


def _dump_like_python2(obj: dict, path: Path) -> None:
    """Pickles as the official files were written (protocol 2, numpy 1.x module names)."""
    data = pickle.dumps(obj, protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    path.write_bytes(data)


def write_cifar(root: Path, num_classes: int, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """Writes CIFAR-10 (str keys, as Python 2 wrote them) or CIFAR-100 (bytes keys, as the
    official page's ``encoding='bytes'`` reader shows them) in the official layout."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
        "train_y": np.arange(n_train) % num_classes,
        "test_x": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
        "test_y": np.arange(n_test) % num_classes,
    }
    names = [f"name{c}" for c in range(num_classes)]
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, (x, y) in enumerate(
            zip(
                np.array_split(arrays["train_x"], 5),
                np.array_split(arrays["train_y"], 5),
                strict=True,
            ),
            1,
        ):
            _dump_like_python2({"data": x, "labels": y.tolist()}, folder / f"data_batch_{i}")
        test = {"data": arrays["test_x"], "labels": arrays["test_y"].tolist()}
        _dump_like_python2(test, folder / "test_batch")
        _dump_like_python2({"label_names": names}, folder / "batches.meta")
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"].tolist()
            entry = {b"data": x, b"fine_labels": y, b"coarse_labels": [c // 5 for c in y]}
            _dump_like_python2(entry, folder / split)
        meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}
        _dump_like_python2(meta, folder / "meta")
    arrays["names"] = names
    return arrays


def jpeg_pixels(cls: int, i: int) -> np.ndarray:
    """Image ``i`` of class ``cls``: the class's colour, a shade, and a bright row."""
    image = np.empty((32, 32, 3), np.uint8)
    image[:] = np.clip(np.array(JPEG_COLOURS[cls]) + 3 * i, 0, 255)
    image[i % 32] = 255  # so that images differ and crops and flips show
    return image


def write_jpeg_archive(path: Path, n_train: int = 8, n_test: int = 2) -> Path:
    """A tar.gz in the layout of cifar10-jpeg.tar.gz: {train,test}/<class>/NNNN.jpg."""
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("test", n_test), ("train", n_train)):
            for cls, name in enumerate(JPEG_CLASSES):
                for i in range(n):
                    buffer = io.BytesIO()
                    Image.fromarray(jpeg_pixels(cls, i)).save(buffer, format="JPEG", quality=95)
                    data = buffer.getvalue()
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def write_image_tree(root: Path, n_train: int = 8, n_val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n, ext in (("train", n_train, "png"), ("val", n_val, "jpg")):
        for cls in ("a", "b", "c"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{ext}")
    return root


# name -> (num_classes, in_channels, image_size, images in all splits)
EXPECTED = {
    "digits": (10, 1, (16, 16), 1797),
    "synthetic": (4, 3, (16, 16), 256 + 64),
    "cifar10": (10, 3, (32, 32), 50 + 20),
    "cifar100": (100, 3, (32, 32), 120 + 30),
    "cifar10_jpeg": (3, 3, (32, 32), 3 * (8 + 2)),
    "imagefolder": (3, 3, (32, 32), 3 * (8 + 2)),
}


@pytest.fixture
def make(tmp_path):
    """``make(name, **overrides)``: a DataModule over tiny data written into ``tmp_path``."""

    def build(name: str, **overrides):
        kwargs = {"batch_size": 16, "num_workers": 0, **overrides}
        if name == "digits":
            return DigitsDataModule(**kwargs)
        if name == "synthetic":
            return SyntheticDataModule(**kwargs)
        if name in ("cifar10", "cifar100"):
            root = tmp_path / name
            if not root.exists():
                write_cifar(root, *((10, 50, 20) if name == "cifar10" else (100, 120, 30)))
            cls = CIFAR10DataModule if name == "cifar10" else CIFAR100DataModule
            return cls(root=str(root), **kwargs)
        if name == "cifar10_jpeg":
            archive = tmp_path / "tiny.tar.gz"
            if not archive.exists():
                write_jpeg_archive(archive)
            kwargs.setdefault("val_fraction", 0.25)
            return CIFAR10JPEGDataModule(
                archive=str(archive), cache_dir=str(tmp_path / "cache"), **kwargs
            )
        assert name == "imagefolder"
        root = tmp_path / "tree"
        if not root.exists():
            write_image_tree(root)
        kwargs.setdefault("val_fraction", 0.25)
        return ImageFolderDataModule(root=str(root), image_size=32, **kwargs)

    return build


# --- the contract every DataModule keeps --------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_batches_indices_and_splits(name, make):
    num_classes, in_channels, image_size, total = EXPECTED[name]
    dm = make(name)
    dm.prepare_data()
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("fit")
    assert dm.train_set is train_set, "setup() must be idempotent"
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (
        num_classes,
        in_channels,
        image_size,
    )
    assert len(dm.class_names) == num_classes

    pool = len(dm.train_set.source)
    assert dm.num_train_samples == len(dm.train_set) == pool - round(dm.val_fraction * pool)
    train, val = set(dm.train_set.positions.tolist()), set(dm.val_set.positions.tolist())
    assert dm.val_set.source is dm.train_set.source
    assert not train & val and train | val == set(range(pool))
    assert pool + len(dm.test_set) == total

    loaders = {"train": dm.train_dataloader(), "val": dm.val_dataloader()}
    loaders["test"] = dm.test_dataloader()
    for split, loader in loaders.items():
        dataset, seen = loader.dataset, []
        for images, targets, indices in loader:
            assert images.dtype == torch.float32
            assert images.shape == (len(targets), in_channels, *image_size)
            assert targets.dtype == indices.dtype == torch.long
            assert len(targets) == len(indices)
            assert targets.min() >= 0 and targets.max() < num_classes
            image, target, index = dataset[int(indices[0])]  # indices point at their samples
            assert (target, index) == (targets[0].item(), indices[0].item())
            if split != "train":
                assert torch.equal(image, images[0])
            seen.append(indices)
        assert sorted(torch.cat(seen).tolist()) == list(range(len(dataset))), split


@pytest.mark.parametrize("name", list(EXPECTED))
def test_validation_split_follows_the_seed(name, make):
    def val_positions(seed: int) -> np.ndarray:
        dm = make(name, seed=seed)
        dm.setup("fit")
        return dm.val_set.positions

    assert np.array_equal(val_positions(0), val_positions(0))
    assert not np.array_equal(val_positions(0), val_positions(1))


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_val_fraction_must_lie_inside_the_unit_interval(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        SyntheticDataModule(val_fraction=fraction)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_settings(num_workers):
    dm = SyntheticDataModule(num_workers=num_workers, drop_last=True)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and not val.drop_last
    assert train.persistent_workers == val.persistent_workers == (num_workers > 0)
    assert train.pin_memory == torch.cuda.is_available()


def test_static_attributes_are_known_before_setup(tmp_path):
    assert DigitsDataModule().num_classes == 10
    assert DigitsDataModule(image_size=24).image_size == (24, 24)
    assert (DigitsDataModule().in_channels, CIFAR100DataModule().num_classes) == (1, 100)
    assert CIFAR10JPEGDataModule().image_size == (32, 32)
    assert SyntheticDataModule(num_classes=7, image_size=(8, 12)).image_size == (8, 12)
    with pytest.raises(AttributeError, match="after prepare_data"):
        _ = ImageFolderDataModule(root=str(tmp_path)).num_classes


@pytest.mark.parametrize("path", sorted((PROJECT / "conf" / "data").glob("*.yaml")), ids=str)
def test_every_data_config_instantiates(path):
    cfg = OmegaConf.create({"seed": 7, "split_seed": 123, "data": OmegaConf.load(path)})
    dm = instantiate(cfg.data)
    assert dm.seed == 123  # the split follows split_seed, not the run's seed
    assert type(dm).__name__ == cfg.data._target_.rsplit(".", 1)[1]


# --- digits -------------------------------------------------------------------------------------


def test_digits_are_the_real_data_normalised_on_the_training_split():
    dm = DigitsDataModule()
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    positions = torch.as_tensor(dm.train_set.positions)
    train_images = dm.val_set.transform(dm.train_set.source.tensors[0][positions])
    assert abs(train_images.mean()) < 1e-4 and abs(train_images.std() - 1) < 1e-4
    other_seed = DigitsDataModule(seed=1)
    other_seed.setup("fit")
    assert torch.equal(other_seed.test_set.source.tensors[0], dm.test_set.source.tensors[0])


# --- CIFAR-10 / CIFAR-100 from the official files -----------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_round_trip(name, make, tmp_path):
    dm = make(name)
    dm.prepare_data()
    dm.setup("fit")
    written = write_cifar(
        tmp_path / "again", dm.num_classes, *((50, 20) if name == "cifar10" else (120, 30))
    )
    pool, test = dm.train_set.source.tensors, dm.test_set.source.tensors
    assert torch.equal(pool[0], torch.from_numpy(written["train_x"]).view(-1, 3, 32, 32))
    assert pool[0].dtype == torch.uint8
    assert pool[1].tolist() == written["train_y"].tolist()
    assert test[1].tolist() == written["test_y"].tolist()
    assert dm.class_names == written["names"]
    image, _, _ = dm.test_set[0]
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    assert torch.allclose(image, (test[0][0] / 255 - mean) / std, atol=1e-5)


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_cifar_missing_files_say_where_and_how(cls, tmp_path):
    dm = cls(root=str(tmp_path / "nowhere"))
    folder = "cifar-10-batches-py" if cls is CIFAR10DataModule else "cifar-100-python"
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError, match="download") as error:
            step()
        assert str(tmp_path / "nowhere" / folder) in str(error.value)


def test_cifar_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        write_cifar(Path(root), 100, 120, 30)

    monkeypatch.setattr("distill_zoo.data.cifar.download_and_extract_archive", fake_download)
    dm = CIFAR100DataModule(root=str(tmp_path), download=True, num_workers=0)
    dm.prepare_data()
    dm.prepare_data()  # files present: no second download
    dm.setup("fit")
    assert len(calls) == 1 and calls[0][1] == "cifar-100-python.tar.gz" and calls[0][2]
    assert dm.num_train_samples == 108


def test_cifar_files_cannot_run_code(make, tmp_path):
    dm = make("cifar10")
    planted = {"data": collections.OrderedDict(), "labels": []}
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps(planted)
    )
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        dm.setup("fit")


def test_cifar_files_in_another_format_are_refused(make, tmp_path):
    dm = make("cifar100")
    wrong = {b"data": np.zeros((4, 1024), np.uint8), b"fine_labels": [0, 1, 2, 3]}
    _dump_like_python2(wrong, tmp_path / "cifar100" / "cifar-100-python" / "test")
    with pytest.raises(ValueError, match="not a CIFAR batch"):
        dm.setup("fit")


# --- CIFAR-10 from the JPEG archive --------------------------------------------------------------


def test_jpeg_archive_is_decoded_once_into_the_cache(make, tmp_path, monkeypatch):
    dm = make("cifar10_jpeg")
    dm.prepare_data()
    assert sorted(os.listdir(tmp_path / "cache")) == ["cifar10_jpeg.npz"]
    dm.setup("fit")
    assert dm.class_names == JPEG_CLASSES
    images, labels = dm.train_set.source.tensors
    assert labels.tolist() == [c for c in range(3) for _ in range(8)]
    written = np.stack([jpeg_pixels(c, i) for c in range(3) for i in range(8)])
    error = (images.permute(0, 2, 3, 1).float() - torch.from_numpy(written).float()).abs()
    assert error.mean() < 3  # JPEG is lossy: pixels come back approximately

    def no_archive(*args, **kwargs):
        raise AssertionError("the archive was read again")

    monkeypatch.setattr(tarfile, "open", no_archive)
    again = make("cifar10_jpeg")
    again.prepare_data()
    again.setup("fit")
    assert torch.equal(again.train_set.source.tensors[0], images)


def test_jpeg_subset_is_class_balanced(make):
    dm = make("cifar10_jpeg", subset=10, val_fraction=0.2)
    dm.setup("fit")
    labels = dm.train_set.source.tensors[1]
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert dm.num_train_samples == 8 and len(dm.test_set) == 6


def test_jpeg_archive_checksum_and_missing_archive(tmp_path):
    archive = write_jpeg_archive(tmp_path / "tiny.tar.gz")
    Path(f"{archive}.sha256").write_text("0" * 64 + "  tiny.tar.gz\n")
    dm = CIFAR10JPEGDataModule(archive=str(archive), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="sha256"):
        dm.prepare_data()
    missing = CIFAR10JPEGDataModule(archive=str(tmp_path / "gone.tar.gz"), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.archive=") as error:
        missing.setup("fit")
    assert str(tmp_path / "gone.tar.gz") in str(error.value)


def test_interrupted_decode_leaves_no_cache(tmp_path, monkeypatch):
    archive = write_jpeg_archive(tmp_path / "tiny.tar.gz")

    def interrupted(file, **arrays):
        file.write(b"half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    dm = CIFAR10JPEGDataModule(archive=str(archive), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.slow
@pytest.mark.data
def test_real_cifar10_jpeg_archive():
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"needs the CIFAR-10 JPEG archive at {REAL_ARCHIVE}")
    cache = os.environ.get("DISTILL_ZOO_CACHE", "~/.cache/distill_zoo")
    dm = CIFAR10JPEGDataModule(
        archive=str(REAL_ARCHIVE), cache_dir=f"{cache}/cifar10_jpeg", num_workers=0
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set.source) == 50_000 and len(dm.test_set) == 10_000
    assert dm.num_train_samples == 45_000 and len(dm.val_set) == 5_000
    assert dm.class_names[0] == "airplane" and dm.class_names[-1] == "truck"
    assert torch.bincount(dm.test_set.source.tensors[1]).tolist() == [1000] * 10
    images, targets, indices = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and indices.max() < 45_000


# --- ImageFolder ---------------------------------------------------------------------------------


def test_imagefolder_missing_layout_names_it(tmp_path):
    (tmp_path / "train").mkdir()
    dm = ImageFolderDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"root/train/<class>/<image>") as error:
        dm.setup("fit")
    assert "val/" in str(error.value)


# --- augmentation --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "cifar10", "cifar10_jpeg", "imagefolder"])
def test_training_augmentation_changes_images_and_evaluation_does_not(name, make):
    dm = make(name)
    dm.setup("fit")
    image, _ = dm.train_set.source[int(dm.train_set.positions[0])]
    torch.manual_seed(0)
    augmented = torch.stack([dm.train_set.transform(image) for _ in range(16)])
    evaluated = torch.stack([dm.val_set.transform(image) for _ in range(4)])
    assert len(torch.unique(augmented, dim=0)) > 1
    assert len(torch.unique(evaluated, dim=0)) == 1
    flips = [
        t for t in dm.train_set.transform.transforms if isinstance(t, v2.RandomHorizontalFlip)
    ]
    assert len(flips) == (name != "digits"), "digits are not mirror-invariant"


def test_cifar_evaluation_is_plain_normalisation(make):
    dm = make("cifar10")
    dm.setup("fit")
    image = dm.val_set.source.tensors[0][0]
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(dm.val_set.transform(image), (image / 255 - mean) / std, atol=1e-5)


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_data_is_learnable():
    dm = SyntheticDataModule(num_classes=5, in_channels=2, image_size=(12, 10), noise=1.0)
    dm.setup("fit")
    torch.manual_seed(0)
    model = torch.nn.Linear(2 * 12 * 10, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        for images, targets, _ in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(model(images.flatten(1)), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    images, targets, _ = next(iter(dm.test_dataloader()))
    accuracy = (model(images.flatten(1)).argmax(1) == targets).float().mean()
    assert accuracy > 0.9


# --- the on-device path (tests/test_device_data.py has the rest) ---------------------------------

IN_MEMORY = ["digits", "synthetic", "cifar10", "cifar100", "cifar10_jpeg"]


@pytest.mark.parametrize("name", IN_MEMORY)
def test_on_device_serves_what_the_dataloaders_serve(name, make):
    """Evaluation batches equal the DataLoader path's; training batches are 4-tuples of views
    of the right samples, and an epoch covers the training split once."""
    num_classes, in_channels, image_size, _ = EXPECTED[name]
    standard, dm = make(name), make(name, on_device=True, shuffle_seed=0)
    for module in (standard, dm):
        module.prepare_data()
        module.setup("fit")
    for split in ("val", "test"):
        loader = getattr(standard, f"{split}_dataloader")()
        on_device = getattr(dm, f"{split}_dataloader")()
        assert len(on_device) == len(loader)
        for expected, batch in zip(loader, on_device, strict=True):
            images, targets, indices = dm.fetch(batch)
            torch.testing.assert_close(images, expected[0], atol=1e-6, rtol=0)
            assert torch.equal(targets, expected[1]) and torch.equal(indices, expected[2])

    train = dm.train_dataloader()
    assert len(train) == len(standard.train_dataloader())
    pool_targets = dm.train_set.source.tensors[1]
    positions = torch.as_tensor(dm.train_set.positions)
    seen = []
    for batch in train:
        images, targets, indices, keys = dm.fetch(batch)
        assert images.shape == (len(targets), in_channels, *image_size)
        assert images.dtype == torch.float32 and images.is_contiguous()
        assert targets.dtype == indices.dtype == keys.dtype == torch.long
        assert torch.equal(targets, pool_targets[positions[indices]])
        assert targets.max() < num_classes
        assert keys.min() >= 0 and keys.max() < dm.train_augmentation.num_keys
        seen.append(indices)
    assert sorted(torch.cat(seen).tolist()) == list(range(dm.num_train_samples))
    if dm.train_set.source.tensors[0].dtype == torch.uint8:  # CIFAR and JPEG stay uint8
        assert dm._on(torch.device("cpu")).pool_images.dtype == torch.uint8


def test_imagefolder_has_no_on_device_path(tmp_path):
    with pytest.raises(ValueError, match="data.on_device=false"):
        ImageFolderDataModule(root=str(tmp_path), on_device=True)
