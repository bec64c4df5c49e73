"""From a config to what a run is made of: data, student, teacher and distiller.

Training (:mod:`distill_zoo.train`) and shipping (:mod:`distill_zoo.shipping`) both build
models here, so a checkpoint is always read back into the network it was trained as.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_zoo import teachers
from distill_zoo.distillers.base import DistillContext
from distill_zoo.engine import speed
from distill_zoo.models import pruned_structure
from distill_zoo.module import PRUNING_REPORT_KEY, DistillationModule
from distill_zoo.tasks import ClassificationTask, StepOutputs, Task
from distill_zoo.teachers import TeacherEnsemble, TeacherRoute

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


TeacherTrainer = Callable[[DictConfig], "os.PathLike | str"]
"""Given a run config whose teacher has no checkpoint, returns the file of that teacher trained
on the run's data and recipe (:func:`distill_zoo.train.ensure_teacher`)."""


def build_teacher(
    cfg: DictConfig,
    num_classes: int,
    in_channels: int,
    train_teacher: TeacherTrainer | None = None,
) -> nn.Module | None:
    """The teacher the distiller needs, from ``cfg.teacher``:

    - ``ckpt: <file>``: that checkpoint; ``ckpt: null``: the file ``train_teacher(cfg)``
      gives (trained once on the run's data and recipe, and cached);
    - ``ckpt: [a, b, ...]``: an ensemble of that architecture
      (:class:`~distill_zoo.teachers.ensemble.TeacherEnsemble`), or, with ``route_epochs``
      (the student epoch at which each checkpoint starts teaching), a route of checkpoints
      (:class:`~distill_zoo.teachers.ensemble.TeacherRoute`, RCO);
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
    if cfg.teacher.get("pretrained"):
        return teacher  # loaded from its save_pretrained folder: trained already
    if train_teacher is None:
        raise ValueError(
            "teacher.ckpt is null and nothing here trains teachers on demand: pass "
            "teacher.ckpt=<file>, or run through python -m distill_zoo (distill_zoo.train)"
        )
    return teachers.load_weights(teacher, train_teacher(cfg))


def stage_layers(node: DictConfig, model: nn.Module) -> list[str]:
    """A model's stage layers: its config's ``feature_layers``, else those the model names
    itself (a causal LM's decoder blocks)."""
    return list(node.get("feature_layers") or getattr(model, "feature_layers", None) or [])


def teacher_stages(cfg: DictConfig, teacher: nn.Module | None) -> list[str]:
    """The teacher's stage layers; an ensemble's are those of its first member."""
    if teacher is None:
        return []
    node = cfg.teacher.members[0] if cfg.teacher.get("members") else cfg.teacher
    stages = stage_layers(node, teacher)
    if isinstance(teacher, (TeacherEnsemble, TeacherRoute)):
        return [f"members.0.{name}" for name in stages]
    return stages


def check_ensemble_use(teacher: nn.Module | None, distiller: nn.Module) -> None:
    """Ensembles and routes give predictions, not one network's features: feature methods
    fail; an ensemble averages at the distiller's temperature."""
    if not isinstance(teacher, (TeacherEnsemble, TeacherRoute)):
        return
    if distiller.context.task == "language_modeling":
        raise ValueError(
            "an ensemble or route teacher (teacher.ckpt=[...], teacher.members) averages class "
            "predictions; task=language_modeling takes one teacher: give teacher.ckpt=<file>"
        )
    teacher_layers = distiller.layers()[1]
    if teacher_layers:
        raise ValueError(
            f"{type(distiller).__name__} reads teacher features ({teacher_layers}), but an "
            "ensemble or route teacher (teacher.ckpt=[...], teacher.members) only gives "
            "predictions: use a logit-based distiller (kd, ...) or a single teacher.ckpt"
        )
    if isinstance(teacher, TeacherEnsemble):
        teacher.temperature = distiller.soft_temperature


def initialize_from(module: DistillationModule, path: str, student: bool = True) -> None:
    """Starts the student, and the distiller parts that fit, from an earlier run's checkpoint.

    The student must match the checkpoint exactly (other architecture: a clear error);
    ``student=False`` leaves it alone (it was loaded, and pruned, before the distiller was
    built). Distiller parts (a paraphraser, a connector) are taken where name and shape agree,
    so a stage can reuse what an earlier stage trained; the rest keep their fresh
    initialisation.
    """
    checkpoint = teachers.read_checkpoint(path, role="student init", config_key="init_from")
    if student:
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


PRUNABLE_TASKS = ("classification", "segmentation", "regression")
"""Tasks whose students ``prune=`` serves (a detector's heads are tied to its anchors)."""


def shape_student(
    cfg: DictConfig,
    student: nn.Module,
    task: Task,
    datamodule: L.LightningDataModule,
    resume_from: str | None = None,
) -> tuple[bool, dict | None]:
    """Gives the student the (pruned) structure its run trains, before anything reads its
    shapes (feature taps, a distiller's connectors).

    - resuming (``resume_from``): the structure recorded in that checkpoint; nothing is pruned
      again (its weights come from the checkpoint);
    - ``init_from`` holding a pruned network: its structure (weights follow in
      :func:`initialize_from`);
    - ``prune`` set: the student takes ``init_from``'s weights now and is pruned by
      :class:`~distill_zoo.shipping.prune.PruneSpec`; the returned report (parameters and MACs
      before/after) goes into ``metrics.json``.

    Returns whether the student is a pruned network, and the pruning report of this run
    (also when resumed; ``None`` when this run pruned nothing).
    """
    if resume_from or not cfg.get("prune"):
        source, role, key = (
            (resume_from, "resume", "ckpt_path")
            if resume_from
            else (cfg.get("init_from"), "student init", "init_from")
        )
        if not source:
            return False, None
        checkpoint = teachers.read_checkpoint(source, role=role, config_key=key)
        structure = checkpoint.get(pruned_structure.STRUCTURE_KEY)
        if structure:
            pruned_structure.restore(student, structure)
        return bool(structure), checkpoint.get(PRUNING_REPORT_KEY) if resume_from else None
    prune = cfg.prune
    if not cfg.get("init_from"):
        raise ValueError(
            "prune= prunes a trained network, but init_from is null: pass "
            "init_from=<checkpoint of the network to prune>, or use pipeline=prune_kd, which "
            "trains (or takes) the teacher and prunes a copy of it"
        )
    if task.name not in PRUNABLE_TASKS:
        raise ValueError(
            f"prune= serves task={'|'.join(PRUNABLE_TASKS)}, not task={task.name} (a "
            "detector's anchors and box coder tie its heads' channels): set prune=null"
        )
    options = OmegaConf.to_container(prune, resolve=True)
    batches = options.pop("taylor_batches", 4)
    spec = instantiate(options)  # first: a bad prune.* key fails before anything is loaded
    teachers.load_weights(student, cfg.init_from, role="student init", config_key="init_from")
    log.info("Pruning the student from %s: %s", cfg.init_from, spec)
    backward = _task_loss_backward(task, datamodule, batches)
    report = spec.prune(student, example_input(datamodule), backward=backward)
    report.pop("structure", None)  # the checkpoints keep the structure itself
    log.info(
        "Pruned: %d -> %d parameters, %d -> %d MACs per image",
        report["before"]["params"],
        report["after"]["params"],
        report["before"]["macs"],
        report["after"]["macs"],
    )
    return True, report


def _task_loss_backward(
    task: Task, datamodule: L.LightningDataModule, batches: int
) -> Callable[[nn.Module], None]:
    """``backward(model)``: the task loss of ``model`` (on the CPU, where it is built) on the
    first ``batches`` training batches, back-propagated (Taylor importance). The loader is
    built before any DDP sampler exists and follows the run's seed, so every process scores
    the same batches."""

    # Drawn once: every probe of the pruning search, and the final pruning, score channels
    # on the same batches (a loader drawn again may shuffle differently).
    loader, chosen = datamodule.train_dataloader(), []
    transfer = getattr(datamodule, "transfer_batch_to_device", None)
    for batch in loader:
        if len(chosen) == batches:
            break
        chosen.append(transfer(batch, torch.device("cpu"), 0) if transfer is not None else batch)

    def backward(model: nn.Module) -> None:
        for batch in chosen:
            images, targets, indices = batch[:3]
            prediction, outputs = task.student_forward(model, images, targets)
            out = StepOutputs(
                images, targets, indices, prediction, student_outputs=outputs, task=task
            )
            (out.task_loss() / batches).backward()

    return backward


def count_parameters(model: nn.Module | None) -> int | None:
    return None if model is None else sum(p.numel() for p in model.parameters())


def quant_spec(cfg: DictConfig):
    """The quantized-student spec of ``cfg.quantize``
    (:class:`~distill_zoo.shipping.quantize.QuantSpec`); ``None`` for a float student."""
    return instantiate(cfg.quantize) if cfg.get("quantize") else None


def build_task(cfg: DictConfig, datamodule: L.LightningDataModule) -> Task:
    """The task ``cfg.task`` names (classification when the config has none), set up with the
    data; fails when the data serves another task."""
    node = cfg.get("task")
    if node is None:
        task: Task = ClassificationTask()
    else:
        task = instantiate({k: v for k, v in node.items() if k != "name"})
    task.setup(datamodule)
    return task


def check_models(
    task: Task, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor
) -> None:
    """Fails at start-up when the student or the teacher does not predict what the task needs
    (a classifier as a segmentation student, say)."""
    task.check_model(student, example, "student")
    if teacher is not None and not isinstance(teacher, (TeacherEnsemble, TeacherRoute)):
        task.check_model(teacher, example, "teacher")


def check_first_batches(task: Task, datamodule: L.LightningDataModule) -> None:
    """Fails at start-up when the data's first training and validation batches do not hold
    what the task needs (a mask class beyond ``num_classes``, a box outside its image)."""
    if task.name == "classification":
        return  # class ids are checked by the loss; nothing to decode here
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        batch = next(iter(loader))
        transfer = getattr(datamodule, "transfer_batch_to_device", None)
        if transfer is not None:
            batch = transfer(batch, torch.device("cpu"), 0)
        task.check_batch(batch)


def build_run(
    cfg: DictConfig, train_teacher: TeacherTrainer | None = None, resume_from: str | None = None
) -> tuple[L.LightningDataModule, DistillationModule]:
    """The set-up data module and the DistillationModule that ``cfg`` describes, ready to fit.

    Args:
        cfg: The composed run config.
        train_teacher: Gives the file of a teacher named without a checkpoint (trained on
            demand, or taken from the store); ``None``: such a teacher is an error.
        resume_from: The checkpoint the run will resume from: a pruned student takes the
            structure recorded there instead of being pruned again.
    """
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    task = build_task(cfg, datamodule)
    check_first_batches(task, datamodule)
    num_classes, in_channels = datamodule.num_classes, datamodule.in_channels
    teacher = build_teacher(cfg, num_classes, in_channels, train_teacher)
    # Re-seed: the student starts the same whether its teacher was just trained or cached.
    L.seed_everything(cfg.seed, workers=True)
    student = build_model(cfg.student, num_classes, in_channels)
    pruned, pruning = shape_student(cfg, student, task, datamodule, resume_from)
    check_models(task, student, teacher, example_input(datamodule))
    quant = quant_spec(cfg)
    if quant is not None:  # before the taps: layers are swapped in place, names kept
        if task.name != "classification":
            raise ValueError(
                f"quantize={cfg.quantize.get('name', 'on')} serves task=classification only "
                f"(its report measures top-1): set quantize=none for task={task.name}"
            )
        quant.prepare(student, example_input(datamodule))
    context = DistillContext(
        task=task.name,
        student_stages=stage_layers(cfg.student, student),
        teacher_stages=teacher_stages(cfg, teacher),
        example_input=example_input(datamodule),
        num_classes=num_classes,
        num_train_samples=datamodule.num_train_samples,
        train_targets=getattr(datamodule, "train_targets", None),
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
        task=task,
        # conf/speed/ holds the defaults; a config without a key keeps the module's own.
        **{key: fast[key] for key in MODULE_SPEED_KEYS if key in fast},
        teacher_cache=speed.build_teacher_cache(fast, datamodule, teacher, num_classes),
    )
    module.student_pruned, module.pruning_report = pruned, pruning
    if cfg.get("init_from") and not resume_from:
        # A resumed run's checkpoint holds all of it; a student pruned here holds its weights.
        initialize_from(module, cfg.init_from, student=not cfg.get("prune"))
    if fast.get("compile"):
        speed.compile_models(module.student, module.teacher)
    return datamodule, module


def example_input(datamodule: L.LightningDataModule) -> torch.Tensor:
    """Two zero inputs of the data's shape, for dry forward passes."""
    shape = getattr(datamodule, "input_shape", None)
    if shape is None:
        shape = (datamodule.in_channels, *datamodule.image_size)
    return torch.zeros(2, *shape, dtype=getattr(datamodule, "input_dtype", torch.float32))
