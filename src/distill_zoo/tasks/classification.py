"""Image classification: one class per image."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from distill_zoo.losses import cross_entropy
from distill_zoo.tasks.base import Monitor, StepOutputs, Task, dry_forward


class ClassificationTask(Task):
    """Batches ``(images [B,C,H,W], class ids [B], indices [B])``; loss: cross-entropy.

    Metrics: student ``acc1``/``acc5`` (top-1/top-5 accuracy), ``teacher_acc1``, and
    ``agreement``, the fraction of samples where teacher and student agree on the top class.
    """

    name = "classification"
    task_term = "ce"
    monitor = Monitor("acc1", "max")
    summary_metrics = ("acc1", "acc5")
    teacher_metrics = ("acc1",)

    def check_model(self, model: nn.Module, example: Tensor, role: str) -> None:
        output = dry_forward(model, example)
        if not isinstance(output, Tensor) or output.shape != (len(example), self.num_classes):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"the {role} predicts {shape} for a batch of {len(example)}, but "
                f"task=classification needs [batch, {self.num_classes}] class logits: choose a "
                f"classification {role} (conf/{role}/, e.g. resnet20)"
            )

    def loss(self, out: StepOutputs, label_smoothing: float = 0.0) -> Tensor:
        return cross_entropy(out.student_logits, out.targets, label_smoothing)

    def metrics(self) -> MetricCollection:
        k = self.num_classes
        return MetricCollection(
            {
                "acc1": MulticlassAccuracy(k, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(k, top_k=min(5, k), average="micro"),
                "teacher_acc1": MulticlassAccuracy(k, top_k=1, average="micro"),
                "agreement": MeanMetric(),
            },
            compute_groups=False,
        )

    def update(
        self, metrics: MetricCollection, student: Tensor, teacher: Tensor | None, targets: Any
    ) -> list[str]:
        metrics["acc1"].update(student, targets)
        metrics["acc5"].update(student, targets)
        if teacher is None:
            return ["acc1", "acc5"]
        metrics["teacher_acc1"].update(teacher, targets)
        metrics["agreement"].update((student.argmax(1) == teacher.argmax(1)).float())
        return ["acc1", "acc5", "teacher_acc1", "agreement"]

    def eval_loss(self, student: Tensor, targets: Tensor) -> Tensor:
        return cross_entropy(student, targets)

    def train_metric(self) -> Metric:
        return MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
