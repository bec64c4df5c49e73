"""One training run: build everything from the config, fit, test, write ``metrics.json``."""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill_zoo.build import (
    build_model,
    build_run,
    build_teacher,
    count_parameters,
    example_input,
    quant_spec,
)
from distill_zoo.engine import launch, speed
from distill_zoo.engine.fsdp import is_sharded
from distill_zoo.module import PRUNING_REPORT_KEY, DistillationModule
from distill_zoo.shipping import compression
from distill_zoo.tasks import Monitor, Task
from distill_zoo.teachers import load_weights, store

log = logging.getLogger(__name__)


def warn_about_schedule(cfg: DictConfig) -> None:
    """Says so when a multistep schedule's milestones lie beyond the run's last epoch."""
    milestones = (cfg.get("sched") or {}).get("milestones")
    if milestones and max(milestones) >= cfg.epochs:
        log.warning(
            "sched milestones %s lie at or beyond epochs=%d: the learning rate decays at "
            "fewer milestones than planned (the 240-epoch CIFAR recipe uses 150,180,210)",
            list(milestones),
            cfg.epochs,
        )


def resume_checkpoint(cfg: DictConfig, checkpoint_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path=``, else ``last.ckpt`` with ``resume=true``."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist")
        return str(path)
    last = checkpoint_dir / "last.ckpt"
    if cfg.get("resume"):
        if last.is_file():
            log.info("Resuming from %s", last)
            return str(last)
        log.warning("resume=true but %s does not exist: starting from scratch", last)
    return None


class LastCheckpoint(ModelCheckpoint):
    """Rewrites ``checkpoints/last.ckpt`` after every epoch: where ``resume=true`` continues.

    Its own callback because Lightning 2.6's ``save_last=True`` rewrites ``last.ckpt`` only in
    epochs that also write a new best, so a resume could restart from an old epoch.
    """

    def __init__(self, dirpath: Path) -> None:
        super().__init__(dirpath=dirpath, filename="last", enable_version_counter=False)

    @property
    def state_key(self) -> str:
        # Unique beside an every-epoch ModelCheckpoint (save_every_n_epochs=1).
        return type(self).__name__


def ddp_strategy(cfg: DictConfig, module: DistillationModule) -> dict:
    """``strategy=ddp_find_unused_parameters_true`` where plain DDP would fail: a stage that
    trains only part of the model (hints alone), or labels-only epochs after distillation
    while the distiller has trainable parts. Also refuses SyncBatchNorm without a GPU."""
    trainer = cfg.trainer
    if trainer.get("sync_batchnorm") and (
        trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    ):
        raise ValueError(
            "trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm has no CPU "
            "kernel): set trainer.sync_batchnorm=false for CPU processes"
        )
    if trainer.get("strategy") != "ddp":
        return {}
    distiller = module.distiller
    idle_parts = cfg.get("distill_epochs") is not None and any(
        p.requires_grad for p in distiller.parameters()
    )
    if distiller.trains_only_part() or idle_parts:
        log.info("DDP looks for unused parameters: parts of the model get no gradient")
        return {"strategy": "ddp_find_unused_parameters_true"}
    return {}


TRAINER_KEYS_SET_BY_THE_RUN = {
    "max_epochs": "epochs=<n> (the schedules follow it too)",
    "default_root_dir": "output_root=<dir> or hydra.run.dir=<dir>",
    "logger": "logger=<csv|default|none>",
    "callbacks": "callbacks=<default|none> or callbacks.<name>=<config>",
}
"""Trainer arguments every run sets itself, and the setting that changes each."""


def refuse_ignored_trainer_keys(cfg: DictConfig) -> None:
    """Fails when the config sets a Trainer argument the run would overwrite (say
    ``++trainer.max_epochs=2``, which would otherwise run ``epochs`` epochs in silence)."""
    for key, instead in TRAINER_KEYS_SET_BY_THE_RUN.items():
        if cfg.trainer.get(key) is not None:
            raise ValueError(
                f"trainer.{key}={cfg.trainer.get(key)} would be ignored: each run sets it from "
                f"its own config. Use {instead}"
            )


