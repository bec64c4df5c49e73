"""Semantic segmentation: a class per pixel."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from distill_zoo.tasks.base import Monitor, StepOutputs, Task, as_tensor_prediction, dry_forward


class SegmentationTask(Task):
    """Batches ``(images [B,C,H,W], masks [B,H,W], indices [B])``; masks hold class ids
    ``0..K-1`` or ``ignore_index``. Loss: per-pixel cross-entropy over the labelled pixels.

    Metrics: ``miou`` (mean intersection over union over the K classes, from the confusion
    matrix of the whole split), ``pixel_acc`` (fraction of labelled pixels right), the
    teacher's ``teacher_miou``/``teacher_pixel_acc``, and ``agreement``: the fraction of
    labelled pixels where teacher and student predict the same class.

    Logit methods read one row of K logits per pixel (:meth:`logit_rows`), so ``kd`` is the
    pixel-wise term of structured KD (Liu et al., CVPR 2019): the per-pixel KL averaged over
    pixels, T^2-scaled.

    Args:
        ignore_index: Mask value of unlabelled pixels (VOC's object borders, Cityscapes' void).
    """

    name = "segmentation"
    task_term = "ce"
    monitor = Monitor("miou", "max")
    summary_metrics = ("miou", "pixel_acc")
    teacher_metrics = ("miou", "pixel_acc")

    def __init__(self, num_classes: int = 0, ignore_index: int = 255) -> None:
        super().__init__(num_classes)
        self.ignore_index = ignore_index

    def check_model(self, model: nn.Module, example: Tensor, role: str) -> None:
        output = as_tensor_prediction(dry_forward(model, example))
        wanted = (len(example), self.num_classes, *example.shape[-2:])
        if output.dim() != 4 or tuple(output.shape) != wanted:
            raise ValueError(
                f"the {role} predicts {tuple(output.shape)} for input {tuple(example.shape)}, "
                f"but task=segmentation needs per-pixel logits {wanted} (batch, classes, H, W): "
                f"choose a segmentation {role} (conf/{role}/seg_*.yaml)"
            )

    def check_batch(self, batch: Any) -> None:
        masks = batch[1]
        labelled = masks[masks != self.ignore_index]
        if not labelled.numel():
            return
        low, high = int(labelled.min()), int(labelled.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"a mask holds class {high if high >= self.num_classes else low}, outside "
                f"0..{self.num_classes - 1} of the data's {self.num_classes} classes and not "
                f"the ignore index {self.ignore_index}: fix the data's num_classes or its masks"
            )

    def student_forward(self, model: nn.Module, inputs: Tensor, targets: Any):
        return as_tensor_prediction(model(inputs)), {}

    def predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        return as_tensor_prediction(model(inputs))

    def loss(self, out: StepOutputs, label_smoothing: float = 0.0) -> Tensor:
        return F.cross_entropy(
            out.student_logits.float(),
            out.targets,
            ignore_index=self.ignore_index,
            label_smoothing=label_smoothing,
        )

    def logit_rows(self, logits: Tensor) -> Tensor:
        return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])

    def row_targets(self, targets: Tensor) -> Tensor:
        return targets.reshape(-1)

    def metrics(self) -> MetricCollection:
        k, ignore = self.num_classes, self.ignore_index
        return MetricCollection(
            {
                "miou": MulticlassJaccardIndex(k, ignore_index=ignore),
                "pixel_acc": MulticlassAccuracy(k, average="micro", ignore_index=ignore),
                "teacher_miou": MulticlassJaccardIndex(k, ignore_index=ignore),
                "teacher_pixel_acc": MulticlassAccuracy(k, average="micro", ignore_index=ignore),
                "agreement": MeanMetric(),
            },
            compute_groups=False,
        )

    def update(
        self, metrics: MetricCollection, student: Tensor, teacher: Tensor | None, targets: Tensor
    ) -> list[str]:
        predicted = student.argmax(1)
        metrics["miou"].update(predicted, targets)
        metrics["pixel_acc"].update(predicted, targets)
        if teacher is None:
            return ["miou", "pixel_acc"]
        teacher_predicted = teacher.argmax(1)
        metrics["teacher_miou"].update(teacher_predicted, targets)
        metrics["teacher_pixel_acc"].update(teacher_predicted, targets)
        labelled = targets != self.ignore_index
        metrics["agreement"].update((predicted == teacher_predicted)[labelled].float())
        return ["miou", "pixel_acc", "teacher_miou", "teacher_pixel_acc", "agreement"]

    def eval_loss(self, student: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(student.float(), targets, ignore_index=self.ignore_index)
