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

``--task segmentation`` and ``--task detection`` time the default run of
conf/task/<task>.yaml (digit scenes of 64x64 px; segmentation: an FCN pair with kd, i.e. CE +
per-pixel KD; detection: a Faster R-CNN pair with fitnets, i.e. the detector's own losses + a
hint on an FPN level through the FitNets regressor), the teacher with random weights. There
the plain loop does the same work on the same batches: the same models and distiller parts,
batches built on the same device by the same data module (epoch 0's order and crops), teacher
forward under ``torch.no_grad()`` (a detector teacher in eval mode, as in our step, so it also
decodes its boxes), student forward, the same loss written out by hand, backward, an SGD
step; fp32, NCHW. Our ``contiguous`` variant runs that work through Lightning (teacher under
``inference_mode``), so its ratio is about the framework's overhead alone. The teacher cache
serves classification only; a detector held in bfloat16 (``teacher_bf16``) fails.

Usage:
    python scripts/benchmark.py                           # both pairs, the CPU variants
    python scripts/benchmark.py --pairs kd --variants ours teacher_cache --steps 20
    python scripts/benchmark.py --device cuda --batch-size 512 --variants all   # on a GPU
    python scripts/benchmark.py --task segmentation       # 1-2 min on 2 CPU cores
    python scripts/benchmark.py --task detection --steps 5 --scenes 256
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from distill_zoo.build import build_model
from distill_zoo.config import compose
from distill_zoo.distillers.base import StepOutputs
from distill_zoo.distillers.taps import FeatureTap
from distill_zoo.engine.speed import native_bf16_flags
from distill_zoo.losses import hint_loss, kd_loss
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
    """Seconds spent per part over the timed steps, and what they processed (images, or a
    language model's tokens: ``scripts/benchmark_lm.py`` times with these pieces too)."""

    count: int = 0
    total: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: {"data": 0.0, "teacher": 0.0})

    def throughput(self) -> float:
        return self.count / self.total

    def share(self, part: str) -> float:
        """Percent of the timed wall time spent in ``part`` (``student``: the rest)."""
        seconds = self.total - sum(self.parts.values()) if part == "student" else self.parts[part]
        return 100 * seconds / self.total

    def shares(self) -> str:
        return " ".join(f"{k} {self.share(k):4.1f}%" for k in (*self.parts, "student"))


def images_in(batch) -> int:
    return batch[0].shape[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """The time once ``device`` has finished its queued work."""
    sync(device)
    return time.perf_counter()


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

    def __init__(
        self, warmup: int, teacher_clock: TeacherClock | None, count: Callable = images_in
    ) -> None:
        self.warmup = warmup
        self.count = count
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
            self.timing.count += self.count(batch)
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
    return fit_timed(args, config(args, pair, teacher_ckpt, data_root, extra))


def fit_timed(args, cfg, count: Callable = images_in) -> Timing:
    """Our Lightning training step on the run ``cfg``, through ``Trainer.fit``, for
    ``args.warmup`` untimed and ``args.steps`` timed steps (after a first epoch that fills the
    teacher cache, where there is one); ``count(batch)``: what a batch holds (images)."""
    L.seed_everything(0)
    datamodule, module = build(cfg)
    device = torch.device(args.device)
    step_clock = StepClock(args.warmup, TeacherClock(module.teacher, device), count)
    warmup = args.warmup
    if module.teacher_cache is not None:  # steady state: after one epoch fills the cache
        warmup += len(datamodule.train_dataloader())
        step_clock.warmup = warmup
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
        callbacks=[step_clock],
    )
    trainer.fit(module, datamodule=datamodule)
    return step_clock.timing


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
            timing.count += images.shape[0]
            timing.total += time.perf_counter() - started
            timing.parts["data"] += fetched - started
            timing.parts["teacher"] += taught - fetched
    return timing


# --- the dense tasks: segmentation and detection ----------------------------------------------

DENSE_TASKS = ("segmentation", "detection")
DENSE_BATCH_SIZE = 32  # digit_scenes' own batch size
DENSE_GPU_VARIANTS = [
    "ours",
    "contiguous",
    "fused_optimizer",
    "teacher_no_grad",
    "teacher_bf16",
    "bf16_mixed",
    "bf16",
    "compile",
]
DENSE_CPU_VARIANTS = ["ours", "contiguous"]
BF16_VARIANTS = ("teacher_bf16", "bf16_mixed", "bf16")
TEACHER_BF16 = "speed.teacher_bf16=true"
DENSE_STEPS = {"segmentation": (6, 2), "detection": (4, 2)}
"""Default (timed, warm-up) steps: each task's benchmark in ~1-2 minutes on 2 CPU cores."""
PLAIN_LOSSES = {"segmentation": "KD", "detection": "FitNets"}
"""The distiller whose loss each dense task's plain loop writes out (conf/task's pick)."""
DENSE_SETTINGS = {"segmentation": ["optim=sgd"], "detection": ["optim=sgd", "optim.lr=0.002"]}
"""Settings of each dense task's timed runs, before ``--override``: plain SGD in both loops
(the tasks pick AdamW for training; the step's work hardly depends on the optimizer), and for
detection a small rate: a random teacher's FPN hint can blow the student up within a few steps
at 0.05 (our step then stops the run). The step's work does not depend on the rate."""