def manual_optimization_settings(cfg: DictConfig, module: DistillationModule) -> dict:
    """Trainer arguments for a module that optimizes by hand (a distiller with an adversary,
    SKD's critic), where Lightning refuses automatic clipping and accumulation: clipping is
    applied to the student's gradients by the module instead; accumulation is refused."""
    method = type(module.distiller).__name__
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    if accumulate != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate} cannot be honoured: {method}'s "
            "adversary (a critic with its own optimizer) steps on every batch. Use a larger "
            "data.batch_size, or drop the adversarial term (distiller.holistic_weight=0)"
        )
    clip = cfg.trainer.get("gradient_clip_val")
    if not clip:
        return {}
    algorithm = cfg.trainer.get("gradient_clip_algorithm") or "norm"
    module.student_gradient_clip = (float(clip), algorithm)
    return {"gradient_clip_val": None}


def needs_logger(callback: object) -> bool:
    """Callbacks that fail without a logger (Lightning's LearningRateMonitor)."""
    return isinstance(callback, LearningRateMonitor)


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list, module: DistillationModule | None = None
) -> L.Trainer:
    refuse_ignored_trainer_keys(cfg)
    loggers = [
        instantiate(node, save_dir=str(run_dir / "logs"))
        for node in (cfg.get("logger") or {}).values()
    ]
    extra = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    if not loggers and any(needs_logger(c) for c in extra):
        log.info("logger=none: the learning-rate monitor is left out (it writes to a logger)")
        extra = [c for c in extra if not needs_logger(c)]
    if cfg.get("save_every_n_epochs"):
        # Anchors along the route (RCO) and early-stopped teachers (ESKD) pick these.
        extra.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="epoch-{epoch:03d}",
                every_n_epochs=cfg.save_every_n_epochs,
                save_top_k=-1,
                auto_insert_metric_name=False,
            )
        )
    monitor = module.task.monitor if module is not None else Monitor("acc1", "max")
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-{epoch:03d}",
        monitor=monitor.key,
        mode=monitor.mode,
        auto_insert_metric_name=False,
    )
    last = LastCheckpoint(dirpath=run_dir / "checkpoints")
    manual = module is not None and not module.automatic_optimization
    return instantiate(
        cfg.trainer,
        **(ddp_strategy(cfg, module) if module is not None else {}),
        **(manual_optimization_settings(cfg, module) if manual else {}),
        max_epochs=cfg.epochs,
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=[checkpoint, last, *extra, *callbacks],  # first: trainer.checkpoint_callback
    )


def ensure_teacher(cfg: DictConfig) -> Path:
    """The file of the teacher ``cfg.teacher`` trained on ``cfg``'s data and recipe: from the
    store, or trained now (``distiller=none``) and handed to the store.

    An interrupted teacher training continues from its ``last.ckpt``. Processes that need the
    same teacher at once (the jobs of a sweep) take turns through the store's lock: one trains
    it, the others wait and then find it cached. Only rank 0 of a DDP run takes the lock: its
    other ranks train along with it and must never wait on a lock their rank 0 holds.
    """
    entry = store.entry(cfg)
    if entry.cached:
        log.info("Using cached teacher %s", entry.file)
        return entry.file
    with store.lock(entry) if launch.leads_its_job() else nullcontext():
        if entry.cached:  # trained by the process this one waited for
            log.info("Using teacher %s, trained meanwhile by another process", entry.file)
            return entry.file
        run_cfg = entry.run_cfg.copy()
        run_cfg.resume = (entry.run_dir / "checkpoints" / "last.ckpt").is_file()
        log.info(
            "No teacher.ckpt given: %s teacher %s once, cached in %s",
            "continuing the interrupted training of" if run_cfg.resume else "training",
            run_cfg.student.get("name", "?"),
            entry.run_dir,
        )
        metrics = run(run_cfg, entry.run_dir)
        return store.save(entry, metrics["best_checkpoint"])


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, DistillationModule]:
    """:func:`~distill_zoo.build.build_run`, with teachers trained on demand."""
    return build_run(cfg, train_teacher=ensure_teacher)


