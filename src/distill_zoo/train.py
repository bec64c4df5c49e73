"""One training run: build everything from the config, fit, test, write ``metrics.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill_zoo.build import build_run, count_parameters, example_input, quant_spec
from distill_zoo.engine import speed
from distill_zoo.module import DistillationModule
from distill_zoo.shipping import compression
from distill_zoo.teachers import store

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


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list, module: DistillationModule | None = None
) -> L.Trainer:
    loggers = [
        instantiate(node, save_dir=str(run_dir / "logs"))
        for node in (cfg.get("logger") or {}).values()
    ]
    extra = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
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
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-{epoch:03d}",
        monitor="val/acc1",
        mode="max",
        auto_insert_metric_name=False,
    )
    last = LastCheckpoint(dirpath=run_dir / "checkpoints")
    return instantiate(
        cfg.trainer,
        **(ddp_strategy(cfg, module) if module is not None else {}),
        max_epochs=cfg.epochs,
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=[checkpoint, last, *extra, *callbacks],  # first: trainer.checkpoint_callback
    )


def ensure_teacher(cfg: DictConfig) -> Path:
    """The file of the teacher ``cfg.teacher`` trained on ``cfg``'s data and recipe: from the
    store, or trained now (``distiller=none``) and handed to the store.

    An interrupted teacher training continues from its ``last.ckpt``.
    """
    entry = store.entry(cfg)
    if entry.cached:
        log.info("Using cached teacher %s", entry.file)
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
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    warn_about_schedule(cfg)

    datamodule, module = build(cfg)
    trainer = build_trainer(cfg, run_dir, callbacks or [], module)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir / "checkpoints")
    )

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
        "best_val_acc1": best_score,
        "test_acc1_best": best.get("test/acc1"),
        "test_acc5_best": best.get("test/acc5"),
        "test_acc1_last": last.get("test/acc1"),
        "test_acc5_last": last.get("test/acc5"),
        "teacher_test_acc1": best.get("test/teacher_acc1"),
        "test_agreement_best": best.get("test/agreement"),
        "student_params": count_parameters(module.student),
        "teacher_params": count_parameters(module.teacher),
        "epochs": trainer.current_epoch,
        "wall_time_s": round(time.perf_counter() - started, 2),
        **speed.peak_memory_mb(module.device),
        "best_checkpoint": best_path,
        "last_checkpoint": last_path,
    }
    if trainer.is_global_zero:
        # The student holds the best checkpoint's weights after the last test.
        if cfg.get("report_compression", True):
            metrics[compression.METRICS_KEY] = compression.compression_report(
                module.student, module.teacher, example_input(datamodule), repeats=5, warmup=1
            )
            log.info("compression:\n%s", compression.format_report(metrics["compression"]))
        quant = quant_spec(cfg)
        if quant is not None:
            quantized = quant.report(module.student, datamodule)
            metrics.setdefault(compression.METRICS_KEY, {})["quantized"] = quantized
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("metrics: %s", json.dumps(metrics))
        log.info(summary(metrics))
    return metrics


def summary(metrics: dict) -> str:
    """One line a person reads at the end of a run: accuracy, time and peak memory."""

    def pct(value) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    memory = f"peak RSS {metrics['peak_rss_mb']:.0f} MB"
    if "peak_gpu_memory_mb" in metrics:
        memory += f", peak GPU memory {metrics['peak_gpu_memory_mb']:.0f} MB"
    return (
        f"run summary: test top-1 {pct(metrics['test_acc1_best'])} (best val checkpoint), "
        f"{pct(metrics['test_acc1_last'])} (last); teacher {pct(metrics['teacher_test_acc1'])}; "
        f"{metrics['epochs']} epochs in {metrics['wall_time_s']:.0f} s; {memory}"
    )


def _float(value) -> float | None:
    return None if value is None else float(value)