def dense_config(args, task: str, extra: list[str], teacher_ckpt: Path | None = None):
    """The default run of ``conf/task/<task>.yaml`` (its data, student, teacher, distiller),
    bounded for timing, with ``--override`` and ``extra`` on top."""
    return compose(
        [
            f"task={task}",
            *([f"teacher.ckpt={teacher_ckpt}"] if teacher_ckpt is not None else []),
            f"trainer.accelerator={args.device}",
            "logger=none",
            "callbacks=none",
            "epochs=1000",
            f"data.batch_size={args.batch_size}",
            "data.drop_last=true",
            f"data.num_train={args.scenes}",
            *DENSE_SETTINGS[task],
            *args.override,
            *extra,
        ]
    )


def save_random_teacher(cfg, path: Path) -> None:
    """Writes the state dict of ``cfg.teacher`` with random weights, for the data of ``cfg``
    (its class and channel counts): a benchmark trains no teacher."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    L.seed_everything(0)
    teacher = build_model(cfg.teacher, datamodule.num_classes, datamodule.in_channels)
    torch.save(teacher.state_dict(), path)


class Hook:
    """The output of one named layer at its latest forward pass (a plain forward hook)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.output: torch.Tensor | None = None
        dict(model.named_modules())[name].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.output = output


def time_dense_plain_loop(args, task: str, teacher_ckpt: Path) -> Timing:
    """A plain PyTorch loop doing our step's work on the same batches, fp32, NCHW: teacher
    forward under ``no_grad``, student forward, the loss written out, backward, SGD step."""
    cfg = dense_config(args, task, ["speed.channels_last=false"], teacher_ckpt)
    L.seed_everything(0)
    # The same models, distiller parts (FitNets' regressor) and data module as our run.
    datamodule, module = build(cfg)
    device = torch.device(args.device)
    student, teacher, distiller = module.student, module.teacher, module.distiller
    written_out = PLAIN_LOSSES[task]
    if type(distiller).__name__ != written_out:
        raise ValueError(
            f"the plain loop of task={task} writes out {written_out}'s loss; distiller="
            f"{type(distiller).__name__} has no plain counterpart here"
        )
    for part in (student, teacher, distiller):
        part.to(device)
    student.train()
    distiller.train()
    teacher.eval()
    optimizer = torch.optim.SGD(
        [p for p in (*student.parameters(), *distiller.parameters()) if p.requires_grad],
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    if task == "segmentation":
        ignore_index = cfg.task.ignore_index

        def rows(logits):  # one row of class logits per pixel
            return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])

        def step_loss(images, masks):
            with torch.no_grad():
                teacher_logits = teacher(images)
            if isinstance(teacher_logits, dict):  # torchvision's segmentation models
                teacher_logits = teacher_logits["out"]
            taught = clock(device)
            logits = student(images)
            if isinstance(logits, dict):
                logits = logits["out"]
            ce = F.cross_entropy(logits, masks, ignore_index=ignore_index)
            soft = kd_loss(rows(logits), rows(teacher_logits), distiller.kd_temperature)
            return taught, distiller.ce_weight * ce + distiller.kd_weight * soft

    else:
        student_hint = Hook(student, distiller.student_layer)
        teacher_hint = Hook(teacher, distiller.teacher_layer)

        def step_loss(images, targets):
            with torch.no_grad():
                teacher(list(images))  # eval mode: detections, as our step's teacher pass
            taught = clock(device)
            losses = student(list(images), targets)  # train mode: the detector's own losses
            guided = distiller.regressor(student_hint.output)
            hint = hint_loss(guided, teacher_hint.output, formulation=distiller.formulation)
            detector = torch.stack(list(losses.values())).sum()
            return taught, distiller.ce_weight * detector + distiller.weight * hint

    return time_steps(args, datamodule, device, optimizer, step_loss)


def time_steps(
    args, datamodule, device: torch.device, optimizer, step_loss: Callable, count=None
) -> Timing:
    """The timed part of a plain PyTorch loop: ``args.warmup`` untimed and ``args.steps``
    timed steps over ``datamodule``'s batches built on ``device``, each
    ``taught, loss = step_loss(inputs, targets)`` (``taught``: the :func:`clock` reading once
    the teacher has run), backward and an ``optimizer`` step. ``count(inputs)``: what a batch
    holds (images by default). Stops with an error on a non-finite loss, as our step does."""
    count = count or (lambda inputs: inputs.shape[0])
    loader = datamodule.train_dataloader()
    timing = Timing()
    batches = iter(loader)
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        inputs, targets = datamodule.fetch(batch, device)[:2]  # built on the device
        fetched = clock(device)
        taught, loss = step_loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if step >= args.warmup:
            timing.count += count(inputs)
            timing.total += time.perf_counter() - started
            timing.parts["data"] += fetched - started
            timing.parts["teacher"] += taught - fetched
    if not bool(torch.isfinite(loss.detach())):
        raise FloatingPointError(
            f"the plain loop's loss is {float(loss)} after {args.warmup + args.steps} steps: "
            "lower the learning rate (--override optim.lr=...)"
        )
    return timing


