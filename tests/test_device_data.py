"""The on-device data path: batched augmentation against torchvision, seeded and resumable
order, DDP shards, and Lightning end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from scipy.stats import chi2_contingency, chisquare
from torchvision.transforms.v2 import functional as TF

from distill_zoo.data import (
    CropFlip,
    DigitsDataModule,
    IndexBatch,
    IndexBatches,
    SyntheticDataModule,
)
from distill_zoo.data.cifar import CIFAR10_MEAN, CIFAR10_STD, cifar_crop_flip

# --- the augmentation against torchvision ---------------------------------------------------


def every_key(aug: CropFlip) -> torch.Tensor:
    side = aug.side
    oy, ox, flip = torch.meshgrid(
        torch.arange(side), torch.arange(side), torch.arange(2 if aug.flip else 1), indexing="ij"
    )
    return aug.encode(oy.flatten(), ox.flatten(), flip.flatten())


def torchvision_view(aug: CropFlip, image: torch.Tensor, key: int) -> torch.Tensor:
    """torchvision's functional path: pad, crop at the key's offsets, flip, scale, normalise."""
    offset_y, offset_x, flip = (int(t) for t in aug.decode(torch.tensor(key)))
    height, width = image.shape[-2:]
    p = aug.padding
    view = TF.crop(TF.pad(image, [p, p, p, p], fill=0), offset_y, offset_x, height, width)
    if flip:
        view = TF.horizontal_flip(view)
    if image.dtype == torch.uint8:
        view = TF.to_dtype(view, torch.float32, scale=True)
    if aug.mean is not None:
        view = TF.normalize(view, list(aug.mean), list(aug.std))
    return view


@pytest.mark.parametrize(
    ("aug", "dtype"),
    [
        (CropFlip(padding=2, flip=True, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)), torch.uint8),
        (CropFlip(padding=3, mean=(0.3,), std=(0.7,)), torch.float32),  # digits-like
        (CropFlip(), torch.float32),  # synthetic: nothing at all
    ],
)
def test_every_view_equals_torchvision_functional(aug, dtype):
    generator = torch.Generator().manual_seed(0)
    channels = 1 if aug.mean is None else len(aug.mean)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (3, channels, 8, 10), dtype=dtype, generator=generator)
    else:
        images = torch.rand(3, channels, 8, 10, generator=generator)  # not square: H vs W
    keys = every_key(aug)
    assert sorted(keys.tolist()) == list(range(aug.num_keys))  # keys are a bijection
    rows = torch.arange(3).repeat_interleave(len(keys))
    keys = keys.repeat(3)
    batch = aug.apply(images, rows, keys)
    assert batch.dtype == torch.float32 and batch.is_contiguous()
    expected = torch.stack(
        [
            torchvision_view(aug, images[r], k)
            for r, k in zip(rows.tolist(), keys.tolist(), strict=True)
        ]
    )
    torch.testing.assert_close(batch, expected, atol=1e-6, rtol=0)
    evaluated = torch.stack(
        [torchvision_view(CropFlip(0, False, aug.mean, aug.std), i, 0) for i in images]
    )
    torch.testing.assert_close(aug.normalise(images), evaluated, atol=1e-6, rtol=0)


def test_the_torchvision_pipelines_are_the_cifar_recipe():
    train, evaluate = cifar_crop_flip(CIFAR10_MEAN, CIFAR10_STD).torchvision_transforms(
        (32, 32), scale=True
    )
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    assert train.transforms[0].padding == [4, 4, 4, 4] and train.transforms[0].size == (32, 32)
    assert [type(t).__name__ for t in evaluate.transforms] == ["ToDtype", "Normalize"]
    assert CropFlip().torchvision_transforms((8, 8), scale=False) == (None, None)


def coordinates(height: int, width: int) -> torch.Tensor:
    """A float image whose pixel (y, x) holds y * width + x + 1 (0 is the padding)."""
    return (torch.arange(height * width, dtype=torch.float32) + 1).view(1, height, width)


def read_views(views: torch.Tensor, padding: int) -> torch.Tensor:
    """Recovers the key of each augmented :func:`coordinates` image from its pixels."""
    _, _, height, width = views.shape
    i, j = height // 2, width // 2  # always inside the image for padding <= H/2, W/2
    source = views[:, 0, i, j].long() - 1
    right = views[:, 0, i, j + 1].long() - 1
    flip = (right < source).long()
    src_y, src_x = source // width, source % width
    offset_y = src_y - i + padding
    offset_x = torch.where(flip.bool(), src_x - (width - 1 - j), src_x - j) + padding
    return CropFlip(padding, True).encode(offset_y, offset_x, flip)


def test_offsets_and_flips_are_distributed_as_torchvision_draws_them():
    padding, height, width = 2, 8, 9
    aug = CropFlip(padding=padding, flip=True)
    image = coordinates(height, width)
    drawn = aug.sample_keys(20_000, torch.Generator().manual_seed(0))
    rows = torch.zeros(len(drawn), dtype=torch.long)
    ours = read_views(aug.apply(image[None], rows, drawn), padding)
    assert torch.equal(ours, drawn)  # the images show the crop and flip their keys name
    train, _ = aug.torchvision_transforms((height, width), scale=False)
    torch.manual_seed(0)
    theirs = read_views(torch.stack([train(image) for _ in range(4_000)]), padding)

    ours_counts = torch.bincount(ours, minlength=aug.num_keys).numpy()
    theirs_counts = torch.bincount(theirs, minlength=aug.num_keys).numpy()
    assert (theirs_counts > 0).all()  # torchvision reaches every view, so the coding is right
    assert chisquare(ours_counts).pvalue > 1e-3  # uniform over the 2 * 5 * 5 views
    assert chi2_contingency(np.stack([ours_counts, theirs_counts])).pvalue > 1e-3
    _, offset_x, flip = aug.decode(ours)
    assert abs(flip.float().mean() - 0.5) < 4 * math.sqrt(0.25 / len(ours))
    per_offset = torch.bincount(offset_x, minlength=aug.side).float() / len(ours)
    assert torch.allclose(per_offset, torch.full((aug.side,), 1 / aug.side), atol=0.01)


def test_augmented_cifar_batches_have_torchvision_statistics():
    aug = cifar_crop_flip(CIFAR10_MEAN, CIFAR10_STD)
    train, _ = aug.torchvision_transforms((32, 32), scale=True)
    generator = torch.Generator().manual_seed(0)
    # Images brighter in the middle, so that crops and the zero padding both shift statistics.
    ramp = torch.linspace(-1, 1, 32).abs()
    centre = (1 - torch.maximum(ramp[:, None], ramp[None, :])).mul(200)
    noise = torch.randint(0, 56, (64, 3, 32, 32), generator=generator)
    images = (centre + noise).to(torch.uint8)
    rows = torch.randint(0, 64, (2_000,), generator=generator)
    ours = aug.apply(images, rows, aug.sample_keys(len(rows), generator))
    torch.manual_seed(0)
    theirs = torch.stack([train(images[r]) for r in rows.tolist()])
    unaugmented = aug.normalise(images[rows])
    for reduce in (torch.mean, torch.std):
        a, b = reduce(ours, (0, 2, 3)), reduce(theirs, (0, 2, 3))
        assert torch.allclose(a, b, atol=0.02), (reduce.__name__, a, b)
        assert (reduce(unaugmented, (0, 2, 3)) - b).abs().min() > 0.05  # the test can tell


# --- order and keys: seeded, resumable, replayable -----------------------------------------


def loader(**kwargs) -> IndexBatches:
    options = dict(
        split="train",
        num_samples=37,
        batch_size=8,
        shuffle=True,
        drop_last=False,
        seed=3,
        augmentation=CropFlip(padding=4, flip=True),
    )
    return IndexBatches(**{**options, **kwargs})


def flat(batches: list[IndexBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b.indices for b in batches]), torch.cat([b.aug_keys for b in batches])


def test_order_and_keys_follow_the_seed_and_epoch_only():
    torch.manual_seed(0)
    first = flat(loader().batches(5))
    torch.manual_seed(1)  # the global RNG plays no part
    again = flat(loader().batches(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sorted(first[0].tolist()) == list(range(37))
    assert not torch.equal(first[0], flat(loader().batches(6))[0])
    assert not torch.equal(first[0], flat(loader(seed=4).batches(5))[0])
    mapping = dict(zip(*(t.tolist() for t in first), strict=True))
    next_epoch = dict(zip(*(t.tolist() for t in flat(loader().batches(6))), strict=True))
    assert mapping != next_epoch  # fresh crops and flips each epoch


def test_augment_rounds_replay_keys_per_sample():
    rounds = loader(augment_rounds=3)

    def keys_by_index(epoch: int) -> dict[int, int]:
        indices, keys = flat(rounds.batches(epoch))
        return dict(zip(indices.tolist(), keys.tolist(), strict=True))

    for epoch in range(3):
        assert keys_by_index(epoch) == keys_by_index(epoch + 3) == keys_by_index(epoch + 6)
        assert keys_by_index(epoch) != keys_by_index(epoch + 1)
        # the order still changes every epoch
        assert not torch.equal(flat(rounds.batches(epoch))[0], flat(rounds.batches(epoch + 3))[0])
    assert keys_by_index(1) == dict(
        zip(*(t.tolist() for t in flat(loader().batches(1))), strict=True)
    )


def test_epoch_comes_from_the_source_then_set_epoch_then_a_counter():
    plain = loader()
    passes = [flat(list(plain)) for _ in range(2)]
    for epoch, (indices, _) in enumerate(passes):
        assert torch.equal(indices, flat(plain.batches(epoch))[0])
    plain.set_epoch(7)
    assert torch.equal(flat(list(plain))[0], flat(plain.batches(7))[0])
    told = loader(epoch_source=lambda: 4)
    assert torch.equal(flat(list(told))[0], flat(told.batches(4))[0])


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("num_samples", "world_size"), [(37, 2), (40, 4), (5, 3)])
def test_ddp_shards_are_disjoint_cover_the_split_and_have_equal_lengths(
    num_samples, world_size, drop_last
):
    shards = [
        loader(
            num_samples=num_samples,
            batch_size=2,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        for rank in range(world_size)
    ]
    epochs = [[s.batches(epoch) for s in shards] for epoch in (0, 1)]
    for batches in epochs:
        assert len({len(b) for b in batches}) == 1  # equal batch counts: DDP does not hang
        assert [len(b) for b in batches] == [len(s) for s in shards]
        if drop_last:
            continue
        seen = [flat(b)[0].tolist() for b in batches]
        assert {len(s) for s in seen} == {math.ceil(num_samples / world_size)}
        everything = sum(seen, [])
        assert set(everything) == set(range(num_samples))  # cover the split
        assert len(everything) - num_samples == (-num_samples) % world_size  # only padding
    # every rank draws the same permutation: shards move together from epoch to epoch
    assert flat(epochs[0][0])[0].tolist() != flat(epochs[1][0])[0].tolist()
    for epoch in (0, 1):
        keys = dict(
            kv for b in epochs[epoch] for kv in zip(*(t.tolist() for t in flat(b)), strict=True)
        )
        full = loader(num_samples=num_samples).keys(epoch).tolist()
        assert all(full[i] == k for i, k in keys.items())  # ranks agree on every sample's key


def test_evaluation_batches_are_in_order_and_carry_no_keys():
    val = IndexBatches("val", 10, 4, shuffle=False, drop_last=False)
    batches = list(val)
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b.aug_keys is None and b.split == "val" for b in batches)
    assert len(val) == 3 and len(IndexBatches("val", 10, 4, shuffle=False, drop_last=True)) == 2


# --- the DataModule ------------------------------------------------------------------------


def digits(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(on_device=True, batch_size=100, shuffle_seed=1, **kwargs)
    dm.setup("fit")
    return dm


def test_datamodule_batches_are_the_torchvision_views_of_their_samples():
    dm = digits()
    train = dm.train_dataloader()
    batch = next(iter(train))
    images, targets, indices, keys = dm.fetch(batch)
    assert images.shape == (100, 1, 16, 16) and images.dtype == torch.float32
    assert targets.dtype == indices.dtype == keys.dtype == torch.int64
    assert torch.equal(indices, batch.indices) and torch.equal(keys, batch.aug_keys)
    pool_images, pool_targets = dm.train_set.source.tensors
    positions = torch.as_tensor(dm.train_set.positions)[indices]
    assert torch.equal(targets, pool_targets[positions])
    aug = dm.train_augmentation
    assert aug.padding == 2 and not aug.flip  # digits are not mirror-invariant
    for n in range(0, 100, 17):
        view = torchvision_view(aug, pool_images[positions[n]], int(keys[n]))
        torch.testing.assert_close(images[n], view, atol=1e-6, rtol=0)
    val_images, val_targets, val_indices = dm.fetch(next(iter(dm.val_dataloader())))
    expected = next(iter(DigitsDataModule(batch_size=100)._loader(dm.val_set, train=False)))
    torch.testing.assert_close(val_images, expected[0], atol=1e-6, rtol=0)
    assert torch.equal(val_targets, expected[1]) and torch.equal(val_indices, expected[2])


def test_datamodule_reads_epoch_rank_and_world_size_from_its_trainer():
    dm = digits(drop_last=True)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=3)
    train = dm.train_dataloader()
    assert (train.rank, train.world_size, train.seed) == (1, 2, 1)
    assert len(train) == math.ceil(dm.num_train_samples / 2) // 100
    assert torch.equal(flat(list(train))[0], flat(train.batches(3))[0])
    assert len(list(dm.val_dataloader())) == math.ceil(len(dm.val_set) / 2 / 100)


def test_stored_once_per_device():
    dm = digits()
    for batch in [*dm.train_dataloader(), *dm.test_dataloader()]:
        dm.fetch(batch, "cpu")
    assert list(dm._stored) == ["cpu"]
    # On the CPU the stored tensors are the data set's own: nothing is copied.
    stored = dm._stored["cpu"].pool_images
    assert stored.data_ptr() == dm.train_set.source.tensors[0].data_ptr()


def test_settings_a_user_can_get_wrong_fail_clearly():
    with pytest.raises(ValueError, match="on_device=true"):
        DigitsDataModule(augment_rounds=2)
    with pytest.raises(ValueError, match="augment_rounds"):
        DigitsDataModule(on_device=True, augment_rounds=0)
    dm = DigitsDataModule(on_device=True)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match="setup"):
        dm.fetch(IndexBatch("val", torch.arange(2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_batches_equal_cpu_batches():
    dm = digits()
    for batch in list(dm.train_dataloader())[:3] + list(dm.val_dataloader())[:1]:
        on_cpu, on_gpu = dm.fetch(batch, "cpu"), dm.fetch(batch, "cuda")
        assert all(g.device.type == "cuda" for g in on_gpu)
        for c, g in zip(on_cpu, on_gpu, strict=True):
            torch.testing.assert_close(g.cpu(), c, atol=1e-6, rtol=0)


# --- Lightning end to end ------------------------------------------------------------------


class Recorder(L.LightningModule):
    """A linear model that checks the batch layout and records what it was given."""

    def __init__(self, features: int, num_classes: int, dtype=torch.float32) -> None:
        super().__init__()
        self.model = torch.nn.Linear(features, num_classes)
        self.expected_dtype = dtype
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.evaluated = 0

    def training_step(self, batch, batch_idx):
        assert len(batch) == 4
        images, targets, indices, keys = batch
        assert images.dtype == self.expected_dtype and images.is_contiguous()
        assert targets.dtype == indices.dtype == keys.dtype == torch.int64
        self.seen.setdefault(self.current_epoch, []).append((indices.clone(), keys.clone()))
        return torch.nn.functional.cross_entropy(self.model(images.flatten(1)), targets)

    def validation_step(self, batch, batch_idx):
        assert len(batch) == 3
        images, targets, indices = batch
        assert images.dtype == self.expected_dtype and indices.dtype == torch.int64
        self.evaluated += len(indices)
        self.log(
            "val/loss", torch.nn.functional.cross_entropy(self.model(images.flatten(1)), targets)
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, epochs: int, model: Recorder | None = None, **kwargs) -> tuple[Recorder, L.Trainer]:
    model = model or Recorder(dm.in_channels * math.prod(dm.image_size), dm.num_classes)
    trainer = quiet_trainer(max_epochs=epochs, **kwargs)
    trainer.fit(model, datamodule=dm)
    return model, trainer


def test_lightning_trains_on_device_batches_of_the_trainer_epoch():
    dm = SyntheticDataModule(on_device=True, batch_size=50, drop_last=True, shuffle_seed=2)
    model, _ = fit(dm, 2, limit_train_batches=3)
    train = dm.train_dataloader()
    assert sorted(model.seen) == [0, 1]
    for epoch, steps in model.seen.items():
        assert len(steps) == 3  # limit_train_batches works: the loader has a length
        for (indices, keys), batch in zip(steps, train.batches(epoch), strict=False):
            assert torch.equal(indices, batch.indices)
            assert not keys.any()  # synthetic data has no augmentation
    assert model.evaluated == 2 * len(dm.val_set)


def test_true_half_precision_gets_half_images():
    dm = SyntheticDataModule(on_device=True, batch_size=64)
    model = Recorder(3 * 16 * 16, 4, dtype=torch.bfloat16)
    fit(dm, 1, model, precision="bf16-true", limit_train_batches=2)
    assert len(model.seen[0]) == 2 and model.evaluated == len(dm.val_set)


def test_a_resumed_fit_sees_the_batches_of_an_uninterrupted_one(tmp_path):
    def module():
        return SyntheticDataModule(on_device=True, num_samples=64, batch_size=16, shuffle_seed=5)

    uninterrupted, _ = fit(module(), 2)
    first, trainer = fit(module(), 1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Recorder(3 * 16 * 16, 4)
    torch.manual_seed(123)  # a different global RNG state must not matter
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(resumed, datamodule=module(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert list(resumed.seen) == [1]
    for (a, _), (b, _) in zip(uninterrupted.seen[1], resumed.seen[1], strict=True):
        assert torch.equal(a, b)
    for (a, _), (b, _) in zip(uninterrupted.seen[0], first.seen[0], strict=True):
        assert torch.equal(a, b)


def test_train_run_uses_the_on_device_path(tiny_config, tmp_path):
    from distill_zoo import train

    cfg = tiny_config("distiller=none", "teacher=none", "epochs=1", "data.augment_rounds=2")
    assert cfg.data.on_device and cfg.data.shuffle_seed == cfg.seed
    metrics = train.run(cfg, tmp_path)
    assert metrics["best_val_acc1"] is not None and metrics["test_acc1_best"] is not None
