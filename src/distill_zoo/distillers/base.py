"""The distiller interface every method implements (see ../shared/DESIGN.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill_zoo.distillers.context import DistillContext
from distill_zoo.distillers.layers import embedding
from distill_zoo.distillers.taps import probe_shapes, select_layers  # noqa: F401  (re-exported)
from distill_zoo.losses import kd_loss, mse_to_teacher
from distill_zoo.tasks.base import TASKS, StepOutputs

ALL_TASKS: tuple[str, ...] = tuple(task for task in TASKS if task != "language_modeling")
"""What a method serves that reads only tapped features and the task loss: every task whose
models give one feature map or vector per sample. A language model's features are per token
(``[B, L, D]``): the methods that serve it name it (FitNets' hidden-state hints, the token
divergences)."""


class Distiller(nn.Module):
    """Base class: turns one step's outputs into named, already-weighted loss terms.

    Subclasses cite their paper in the class docstring, take their hyper-parameters as typed
    keyword arguments, build trainable parts (regressors, embeddings) in ``__init__`` and keep
    restart-critical state in registered buffers. They never keep the student or the teacher
    as attributes: those belong to the LightningModule, and registering them here would put
    the teacher into the optimizer.

    Args:
        student: The student network (read for shapes only).
        teacher: The frozen teacher, or ``None``.
        context: Facts about the run (stages, an example batch, data set sizes).
        ce_weight: Weight of the cross-entropy with the hard labels (``g`` in the CRD
            benchmark's ``g*CE + a*KD + b*method``).
        kd_weight: Weight ``a`` of Hinton's logit KD term added to any method (0: none).
        kd_temperature: Temperature of that KD term.
    """

    requires_teacher: bool = True
    tasks: tuple[str, ...] = ("classification",)
    """The tasks this method serves (``task=<name>``); building it for another one fails."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
    ) -> None:
        super().__init__()
        if self.requires_teacher and teacher is None:
            raise ValueError(
                f"{type(self).__name__} needs a teacher, but teacher=none was chosen: pick one, "
                "e.g. teacher=resnet56 (add teacher.ckpt=<file> to use trained weights)"
            )
        if kd_temperature <= 0:
            raise ValueError(f"the KD temperature must be > 0, got {kd_temperature}")
        self.context = context or DistillContext()
        task = self.context.task
        if task not in self.tasks:
            raise ValueError(
                f"{type(self).__name__} does not serve task={task}: it serves "
                f"{', '.join(self.tasks)}. Pick a distiller made for {task} (see the README's "
                "distiller table) or another task"
            )
        if kd_weight and task == "detection":
            raise ValueError(
                f"{type(self).__name__}: kd_weight={kd_weight} adds logit KD, which has no "
                "meaning for a detector in training: set kd_weight=0 for task=detection"
            )
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature

    student_layers: Sequence[str] = ()
    teacher_layers: Sequence[str] = ()

    @property
    def soft_temperature(self) -> float:
        """The temperature at which this method softens the teacher's logits (an ensemble
        teacher averages its members' predictions at it); methods with their own temperature
        override this."""
        return self.kd_temperature

    def layers(self) -> tuple[list[str], list[str]]:
        """Names of the (student, teacher) layers whose outputs :meth:`forward` reads: by
        default the ``student_layers``/``teacher_layers`` a subclass sets in ``__init__``."""
        return list(self.student_layers), list(self.teacher_layers)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        """Named loss terms, each already multiplied by its weight; the module sums them."""
        raise NotImplementedError

    def paired_features(
        self, out: StepOutputs, pooled: bool = False
    ) -> list[tuple[Tensor, Tensor]]:
        """``(student, teacher)`` features of each paired layer of ``student_layers`` and
        ``teacher_layers``; ``pooled``: each as one vector per sample
        (:func:`~distill_zoo.distillers.layers.embedding`)."""
        pairs = [
            (out.student_features[s], out.teacher_features[t])
            for s, t in zip(self.student_layers, self.teacher_layers, strict=True)
        ]
        if pooled:
            pairs = [(embedding(s), embedding(t)) for s, t in pairs]
        return pairs

    def trains_only_part(self) -> bool:
        """Whether some trainable parameters get no gradient in this distiller's steps (an
        init stage that trains hints alone); DDP must then look for unused parameters."""
        return False

    # --- hooks for methods that change how a step runs ---------------------------------------

    def student_forward(
        self,
        task: Any,
        student: nn.Module,
        images: Tensor,
        targets: Any,
        *,
        indices: Tensor | None = None,
        teacher: nn.Module | None = None,
    ):
        """The student's prediction and other outputs in a training step: the task's forward
        by default; a method that reads a model's internals (Chen et al.'s RPN and box-head
        outputs) runs its own pass and returns them in the outputs mapping. A method whose
        student learns from other inputs than the batch's (sequences the student or the
        teacher generates) makes them here: ``indices`` are the batch's dataset positions,
        ``teacher`` the frozen teacher (run it without gradients)."""
        return task.student_forward(student, images, targets)

    teacher_after_student: bool = False
    """``True`` where the teacher must see what the student produced (Chen et al.: the
    teacher's box head classifies the student's proposals): the module then skips its usual
    teacher pass and calls :meth:`teacher_pass` after the student's forward."""

    def teacher_pass(self, teacher: nn.Module, out: StepOutputs) -> dict[str, Any]:
        """The teacher's outputs for this step, given the student's (``out``); the module runs
        it without gradients and puts the result in ``out.teacher_outputs``. Only called when
        :attr:`teacher_after_student` is set."""
        raise NotImplementedError

    def runs_alone_because(self) -> str | None:
        """Why this method cannot share a step with others in ``distiller=combo`` (it trains
        the student on other inputs than the batch's, or skips the teacher), or ``None``."""
        return None

    def adversary(self) -> nn.Module | None:
        """A part trained AGAINST the student (a GAN discriminator), or ``None``. It is kept
        out of the student's optimizer: the module gives it :meth:`adversary_optimizer` and
        steps it after each student step on :meth:`adversary_terms` (Lightning's manual
        optimization); both optimizers are saved with the run."""
        return None

    def adversary_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The adversary's own optimizer over ``params``."""
        raise NotImplementedError

    def adversary_terms(self, out: StepOutputs) -> dict[str, Tensor]:
        """The adversary's weighted loss terms for one step (what its optimizer minimises),
        logged as ``train/adversary_<name>``; they must not reach the student's gradients."""
        raise NotImplementedError

    def monitored(self) -> dict[str, Tensor]:
        """Values worth watching that are not loss terms (a learned temperature); the module
        logs each as ``train/<name>`` once per epoch. None by default."""
        return {}

    def before_training(self, trainer: Any, teacher: Callable[[Tensor], Any]) -> None:
        """Called by the module once when training starts: after a resumed run's checkpoint
        is restored, before the first step, on every process. For state computed once from
        the whole training set (attentive imitation's per-sample teacher errors). Nothing by
        default.

        Args:
            trainer: The running Lightning ``Trainer`` (its ``datamodule``, ``strategy``,
                ``ckpt_path``: set when the run resumes a checkpoint).
            teacher: ``teacher(inputs)``: the frozen teacher's prediction for a batch, as
                the training step runs it (eval mode, no gradients, taps emptied).
        """

    def ce_term(self, out: StepOutputs) -> dict[str, Tensor]:
        """The weighted task-loss term (the hard-label cross-entropy of classification and
        segmentation, the task's ``task_term`` elsewhere), omitted when its weight is 0."""
        if self.ce_weight == 0:
            return {}
        return {out.task_term: self.ce_weight * out.task_loss()}

    def soft_term(self, out: StepOutputs, temperature: float) -> Tensor:
        """Hinton's KD between the task's logit rows (per sample; per pixel for
        segmentation); output matching (MSE to the teacher) for regression."""
        student, teacher = out.logit_rows()
        if self.context.task == "regression":
            return mse_to_teacher(student, teacher)
        return kd_loss(student, teacher, temperature)

    def logit_terms(self, out: StepOutputs) -> dict[str, Tensor]:
        """``ce`` and, when ``kd_weight > 0``, Hinton's ``kd`` term: what every method adds
        its own term to (``loss = g*CE + a*KD + b*method``)."""
        terms = self.ce_term(out)
        if self.kd_weight:
            terms["kd"] = self.kd_weight * self.soft_term(out, self.kd_temperature)
        return terms