def dense_variants(args) -> list[str]:
    """The variants to time on a dense task: those asked for, else ours and NCHW on a CPU
    (about a minute or two on 2 cores) and all on a GPU. Left out, saying why: the teacher
    cache (class logits per image: classification only) and, for detection, a teacher held in
    bfloat16 (torchvision's NMS has no bfloat16 kernel on the CPU; ``bf16_mixed`` runs the
    detectors under autocast instead)."""
    if args.variants_given:
        wanted = list(args.variants)
    elif args.device != "cpu":
        wanted = list(DENSE_GPU_VARIANTS)
    else:
        wanted = list(DENSE_CPU_VARIANTS)
        flags = ", ".join(sorted(native_bf16_flags())) or "none"
        print(
            f"bf16 variants are not timed by default on a CPU (bf16 flags here: {flags}; "
            "without avx512_bf16 or amx_bf16, bf16 is emulated, slowly): time them with "
            "--variants " + " ".join(["ours", *BF16_VARIANTS])
        )
    chosen = []
    for variant in wanted:
        overrides = VARIANTS[variant]
        if CACHE[0] in overrides:
            print(f"{variant}: not timed, the teacher cache serves task=classification only")
        elif args.task == "detection" and TEACHER_BF16 in overrides:
            print(
                f"{variant}: not timed, a detector held in bfloat16 fails (torchvision's CPU NMS "
                "has no bfloat16 kernel); bf16_mixed runs it under autocast"
            )
        else:
            chosen.append(variant)
    return chosen


def run_dense(args, tmp: Path) -> dict[str, dict[str, float]]:
    task = args.task
    base = dense_config(args, task, [])
    teacher_ckpt = tmp / f"{task}_teacher.pt"
    save_random_teacher(base, teacher_ckpt)
    distiller = base.distiller._target_.rsplit(".", 1)[-1].lower()
    data = base.data._target_.rsplit(".", 1)[-1].removesuffix("DataModule")
    print(
        f"task {task}: {data}, {base.data.num_train} training scenes of {base.data.image_size} "
        f"px, device {args.device}, batch {args.batch_size}, {args.steps} timed steps after "
        f"{args.warmup} warm-up, torch threads {torch.get_num_threads()}"
    )
    variants = dense_variants(args)
    print(
        f"\n{base.teacher.name} -> {base.student.name} with {distiller} (random teacher weights)"
    )
    sys.stdout.flush()
    # Timed before and after our variants (a shared machine drifts); ratios are against the
    # mean of the two.
    plain = time_dense_plain_loop(args, task, teacher_ckpt)
    timings = {
        variant: fit_timed(args, dense_config(args, task, VARIANTS[variant], teacher_ckpt))
        for variant in variants
    }
    again = time_dense_plain_loop(args, task, teacher_ckpt)
    reference = (plain.throughput() + again.throughput()) / 2
    results = {"plain": reference}
    for name, timing in [("plain loop", plain), *timings.items(), ("plain loop again", again)]:
        ratio = timing.throughput() / reference
        if name in timings:
            results[name] = timing.throughput()
        print(f"  {name:18s} {timing.throughput():9.1f} img/s  {ratio:4.2f}x  {timing.shares()}")
    sys.stdout.flush()
    return {task: results}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task",
        choices=("classification", *DENSE_TASKS),
        default="classification",
        help="classification: the CIFAR pairs; segmentation/detection: conf/task/<task>.yaml",
    )
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"128; {DENSE_BATCH_SIZE} for dense tasks"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant (10; dense: 6 seg, 4 det)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; 2)")
    parser.add_argument("--subset", type=int, default=4096, help="training images used")
    parser.add_argument("--workers", type=int, default=2, help="plain loop's loader workers")
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument(
        "--scenes",
        type=int,
        default=512,
        help="dense tasks: training scenes built (data.num_train)",
    )
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dense tasks: config overrides for every run, e.g. data.num_val=16",
    )
    args = parser.parse_args(argv)
    steps, warmup = DENSE_STEPS.get(args.task, (10, 3))
    args.steps = steps if args.steps is None else args.steps
    args.warmup = warmup if args.warmup is None else args.warmup
    if args.batch_size is None:
        args.batch_size = 128 if args.task == "classification" else DENSE_BATCH_SIZE
    args.variants_given = args.variants is not None
    if args.variants is None:
        args.variants = list(VARIANTS) if args.device == "cuda" else CPU_VARIANTS
    return args


def main(argv=None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    flags = ", ".join(sorted(native_bf16_flags()))
    print(
        f"CPU native bf16: {flags or 'none (bf16 is emulated here: slower than fp32)'}; "
        "bf16 figures hold only on CPUs with avx512_bf16 or amx_bf16, or on GPUs"
    )
    if args.task != "classification":
        with tempfile.TemporaryDirectory() as tmp:
            return run_dense(args, Path(tmp))
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
