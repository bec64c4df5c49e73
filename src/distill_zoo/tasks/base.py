"""What a task is: the one place that knows what a prediction is (see the README's
"Architecture" section).

A :class:`Task` owns what a batch holds, how a model's output becomes a prediction, the task
loss, the evaluation metrics of student and teacher, what teacher-student agreement means, and
the :class:`StepOutputs` handed to distillers. :class:`~distill_zoo.module.DistillationModule`
asks its task and assumes none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from distill_zoo.losses import cross_entropy

TASKS = ("classification", "segmentation", "detection", "regression", "language_modeling")


@dataclass
class StepOutputs:
    """Everything one training step produced that a distiller may read.

    ``student_logits``/``teacher_logits`` are the task's main prediction (``[B,K]`` class
    logits, ``[B,K,H,W]`` per-pixel logits, ``[B,D]`` regression outputs; ``None`` for a
    detector in training, whose outputs are losses). ``student_outputs``/``teacher_outputs``
    hold anything else the task exposes (a detector's ``losses``). ``student_features`` and
    ``teacher_features`` hold the outputs of the layers the distiller asked for in
    :meth:`~distill_zoo.distillers.base.Distiller.layers`, keyed by layer name.

    ``task_loss(**options)`` is the task's supervised loss of the student (cross-entropy with
    the labels by default, so a StepOutputs made by hand is a classification step).
    """

    images: Tensor
    targets: Any
    indices: Tensor
    student_logits: Tensor | None
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    epoch: int = 0
    student_outputs: dict[str, Any] = field(default_factory=dict)
    teacher_outputs: dict[str, Any] = field(default_factory=dict)
    task: Task | None = None

    @property
    def task_term(self) -> str:
        """The name of the task loss among the loss terms (``ce`` for classification)."""
        return "ce" if self.task is None else self.task.task_term

    def task_loss(self, **options: Any) -> Tensor:
        """The task loss of the student (``label_smoothing`` where the task has labels)."""
        if self.task is not None:
            return self.task.loss(self, **options)
        return cross_entropy(self.student_logits, self.targets, options.get("label_smoothing", 0))

    def logit_rows(self) -> tuple[Tensor, Tensor | None]:
        """Student and teacher predictions as rows ``[N, K]``: one per sample, or one per
        pixel for segmentation (what logit methods compare)."""
        if self.task is None:
            return self.student_logits, self.teacher_logits
        rows = self.task.logit_rows
        teacher = self.teacher_logits
        return rows(self.student_logits), None if teacher is None else rows(teacher)

    def row_targets(self) -> Tensor:
        """The targets of :meth:`logit_rows`' rows."""
        return self.targets if self.task is None else self.task.row_targets(self.targets)


@dataclass(frozen=True)
class Monitor:
    """The validation metric that picks the best checkpoint: ``val/<name>``, ``mode``."""

    name: str
    mode: str  # "max" or "min"

    @property
    def key(self) -> str:
        return f"val/{self.name}"


class Task:
    """Base class of the four tasks; subclasses fill in every method.

    Attributes:
        name: The task's name (``task=<name>`` on the command line).
        task_term: Name of the task loss among the logged loss terms (``train/loss_<term>``).
        monitor: The metric that selects the best checkpoint.
        summary_metrics: Metrics reported in ``metrics.json`` as ``test_<name>_{best,last}``.
        teacher_metrics: Of those, the ones also reported for the teacher.
    """

    name: str = ""
    task_term: str = "ce"
    monitor: Monitor = Monitor("acc1", "max")
    summary_metrics: tuple[str, ...] = ()
    teacher_metrics: tuple[str, ...] = ()

    def __init__(self, num_classes: int = 0) -> None:
        self.num_classes = num_classes

    def setup(self, datamodule: Any) -> None:
        """Takes what the task needs from the set-up ``datamodule`` (its class count, ...)."""
        self.check_data(datamodule)
        self.num_classes = int(datamodule.num_classes)

    # --- checks -------------------------------------------------------------------------------

    def check_data(self, datamodule: Any) -> None:
        """Fails naming the mismatch when ``datamodule`` serves another task."""
        served = getattr(datamodule, "task", "classification")
        if served != self.name:
            raise ValueError(
                f"data {type(datamodule).__name__} serves task={served}, but task={self.name} "
                f"was chosen: pick data made for {self.name} (see conf/data/) or task={served}"
            )

    def check_model(self, model: nn.Module, example: Tensor, role: str) -> None:
        """Fails naming the mismatch when ``model`` does not predict what this task needs
        (one dry forward pass on ``example`` in eval mode, no gradients)."""

    def check_batch(self, batch: Any) -> None:
        """Fails naming the problem when a batch does not hold what this task needs (a mask
        class beyond ``num_classes``, a box outside its image)."""

    # --- forward ------------------------------------------------------------------------------

    def student_forward(self, model: nn.Module, inputs: Tensor, targets: Any) -> tuple[Any, dict]:
        """The student's prediction in a training step, and any other outputs (``{}``)."""
        return model(inputs), {}

    def predict(self, model: nn.Module, inputs: Tensor) -> Any:
        """A model's prediction outside training (evaluation, the teacher)."""
        return model(inputs)

    def loss(self, out: StepOutputs, **options: Any) -> Tensor:
        """The supervised loss of the student in ``out``."""
        raise NotImplementedError

    def logit_rows(self, logits: Tensor) -> Tensor:
        """The prediction as rows of class logits ``[N, K]`` for logit methods (one row per
        sample; per pixel for segmentation)."""
        return logits

    def row_targets(self, targets: Tensor) -> Tensor:
        """The targets matching :meth:`logit_rows`' rows."""
        return targets

    # --- evaluation ---------------------------------------------------------------------------

    def metrics(self) -> MetricCollection:
        """Fresh evaluation metrics of one stage (student, teacher, agreement), unprefixed."""
        raise NotImplementedError

    def update(
        self, metrics: MetricCollection, student: Any, teacher: Any | None, targets: Any
    ) -> list[str]:
        """Updates ``metrics`` with one batch; returns the names of the metrics to log."""
        raise NotImplementedError

    def compute(self, metrics: MetricCollection, names: list[str]) -> dict[str, Tensor]:
        """The values of the metrics ``names`` over all batches (and all processes)."""
        return {name: metrics[name].compute() for name in names}

    def eval_loss(self, student: Any, targets: Any) -> Tensor | None:
        """The task loss of an evaluation batch (``val/loss_<term>``), where defined."""
        return None

    def train_metric(self) -> Metric | None:
        """A metric logged on training batches (``train/<name>``), or ``None``."""
        return None

    def batch_size(self, inputs: Tensor) -> int:
        return int(inputs.shape[0])

    def write_samples(
        self, run_dir: Any, student: nn.Module, teacher: nn.Module | None, datamodule: Any
    ) -> dict | None:
        """Writes examples of the finished run's predictions into ``run_dir`` (a language
        model's generations) and returns them; nothing by default."""
        return None


def as_tensor_prediction(output: Any) -> Tensor:
    """A model's tensor output, or the ``"out"`` entry of torchvision's segmentation dicts."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("out"), Tensor):
        return output["out"]
    raise TypeError(f"expected a tensor prediction, got {type(output).__name__}")


def dry_forward(model: nn.Module, example: Tensor, call: Callable | None = None) -> Any:
    """``model(example)`` (or ``call(model, example)``) in eval mode without gradients,
    leaving the model's mode as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(example) if call is None else call(model, example)
    finally:
        model.train(was_training)
