"""DistillationModule: a student, a frozen teacher and a distiller in one LightningModule."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from distill_zoo.distillers.base import Distiller
from distill_zoo.distillers.taps import FeatureTap
from distill_zoo.engine.collectives import all_gather_rows
from distill_zoo.models import pruned_structure
from distill_zoo.tasks import ClassificationTask, StepOutputs, Task
from distill_zoo.teachers.cache import TeacherOutputCache

# The frozen teacher is in eval mode on purpose; Lightning would warn about it every fit.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

PRUNING_REPORT_KEY = "pruning"
"""Where a pruned run's checkpoints and ``metrics.json`` keep its before/after report."""


def freeze(model: nn.Module) -> nn.Module:
    """Puts ``model`` in eval mode with gradients off: a teacher that never changes."""
    model.eval()
    model.requires_grad_(False)
    return model


def _ordinary(tensor: Tensor, upcast: bool) -> Tensor:
    """A tensor usable by autograd (float32 with ``upcast``) from one made in inference mode."""
    if upcast and tensor.dtype != torch.float32:
        return tensor.float()  # a new tensor, made outside inference mode
    return tensor.clone() if tensor.is_inference() else tensor


def _numpy_state_to_safe(state: tuple) -> dict:
    """numpy's RNG state as tensors and plain numbers, loadable with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_safe(state: dict) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["kind"], keys, state["pos"], state["has_gauss"], state["cached"]


class DistillationModule(L.LightningModule):
    """Trains ``student`` with the loss terms of ``distiller``, reading a frozen ``teacher``,
    on the task ``task`` (what a batch, a prediction, the task loss and the metrics are).

    The teacher stays in eval mode for the whole run (its BatchNorm statistics never move),
    runs under ``torch.no_grad()``, and is not in the optimizer. The student and the
    distiller's own trainable parts (regressors, embeddings) are. A part trained against the
    student (a GAN critic, :meth:`~distill_zoo.distillers.base.Distiller.adversary`) gets its
    own optimizer instead: the module then optimizes by hand (Lightning's manual
    optimization), stepping the student's optimizer and then the adversary's on every batch,
    and steps the epoch-wise scheduler itself; Lightning saves and restores both optimizers.
    A distiller whose teacher must see the student's outputs (``teacher_after_student``, Chen
    et al.'s teacher classifying the student's proposals) gets the teacher after the student.

    Logged: ``train/loss`` and each ``train/loss_<term>``; the task's metrics of the student,
    the teacher and their agreement per evaluation stage (``val/acc1``, ``val/teacher_acc1``,
    ``val/agreement`` for classification; ``val/miou``, ``val/map``, ``val/mae`` for the
    others). A non-finite loss stops the run with an error naming the term, the epoch and the
    step; the checkpoints written so far are kept.

    Args:
        student: Network being trained.
        teacher: Frozen teacher, or ``None`` for plain training.
        distiller: Produces the weighted loss terms.
        optimizer: Builds the optimizer from parameters (a Hydra ``_partial_`` config).
        scheduler: Builds an epoch-wise learning-rate scheduler, or ``None``.
        num_classes: Classes of the data set, for a classification task made here when
            ``task`` is ``None``.
        distill_epochs: Distil only during the first ``distill_epochs`` epochs, then train on
            the task loss alone (weight 1; Cho & Hariharan's early-stopped KD, ICCV 2019);
            ``None``: distil throughout.
        task: The task (:mod:`distill_zoo.tasks`), set up with the data; ``None``:
            classification over ``num_classes`` classes.
        channels_last: Keep models and images in NHWC memory format (faster convolutions on
            tensor cores and oneDNN).
        teacher_inference_mode: Run the teacher under ``torch.inference_mode()`` (no autograd
            bookkeeping at all) instead of ``torch.no_grad()``.
        teacher_bf16: Hold the frozen teacher in bfloat16 and feed it bfloat16 images; its
            outputs are handed to the distiller in float32.
        teacher_cache: Reuse teacher logits per (sample, augmentation) instead of running the
            teacher (logit-only distillers; training batches must carry augmentation keys).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        distiller: Distiller,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
        num_classes: int | None = None,
        distill_epochs: int | None = None,
        *,
        task: Task | None = None,
        channels_last: bool = False,
        teacher_inference_mode: bool = True,
        teacher_bf16: bool = False,
        teacher_cache: TeacherOutputCache | None = None,
    ) -> None:
        super().__init__()
        if distill_epochs is not None and distill_epochs < 0:
            raise ValueError(f"distill_epochs must be >= 0 or null, got {distill_epochs}")
        if task is None:
            if not num_classes:
                raise ValueError("DistillationModule needs a task or num_classes")
            task = ClassificationTask(num_classes)
        self.task = task
        self.distill_epochs = distill_epochs
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self.distiller = distiller
        # A part trained against the student (a GAN discriminator) gets its own optimizer,
        # stepped by the module after the student's: Lightning's manual optimization.
        self.automatic_optimization = distiller.adversary() is None
        self.student_gradient_clip: tuple[float, str] | None = None
        """Manual optimization only: (value, "norm" | "value") clipping of the student's
        gradients before its step (``trainer.gradient_clip_val``, which the run hands here)."""
        # Buffers a distiller keeps identical on every rank itself (CRD's memory banks): DDP
        # need not broadcast them from rank 0 before every step (51 MB for CIFAR-100).
        self._ddp_params_and_buffers_to_ignore = [
            f"distiller.{prefix}{'.' if prefix else ''}{name}"
            for prefix, part in distiller.named_modules()
            if hasattr(part, "replicated_buffers")
            for name in part.replicated_buffers()
        ]
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.teacher_inference_mode = teacher_inference_mode
        self.teacher_dtype = torch.bfloat16 if teacher_bf16 else None
        if teacher_cache is not None and (teacher is None or distiller.layers()[1]):
            raise ValueError(
                "the teacher cache keeps logits only: it needs a teacher and a distiller that "
                f"reads no teacher features ({type(distiller).__name__} reads "
                f"{distiller.layers()[1]}); set speed.teacher_cache=false"
            )
        if teacher_cache is not None and task.name != "classification":
            raise ValueError(
                f"the teacher cache keeps class logits per sample: task={task.name} is not "
                "served; set speed.teacher_cache=false"
            )
        if teacher_bf16 and task.name == "detection":
            raise ValueError(
                "speed.teacher_bf16=true: torchvision's detectors cannot be held in bfloat16 "
                "(their NMS has no bfloat16 kernel); use trainer.precision=bf16-mixed instead"
            )
        self.teacher_cache = teacher_cache
        if self.teacher is not None and teacher_bf16:
            self.teacher.to(torch.bfloat16)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        student_layers, teacher_layers = distiller.layers()
        self.student_tap = FeatureTap(student, student_layers, role="student")
        self.teacher_tap = (
            FeatureTap(teacher, teacher_layers, role="teacher") if teacher is not None else None
        )
        self.student_pruned = False
        """Whether the student is a pruned network: its checkpoints then record its structure."""
        self.pruning_report: dict | None = None
        """Parameters and MACs before/after, when this run pruned the student."""
        self.train_metric = task.train_metric()
        self.eval_metrics = nn.ModuleDict({stage: task.metrics() for stage in ("val", "test")})
        self._logged: dict[str, list[str]] = {"val": [], "test": []}

    def train(self, mode: bool = True) -> DistillationModule:
        """Switches the student and distiller; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _layout(self, inputs: Tensor) -> Tensor:
        return inputs.contiguous(memory_format=self.memory_format) if inputs.dim() == 4 else inputs

    def _teacher_forward(
        self, images: Tensor, indices: Tensor | None = None, aug_keys: Tensor | None = None
    ) -> tuple[Any, dict[str, Tensor]]:
        """Teacher prediction and tapped features; cached logits where the cache holds them."""
        if self.teacher is None:
            return None, {}
        if self.teacher_cache is None or aug_keys is None:
            return self._run_teacher(images)
        found, logits = self.teacher_cache.lookup(indices, aug_keys)
        missing = ~found
        if bool(missing.any()):
            # The teacher is in eval mode (no batch statistics): a sub-batch of the misses
            # gets the logits those samples would get in the full batch.
            logits[missing] = self._run_teacher(images[missing])[0].float()
        # Every rank keeps what any rank computed (a sample lands on another rank next epoch);
        # the gather runs every step, misses or not, so that all ranks' collectives match.
        computed = all_gather_rows(indices[missing], aug_keys[missing], logits[missing])
        if len(computed[0]):
            self.teacher_cache.store(*computed, self.current_epoch)
        return logits, {}

    def _run_teacher(self, images: Tensor) -> tuple[Any, dict[str, Tensor]]:
        inputs = images
        if self.teacher_dtype is not None and images.is_floating_point():  # not token ids
            inputs = images.to(self.teacher_dtype)
        with torch.inference_mode() if self.teacher_inference_mode else torch.no_grad():
            prediction = self.task.predict(self.teacher, inputs)
            features = self.teacher_tap.pop()
        # Outside inference mode, so that losses may save them for the student's backward;
        # a bf16 teacher's outputs meet the fp32 student as fp32.
        upcast = self.teacher_dtype is not None
        if isinstance(prediction, Tensor):
            prediction = _ordinary(prediction, upcast)
        return prediction, {k: _ordinary(v, upcast) for k, v in features.items()}

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            # Manual optimization: Lightning leaves the epoch-wise scheduler to the module.
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        for name, value in self.distiller.monitored().items():
            self.log(f"train/{name}", value)
        if self.teacher_cache is not None:
            rate = self.teacher_cache.hit_rate()
            self.log("train/teacher_cache_hit_rate", rate, sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.automatic_optimization:
            return
        # Under manual optimization Lightning turns DDP's gradient sync off at the end of each
        # forward, and with it DDP's broadcast of rank 0's buffers (BatchNorm statistics)
        # before the next forward: without this the ranks' statistics drift apart.
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_forward_param_sync = True

    def setup(self, stage: str) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy) and self.teacher_dtype is not None:
            raise ValueError(
                "speed.teacher_bf16=true under trainer=fsdp: FSDP keeps the teacher's and the "
                "student's top-level weights in one unit of one dtype, and its bf16-mixed "
                "precision runs the teacher in bf16 already: set speed.teacher_bf16=false"
            )
        # Here, not in on_fit_start: the process group exists, but DDP has not wrapped the
        # student yet (its own shape check would fail first, with a cryptic message).
        if stage == "fit" and self.student_pruned and self.trainer.world_size > 1:
            # Each process pruned (or rebuilt) its own copy before DDP existed; a structure
            # that differs across ranks would make DDP's gradient buckets disagree.
            mine = pruned_structure.digest(self.student)
            same = self.trainer.strategy.reduce_boolean_decision(
                mine == self.trainer.strategy.broadcast(mine, src=0), all=True
            )
            if not same:
                raise RuntimeError(
                    "the pruned student differs between DDP processes (pruning was not "
                    "deterministic on this machine): prune in a one-process run and start the "
                    "DDP run from its checkpoint with init_from=<checkpoint> and prune=null"
                )

    def on_train_start(self) -> None:
        # After a resumed run's checkpoint is restored: the distiller keeps what it restored.
        self.distiller.before_training(
            self.trainer, lambda inputs: self._teacher_forward(inputs)[0]
        )

    def on_train_epoch_start(self) -> None:
        # A route of teacher checkpoints (RCO) switches to the anchor of this epoch.
        if hasattr(self.teacher, "set_epoch"):
            self.teacher.set_epoch(self.current_epoch)

    def _distilling(self) -> bool:
        return self.distill_epochs is None or self.current_epoch < self.distill_epochs

    def training_step(self, batch: tuple, batch_idx: int) -> Tensor:
        images, targets, indices = batch[:3]
        # The on-device data path adds each sample's augmentation key (teacher cache).
        aug_keys = batch[3] if len(batch) > 3 else None
        images = self._layout(images)
        if not self._distilling():
            prediction, outputs = self.task.student_forward(self.student, images, targets)
            self.student_tap.pop()
            out = StepOutputs(
                images, targets, indices, prediction, student_outputs=outputs, task=self.task
            )
            return self._step({self.task.task_term: out.task_loss()}, out, batch_idx)
        after_student = self.distiller.teacher_after_student and self.teacher is not None
        teacher_prediction, teacher_features = (
            (None, {}) if after_student else self._teacher_forward(images, indices, aug_keys)
        )
        prediction, outputs = self.distiller.student_forward(
            self.task, self.student, images, targets, indices=indices, teacher=self.teacher
        )
        teacher_is_tensor = isinstance(teacher_prediction, Tensor)
        out = StepOutputs(
            images=images,
            targets=targets,
            indices=indices,
            student_logits=prediction,
            teacher_logits=teacher_prediction if teacher_is_tensor else None,
            student_features=self.student_tap.pop(),
            teacher_features=teacher_features,
            epoch=self.current_epoch,
            student_outputs=outputs,
            teacher_outputs={} if teacher_is_tensor else {"predictions": teacher_prediction},
            task=self.task,
        )
        if after_student:
            # Without gradients but not in inference mode: the losses save these tensors.
            with torch.no_grad():
                out.teacher_outputs = self.distiller.teacher_pass(self.teacher, out)
                out.teacher_features = self.teacher_tap.pop()
        return self._step(self.distiller(out), out, batch_idx)

    def _step(self, terms: dict[str, Tensor], out: StepOutputs, batch_idx: int) -> Tensor:
        """Logs the step's terms and returns their sum; with an adversary (manual
        optimization) also steps the student's optimizer, then the adversary's."""
        loss = self._log_step(terms, out, batch_idx)
        if self.automatic_optimization:
            return loss
        student_optimizer, adversary_optimizer = self.optimizers()
        student_optimizer.zero_grad()
        self.manual_backward(loss)
        if self.student_gradient_clip is not None:
            value, algorithm = self.student_gradient_clip
            self.clip_gradients(
                student_optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm
            )
        student_optimizer.step()
        if self._distilling():
            # The adversary learns from the student's detached prediction: its loss reaches
            # only its own parameters, whatever gradients the student's step left on them.
            adversary_terms = self.distiller.adversary_terms(out)
            adversary_loss = torch.stack(list(adversary_terms.values())).sum()
            named = {f"adversary_{k}": v for k, v in adversary_terms.items()}
            self._stop_if_not_finite(adversary_loss, named, batch_idx)
            adversary_optimizer.zero_grad()
            self.manual_backward(adversary_loss)
            adversary_optimizer.step()
            self._log_epoch_means({k: v.detach() for k, v in named.items()}, out)
        return loss.detach()

    def _log_step(self, terms: dict[str, Tensor], out: StepOutputs, batch_idx: int) -> Tensor:
        loss = torch.stack(list(terms.values())).sum()
        self._stop_if_not_finite(loss, terms, batch_idx)
        batch_size = self.task.batch_size(out.images)
        self._log_epoch_means({f"loss_{name}": value for name, value in terms.items()}, out)
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        if self.train_metric is not None:
            self.train_metric(out.student_logits.detach(), out.targets)
            self.log(
                f"train/{self.task.monitor.name}",
                self.train_metric,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
            )
        return loss

    def _log_epoch_means(self, values: dict[str, Tensor], out: StepOutputs) -> None:
        """Logs each value as ``train/<name>``, its epoch mean over all processes under DDP
        (not rank 0's)."""
        batch_size = self.task.batch_size(out.images)
        for name, value in values.items():
            self.log(
                f"train/{name}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )

    def _stop_if_not_finite(self, loss: Tensor, terms: dict[str, Tensor], batch_idx: int) -> None:
        """Stops a diverged run at its first non-finite loss, before the optimizer applies it
        (the last checkpoint stays the last good one). Every process stops together."""
        bad = not bool(torch.isfinite(loss.detach()))
        trainer = self._trainer  # None when a test steps the module by hand
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        values = {name: float(value.detach()) for name, value in terms.items()}
        culprits = [name for name, value in values.items() if not math.isfinite(value)]
        raise FloatingPointError(
            f"the loss is not finite at epoch {self.current_epoch}, step {batch_idx} of the "
            f"epoch (global step {self.global_step}): term(s) "
            f"{', '.join(culprits) or '(another process)'} = "
            f"{', '.join(str(values[c]) for c in culprits)}. The run is stopped; its last "
            "checkpoint (checkpoints/last.ckpt) holds the last finished epoch. Lower optim.lr, "
            "check the data, or the distiller's weights"
        )

    def _evaluate(self, batch: tuple, stage: str) -> None:
        images, targets = self._layout(batch[0]), batch[1]
        prediction = self.task.predict(self.student, images)
        self.student_tap.pop()
        teacher_prediction, _ = self._teacher_forward(images)
        batch_size = self.task.batch_size(images)
        loss = self.task.eval_loss(prediction, targets)
        if loss is not None:
            self.log(
                f"{stage}/loss_{self.task.task_term}",
                loss,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )
        self._logged[stage] = self.task.update(
            self.eval_metrics[stage], prediction, teacher_prediction, targets
        )

    def _log_metrics(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        names = self._logged[stage]
        if not names:
            return
        # torchmetrics gathers each metric's state over all processes in compute().
        for name, value in self.task.compute(metrics, names).items():
            self.log(f"{stage}/{name}", value, prog_bar=name == self.task.monitor.name)
        metrics.reset()
        self._logged[stage] = []

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self):
        # The teacher is frozen and not a parameter owner here; distiller parts train, except
        # an adversary (a GAN discriminator), which has its own optimizer.
        adversary = self.distiller.adversary()
        adversarial = {id(p) for p in adversary.parameters()} if adversary is not None else set()
        params = [
            p
            for p in (*self.student.parameters(), *self.distiller.parameters())
            if p.requires_grad and id(p) not in adversarial
        ]
        optimizer = self.optimizer_factory(params)
        optimizers = [optimizer]
        if adversary is not None:
            optimizers.append(self.distiller.adversary_optimizer(adversary.parameters()))
        if self.scheduler_factory is None:
            return optimizers if len(optimizers) > 1 else optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}
        if len(optimizers) > 1:
            return optimizers, [scheduler]
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.student_pruned:
            # Read back by teachers.load_weights and build.shape_student, so every consumer
            # of the checkpoint (resume, init_from, teacher.ckpt, export) rebuilds this network.
            checkpoint[pruned_structure.STRUCTURE_KEY] = pruned_structure.record(self.student)
            if self.pruning_report is not None:
                checkpoint[PRUNING_REPORT_KEY] = self.pruning_report
        # Lightning does not store RNG states; without them a resumed run shuffles and
        # augments differently from an uninterrupted one.
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_safe(np.random.get_state()),
            "python": random.getstate(),
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        np.random.set_state(_numpy_state_from_safe(states["numpy"]))
        random.setstate(states["python"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
