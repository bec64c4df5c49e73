"""One training run: build everything from the config, fit, test, write ``metrics.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_zoo import compression, speed, teachers
from distill_zoo.distillers.base import DistillContext
from distill_zoo.models.ensemble import TeacherEnsemble, TeacherRoute
from distill_zoo.module import DistillationModule
from distill_zoo.quantize import QuantSpec

log = logging.getLogger(__name__)

MODULE_SPEED_KEYS = ("channels_last", "teacher_inference_mode", "teacher_bf16")
"""Keys of ``speed`` that are DistillationModule arguments as they are."""

MODEL_META_KEYS = ("feature_layers", "ckpt", "route_epochs", "members")
"""Keys of a student/teacher config that describe the model rather than construct it."""


def build_model(node: DictConfig, num_classes: int, in_channels: int) -> nn.Module:
    """Instantiates a ``student``/``teacher`` config with the data's class and channel count."""
    kwargs = {
        k: v
        for k, v in OmegaConf.to_container(node, resolve=True).items()
        if k not in MODEL_META_KEYS
    }
    return instantiate(kwargs, num_classes=num_classes, in_channels=in_channels)


def has_teacher(cfg: DictConfig) -> bool:
    """Whether ``cfg`` names a teacher (``teacher=none`` leaves the group empty)."""
    return bool(cfg.get("teacher")) and ("_target_" in cfg.teacher or "members" in cfg.teacher)


def needs_teacher(cfg: DictConfig) -> bool:
    """Whether the chosen distiller uses a teacher at all."""
    return get_class(cfg.distiller._target_).requires_teacher


def build_teacher(cfg: DictConfig, num_classes: int, in_channels: int) -> nn.Module | None:
    """The teacher the distiller needs, from ``cfg.teacher``:

    - ``ckpt: <file>``: that checkpoint; ``ckpt: null``: trained once on the run's data and
      recipe, and cached;
    - ``ckpt: [a, b, ...]``: an ensemble of that architecture
      (:class:`~distill_zoo.models.ensemble.TeacherEnsemble`), or, with ``route_epochs``
      (the student epoch at which each checkpoint starts teaching), a route of checkpoints
      (:class:`~distill_zoo.models.ensemble.TeacherRoute`, RCO);
    - ``members: [<teacher config>, ...]``: an ensemble of different architectures, each
      member a teacher config with its own ``ckpt`` (pipelines build these).
    """
    if not needs_teacher(cfg):
        return None
    if not has_teacher(cfg):
        raise ValueError(
            f"distiller {cfg.distiller._target_} needs a teacher, but teacher=none: choose one, "
            "e.g. teacher=resnet56 teacher.ckpt=<file>"
        )
    if cfg.teacher.get("members"):
        members = [
            teachers.load_weights(build_model(node, num_classes, in_channels), node.ckpt)
            for node in cfg.teacher.members
        ]
        return TeacherEnsemble(members)
    ckpt = cfg.teacher.get("ckpt")
    if OmegaConf.is_list(ckpt) or isinstance(ckpt, list):
        members = [
            teachers.load_weights(build_model(cfg.teacher, num_classes, in_channels), path)
            for path in ckpt
        ]
        route = cfg.teacher.get("route_epochs")
        return TeacherRoute(members, list(route)) if route else TeacherEnsemble(members)
    teacher = build_model(cfg.teacher, num_classes, in_channels)
    if ckpt:
        return teachers.load_weights(teacher, ckpt)
    return teachers.train_or_load_cached(cfg, teacher)


def teacher_stages(cfg: DictConfig, teacher: nn.Module | None) -> list[str]:
    """The teacher's stage layers; an ensemble's are those of its first member."""
    if teacher is None:
        return []
    node = cfg.teacher.members[0] if cfg.teacher.get("members") else cfg.teacher
    stages = list(node.get("feature_layers") or [])
    if isinstance(teacher, (TeacherEnsemble, TeacherRoute)):
        return [f"members.0.{name}" for name in stages]
    return stages


