"""Training throughput of distill_zoo against a plain PyTorch loop, in one process.

The plain loop does the same distillation work the way the reference KD code bases
(RepDistiller, mdistiller) do: a DataLoader applying torchvision transforms to one image at a
time on the CPU, fp32, default memory format, teacher under ``torch.no_grad()``. distill_zoo
runs its real Lightning training step (``train.build`` from the config tree) with the on-device
data path and each fast path of ``conf/speed/`` switched on in turn. For every variant the
script prints steady-state images/s, the ratio to the plain loop, and the share of step time
spent on data, in the teacher and in the student (forward, loss, backward and update). The
plain loop is timed before and after the variants (a shared machine drifts); ratios are
against the mean of the two.

Pairs: resnet56 -> resnet20 with KD, resnet32x4 -> resnet8x4 with CRD (random weights: speed
does not depend on them). Data: the real CIFAR-10 JPEG archive of ../shared/data when it is
there, else random images written in the official CIFAR-10 format.

Usage:
    python scripts/benchmark.py                           # both pairs, the CPU variants
    python scripts/benchmark.py --pairs kd --variants ours teacher_cache --steps 20
    python scripts/benchmark.py --device cuda --batch-size 512 --variants all   # on a GPU
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill_zoo.config import compose
from distill_zoo.distillers.base import StepOutputs
from distill_zoo.distillers.taps import FeatureTap
from distill_zoo.losses import kd_loss
from distill_zoo.models import create_model
from distill_zoo.train import build

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

PAIRS = {
    "kd": {"teacher": "resnet56", "student": "resnet20", "distiller": "kd"},
    "crd": {"teacher": "resnet32x4", "student": "resnet8x4", "distiller": "crd"},
}
CACHE = ["speed.teacher_cache=true", "data.augment_rounds=1"]
VARIANTS = {
    "ours": [],
    "contiguous": ["speed.channels_last=false"],  # NCHW, to see what channels_last buys
    "fused_optimizer": ["optim.fused=true"],
    "teacher_no_grad": ["speed.teacher_inference_mode=false"],
    "teacher_bf16": ["speed.teacher_bf16=true"],
    "bf16_mixed": ["trainer.precision=bf16-mixed"],
    "compile": ["speed.compile=true"],
    "teacher_cache": CACHE,
    "bf16": ["trainer.precision=bf16-mixed", "speed.teacher_bf16=true"],
    "cpu_fast": ["trainer.precision=bf16-mixed", "speed.teacher_bf16=true", *CACHE],
    "all": [
        "optim.fused=true",
        "trainer.precision=bf16-mixed",
        "speed.teacher_bf16=true",
        "speed.compile=true",
        *CACHE,
    ],
}
CPU_VARIANTS = [v for v in VARIANTS if v not in ("compile", "all")]


@dataclass
class Timing:
    """Seconds spent per part over the timed steps, and the images they processed."""

    images: int = 0
    total: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: {"data": 0.0, "teacher": 0.0})

    def throughput(self) -> float:
        return self.images / self.total

    def shares(self) -> str:
        student = self.total - sum(self.parts.values())
        shares = {**self.parts, "student": student}
        return " ".join(f"{k} {100 * v / self.total:4.1f}%" for k, v in shares.items())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TeacherClock:
    """Adds the wall time of every teacher forward pass to ``timing.parts['teacher']``."""

    def __init__(self, teacher: nn.Module, device: torch.device) -> None:
        self.timing: Timing | None = None
        self.device = device
        self._start = 0.0
        teacher.register_forward_pre_hook(self._before)
        teacher.register_forward_hook(self._after)

    def _before(self, *_):
        sync(self.device)
        self._start = time.perf_counter()

    def _after(self, *_):
        sync(self.device)
        if self.timing is not None:
            self.timing.parts["teacher"] += time.perf_counter() - self._start


class StepClock(L.Callback):
    """Times Lightning's training steps after ``warmup`` steps: total wall time between batch
    starts, and the data part (fetch, transfer, on-device augmentation)."""

    def __init__(self, warmup: int, teacher_clock: TeacherClock | None) -> None:
        self.warmup = warmup
        self.timing = Timing()
        self.teacher_clock = teacher_clock
        self._step = 0
        self._last_end: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(pl_module.device)
        now = time.perf_counter()
        timed = self._step >= self.warmup
        if timed and self._last_end is not None:
            self.timing.parts["data"] += now - self._last_end
        if self.teacher_clock is not None:
            self.teacher_clock.timing = self.timing if timed else None
        self._start = now if self._last_end is None else self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        now = time.perf_counter()
        if self._step >= self.warmup:
            self.timing.total += now - self._start
            self.timing.images += batch[0].shape[0]
        self._last_end = now
        self._step += 1


def data_overrides(args, data_root: Path | None) -> list[str]:
    common = [f"data.batch_size={args.batch_size}", "data.drop_last=true"]
    if data_root is None:
        return [
            "data=cifar10_jpeg",
            f"data.archive={args.archive}",
            f"data.subset={args.subset}",
            *common,
        ]
    return ["data=cifar10", f"data.root={data_root}", *common]


def write_random_cifar10(root: Path, n: int) -> None:
    """Random uint8 images in the official CIFAR-10 python format (5 train batches, test)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, count in [*((f"data_batch_{i}", n // 5) for i in range(1, 6)), ("test_batch", 64)]:
        batch = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "labels": (np.arange(count) % 10).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2)
    )


def config(args, pair: str, teacher_ckpt: Path, data_root: Path | None, extra: list[str]):
    names = PAIRS[pair]
    return compose(
        [
            f"student={names['student']}",
            f"teacher={names['teacher']}",
            f"teacher.ckpt={teacher_ckpt}",
            f"distiller={names['distiller']}",
            f"trainer.accelerator={args.device}",
            "logger=none",
            "callbacks=none",
            "epochs=1000",
            *data_overrides(args, data_root),
            *extra,
        ]
    )


def time_ours(args, pair, teacher_ckpt, data_root, extra) -> Timing:
    cfg = config(args, pair, teacher_ckpt, data_root, extra)
    L.seed_everything(0)
    datamodule, module = build(cfg)
    device = torch.device(args.device)
    clock = StepClock(args.warmup, TeacherClock(module.teacher, device))
    warmup = args.warmup
    if module.teacher_cache is not None:  # steady state: after one epoch fills the cache
        warmup += len(datamodule.train_dataloader())
        clock.warmup = warmup
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=datamodule)
    return clock.timing