def run(cfg: DictConfig, run_dir: str | Path, callbacks: list | None = None) -> dict:
    """Trains one student as ``cfg`` says, in ``run_dir``, and returns its metrics.

    Writes ``config.yaml`` (resolved), ``checkpoints/{best-*,last}.ckpt``, CSV and TensorBoard
    logs and ``metrics.json``. With ``resume=true`` a run continues from ``last.ckpt``.

    Args:
        cfg: The composed config (``conf/train.yaml``).
        run_dir: Output folder of this run.
        callbacks: Extra Lightning callbacks (tests use them to interrupt a run).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    refuse_ignored_trainer_keys(cfg)
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    warn_about_schedule(cfg)
    speed.warn_if_bf16_is_emulated(cfg)

    teacher_seconds = None

    def train_teacher(run_cfg: DictConfig) -> Path:
        # A teacher trained on demand is its own run: its time is not this run's.
        nonlocal teacher_seconds
        if store.entry(run_cfg).cached:
            return ensure_teacher(run_cfg)
        began = time.perf_counter()
        try:
            return ensure_teacher(run_cfg)
        finally:
            teacher_seconds = (teacher_seconds or 0.0) + time.perf_counter() - began

    resume_from = resume_checkpoint(cfg, run_dir / "checkpoints")
    datamodule, module = build_run(cfg, train_teacher=train_teacher, resume_from=resume_from)
    trainer = build_trainer(cfg, run_dir, callbacks or [], module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    # Read before testing "best": loading that checkpoint rolls the callback's state back.
    checkpoint = trainer.checkpoint_callback
    best_score, best_path, last_path = (
        _float(checkpoint.best_model_score),
        checkpoint.best_model_path,
        str(run_dir / "checkpoints" / "last.ckpt"),
    )
    last = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    best = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)[0]
    metrics = {
        **task_metrics(module.task, best_score, best, last),
        "student_params": count_parameters(module.student),
        "teacher_params": count_parameters(module.teacher),
        "epochs": trainer.current_epoch,
        "wall_time_s": round(time.perf_counter() - started - (teacher_seconds or 0.0), 2),
        **({"teacher_training_s": round(teacher_seconds, 2)} if teacher_seconds else {}),
        **speed.peak_memory_mb(module.device),
        **({PRUNING_REPORT_KEY: module.pruning_report} if module.pruning_report else {}),
        "best_checkpoint": best_path,
        "last_checkpoint": last_path,
    }
    if trainer.is_global_zero:
        # The student holds the best checkpoint's weights after the last test.
        student, teacher = module.student, module.teacher
        if is_sharded(trainer):
            # Sharded models run only in steps all processes take: this process measures and
            # samples whole copies, from the best checkpoint (a full state dict) and the
            # teacher's own file.
            student = build_model(cfg.student, datamodule.num_classes, datamodule.in_channels)
            load_weights(student, best_path)
            teacher = build_teacher(
                cfg, datamodule.num_classes, datamodule.in_channels, train_teacher
            )
            metrics["student_params"] = count_parameters(student)
            metrics["teacher_params"] = count_parameters(teacher)
        if cfg.get("report_compression", True):
            metrics[compression.METRICS_KEY] = compression.compression_report(
                student, teacher, example_input(datamodule), repeats=5, warmup=1
            )
            log.info("compression:\n%s", compression.format_report(metrics["compression"]))
            if module.pruning_report is not None:
                metrics[PRUNING_REPORT_KEY] = pruning_latency(
                    cfg, module, datamodule, metrics[compression.METRICS_KEY]["student"]
                )
        samples = module.task.write_samples(run_dir, student, teacher, datamodule)
        if samples is not None:
            log.info(
                "samples (greedy; the best checkpoint's student, the teacher; samples.json): %s",
                json.dumps(samples),
            )
        quant = quant_spec(cfg)
        if quant is not None:
            quantized = quant.report(module.student, datamodule)
            metrics.setdefault(compression.METRICS_KEY, {})["quantized"] = quantized
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("metrics: %s", json.dumps(metrics))
        log.info(summary(metrics))
    return metrics


def pruning_latency(
    cfg: DictConfig,
    module: DistillationModule,
    datamodule: L.LightningDataModule,
    compression_row: dict,
) -> dict:
    """The run's pruning report with the CPU latency of the network before pruning (rebuilt
    from ``init_from`` and measured as the compression report measures: same input, batch
    sizes, repeats) and of the pruned student (``compression_row``, its report's row)."""
    unpruned = build_model(cfg.student, datamodule.num_classes, datamodule.in_channels)
    load_weights(unpruned, cfg.init_from, role="student init", config_key="init_from")
    example = example_input(datamodule)
    before = compression.measure(unpruned, example, repeats=5, warmup=1)
    after = compression_row
    latency = {
        side: {k: v for k, v in row.items() if k.startswith("cpu_latency")}
        for side, row in (("before", before), ("after", after))
    }
    report = {**module.pruning_report}
    for side in ("before", "after"):
        report[side] = {**report[side], **latency[side]}
    return report


def task_metrics(task: Task, best_score: float | None, best: dict, last: dict) -> dict:
    """``metrics.json``'s results of ``task``: ``best_val_<monitor>``, each summary metric's
    ``test_<name>_best``/``_last``, the teacher's ``teacher_test_<name>``, the agreement, and
    every test metric of both checkpoints (``test_best``/``test_last``)."""
    best, last = _defined(best), _defined(last)
    metrics: dict = {"task": task.name, "monitor": task.monitor.key}
    metrics[f"best_val_{task.monitor.name}"] = best_score
    for name in task.summary_metrics:
        metrics[f"test_{name}_best"] = best.get(f"test/{name}")
    for name in task.summary_metrics:
        metrics[f"test_{name}_last"] = last.get(f"test/{name}")
    for name in task.teacher_metrics:
        metrics[f"teacher_test_{name}"] = best.get(f"test/teacher_{name}")
    metrics["test_agreement_best"] = best.get("test/agreement")
    metrics["test_best"] = {k.removeprefix("test/"): v for k, v in best.items()}
    metrics["test_last"] = {k.removeprefix("test/"): v for k, v in last.items()}
    return metrics


METRIC_TITLES = {"acc1": "top-1", "miou": "mIoU", "map": "mAP", "mae": "MAE"}
FRACTIONS = ("acc", "miou", "pixel_acc", "map", "agreement")


def shown(name: str, value: float | None) -> str:
    """A metric as a person reads it: fractions in %, errors as numbers."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if name.startswith(FRACTIONS) else f"{value:.4g}"


def summary(metrics: dict) -> str:
    """One line a person reads at the end of a run: the task's metric, time and peak memory."""
    name = metrics.get("monitor", "val/acc1").split("/", 1)[1]
    title = METRIC_TITLES.get(name, name)
    memory = f"peak RSS {metrics['peak_rss_mb']:.0f} MB"
    if "peak_gpu_memory_mb" in metrics:
        memory += f", peak GPU memory {metrics['peak_gpu_memory_mb']:.0f} MB"
    teacher_time = metrics.get("teacher_training_s")
    teacher_time = f" (teacher trained first in {teacher_time:.0f} s)" if teacher_time else ""
    return (
        f"run summary: test {title} {shown(name, metrics.get(f'test_{name}_best'))} (best val "
        f"checkpoint), {shown(name, metrics.get(f'test_{name}_last'))} (last); teacher "
        f"{shown(name, metrics.get(f'teacher_test_{name}'))}; {metrics['epochs']} epochs in "
        f"{metrics['wall_time_s']:.0f} s{teacher_time}; {memory}"
    )


def _defined(values: dict) -> dict:
    """``values`` with undefined (NaN) metrics as ``None``: metrics.json stays valid JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


def _float(value) -> float | None:
    return None if value is None or math.isnan(float(value)) else float(value)