def check_ensemble_use(teacher: nn.Module | None, distiller: nn.Module) -> None:
    """Ensembles and routes give predictions, not one network's features: feature methods
    fail; an ensemble averages at the distiller's temperature."""
    if not isinstance(teacher, (TeacherEnsemble, TeacherRoute)):
        return
    teacher_layers = distiller.layers()[1]
    if teacher_layers:
        raise ValueError(
            f"{type(distiller).__name__} reads teacher features ({teacher_layers}), but an "
            "ensemble or route teacher (teacher.ckpt=[...], teacher.members) only gives "
            "predictions: use a logit-based distiller (kd, ...) or a single teacher.ckpt"
        )
    if isinstance(teacher, TeacherEnsemble):
        teacher.temperature = distiller.soft_temperature


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


def initialize_from(module: DistillationModule, path: str) -> None:
    """Starts the student, and the distiller parts that fit, from an earlier run's checkpoint.

    The student must match the checkpoint exactly (other architecture: a clear error).
    Distiller parts (a paraphraser, a connector) are taken where name and shape agree, so a
    stage can reuse what an earlier stage trained; the rest keep their fresh initialisation.
    """
    checkpoint = teachers.read_checkpoint(path, role="student init", config_key="init_from")
    teachers.load_weights(module.student, path, role="student init", loaded=checkpoint)
    parts = checkpoint.get("state_dict", checkpoint)
    own = module.distiller.state_dict()
    taken = {
        key.removeprefix("distiller."): value
        for key, value in parts.items()
        if key.startswith("distiller.")
        and key.removeprefix("distiller.") in own
        and own[key.removeprefix("distiller.")].shape == value.shape
    }
    module.distiller.load_state_dict(taken, strict=False)
    log.info(
        "Initialised the student from %s%s",
        path,
        f" and distiller parts {sorted({k.split('.')[0] for k in taken})}" if taken else "",
    )


def count_parameters(model: nn.Module | None) -> int | None:
    return None if model is None else sum(p.numel() for p in model.parameters())


def quant_spec(cfg: DictConfig) -> QuantSpec | None:
    """The quantized-student spec of ``cfg.quantize``; ``None`` for a float student."""
    return instantiate(cfg.quantize) if cfg.get("quantize") else None


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, DistillationModule]:
    """The set-up data module and the DistillationModule that ``cfg`` describes, ready to fit
    (teachers named without a checkpoint are trained or taken from the cache here)."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    num_classes, in_channels = datamodule.num_classes, datamodule.in_channels
    teacher = build_teacher(cfg, num_classes, in_channels)
    # Re-seed: the student starts the same whether its teacher was just trained or cached.
    L.seed_everything(cfg.seed, workers=True)
    student = build_model(cfg.student, num_classes, in_channels)
    quant = quant_spec(cfg)
    if quant is not None:  # before the taps: layers are swapped in place, names kept
        quant.prepare(student, _example_input(datamodule))
    context = DistillContext(
        student_stages=list(cfg.student.get("feature_layers") or []),
        teacher_stages=teacher_stages(cfg, teacher),
        example_input=_example_input(datamodule),
        num_classes=num_classes,
        num_train_samples=datamodule.num_train_samples,
        train_targets=datamodule.train_targets,
    )
    distiller = instantiate(cfg.distiller, student=student, teacher=teacher, context=context)
    check_ensemble_use(teacher, distiller)
    fast = cfg.get("speed") or {}
    module = DistillationModule(
        student=student,
        teacher=teacher,
        distiller=distiller,
        optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.sched) if cfg.get("sched") else None,
        num_classes=num_classes,
        distill_epochs=cfg.get("distill_epochs"),
        # conf/speed/ holds the defaults; a config without a key keeps the module's own.
        **{key: fast[key] for key in MODULE_SPEED_KEYS if key in fast},
        teacher_cache=speed.build_teacher_cache(fast, datamodule, teacher, num_classes),
    )
    if cfg.get("init_from"):
        initialize_from(module, cfg.init_from)
    if fast.get("compile"):
        speed.compile_models(module.student, module.teacher)
    return datamodule, module


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
                module.student, module.teacher, _example_input(datamodule), repeats=5, warmup=1
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


def _example_input(datamodule: L.LightningDataModule):
    import torch

    height, width = datamodule.image_size
    return torch.zeros(2, datamodule.in_channels, height, width)


def _float(value) -> float | None:
    return None if value is None else float(value)