def time_plain_loop(args, pair, teacher_ckpt, data_root) -> Timing:
    """The reference repos' loop: per-image CPU transforms in DataLoader workers, fp32."""
    # NCHW models: DistillationModule would otherwise convert them (speed.channels_last).
    plain_setup = ["data.on_device=false", "speed.channels_last=false"]
    cfg = config(args, pair, teacher_ckpt, data_root, plain_setup)
    L.seed_everything(0)
    datamodule, module = build(cfg)  # the same models, distiller and data split
    datamodule.num_workers = args.workers
    loader = datamodule.train_dataloader()
    device = torch.device(args.device)
    student, teacher, distiller = module.student, module.teacher, module.distiller
    for part in (student, teacher, distiller):
        part.to(device)
    student_layers, teacher_layers = distiller.layers()
    student_tap, teacher_tap = (
        FeatureTap(student, student_layers),
        FeatureTap(teacher, teacher_layers),
    )
    optimizer = torch.optim.SGD(
        [*student.parameters(), *distiller.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4
    )
    timing = Timing()
    batches = iter(loader)
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        try:
            images, targets, indices = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, targets, indices = next(batches)
        images, targets, indices = images.to(device), targets.to(device), indices.to(device)
        sync(device)
        fetched = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(images)
        sync(device)
        taught = time.perf_counter()
        student_logits = student(images)
        if pair == "kd":
            loss = 0.1 * F.cross_entropy(student_logits, targets) + 0.9 * kd_loss(
                student_logits, teacher_logits, 4.0
            )
        else:
            terms = distiller(
                StepOutputs(
                    images=images,
                    targets=targets,
                    indices=indices,
                    student_logits=student_logits,
                    teacher_logits=teacher_logits,
                    student_features=student_tap.pop(),
                    teacher_features=teacher_tap.pop(),
                )
            )
            loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if step >= args.warmup:
            timing.images += images.shape[0]
            timing.total += time.perf_counter() - started
            timing.parts["data"] += fetched - started
            timing.parts["teacher"] += taught - fetched
    return timing


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--subset", type=int, default=4096, help="training images used")
    parser.add_argument("--workers", type=int, default=2, help="plain loop's loader workers")
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = list(VARIANTS) if args.device == "cuda" else CPU_VARIANTS
    return args


def main(argv=None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = None
        if not args.archive.is_file():
            data_root = Path(tmp) / "cifar10"
            write_random_cifar10(data_root, args.subset)
            print(f"{args.archive} not found: timing on random images in CIFAR-10 format")
        print(
            f"device {args.device}, batch {args.batch_size}, {args.steps} timed steps after "
            f"{args.warmup} warm-up, torch threads {torch.get_num_threads()}"
        )
        for pair in args.pairs:
            names = PAIRS[pair]
            teacher_ckpt = Path(tmp) / f"{names['teacher']}.pt"
            torch.save(create_model(names["teacher"], num_classes=10).state_dict(), teacher_ckpt)
            print(f"\n{names['teacher']} -> {names['student']} with {names['distiller']}")
            # Timed before and after the variants: on a shared machine the two differ, and
            # every ratio is against their mean.
            plain = time_plain_loop(args, pair, teacher_ckpt, data_root)
            timings = {
                variant: time_ours(args, pair, teacher_ckpt, data_root, VARIANTS[variant])
                for variant in args.variants
                # The cache serves logit-only methods; CRD reads features.
                if not (CACHE[0] in VARIANTS[variant] and names["distiller"] != "kd")
            }
            again = time_plain_loop(args, pair, teacher_ckpt, data_root)
            reference = (plain.throughput() + again.throughput()) / 2
            results[pair] = {"plain": reference}
            for name, timing in [
                ("plain loop", plain),
                *timings.items(),
                ("plain loop again", again),
            ]:
                ratio = timing.throughput() / reference
                if name in timings:
                    results[pair][name] = timing.throughput()
                print(
                    f"  {name:18s} {timing.throughput():9.1f} img/s  {ratio:4.2f}x  "
                    f"{timing.shares()}"
                )
            sys.stdout.flush()
    return results


if __name__ == "__main__":
    for name in ("lightning.pytorch", "lightning.fabric"):  # one line per variant, not ten
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    main()
