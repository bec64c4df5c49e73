"""Object detection: boxes and their classes, with torchvision's detectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.detection import MeanAveragePrecision

from distill_zoo.tasks.base import Monitor, StepOutputs, Task, dry_forward

MAP_KEYS = {"map": "map", "map_50": "map_50", "map_75": "map_75"}
"""Our metric names -> the keys of torchmetrics' MeanAveragePrecision result."""


class DetectionTask(Task):
    """Batches ``(images [B,3,H,W] in [0,1], targets, indices [B])``; ``targets`` is a list of
    ``{"boxes": [N,4] xyxy pixels, "labels": [N] in 1..K-1}`` as torchvision's detectors take
    them (class 0 is the background). The detector computes its own losses in training (RPN
    and box-head classification and regression for Faster R-CNN; focal and box losses for
    RetinaNet); their sum is the task term ``det``.

    Metrics (torchmetrics' ``MeanAveragePrecision``, COCO protocol): ``map`` (mAP over IoU
    0.5:0.95), ``map_50``, ``map_75``, the teacher's ``teacher_map*``, and ``agreement``: the
    mAP@50 of the student's detections scored against the teacher's detections of score
    >= ``agreement_score`` taken as ground truth.

    A detector in training returns losses, not predictions, so ``StepOutputs.student_logits``
    is ``None``; its losses are in ``student_outputs["losses"]``. Feature methods read its
    backbone and FPN layers by name.

    Args:
        agreement_score: Score above which a teacher detection counts as a box to agree with.
    """

    name = "detection"
    task_term = "det"
    monitor = Monitor("map", "max")
    summary_metrics = ("map", "map_50", "map_75")
    teacher_metrics = ("map", "map_50", "map_75")

    def __init__(self, num_classes: int = 0, agreement_score: float = 0.5) -> None:
        super().__init__(num_classes)
        self.agreement_score = agreement_score

    def check_model(self, model: nn.Module, example: Tensor, role: str) -> None:
        output = dry_forward(model, list(example))
        if not (isinstance(output, list) and output and isinstance(output[0], dict)):
            raise ValueError(
                f"the {role} returns {type(output).__name__} in eval mode, but task=detection "
                "needs a torchvision-style detector (a list of {boxes, scores, labels} per "
                f"image): choose a detection {role} (conf/{role}/det_*.yaml)"
            )
        classes = _class_count(model)
        if classes is not None and classes != self.num_classes:
            raise ValueError(
                f"the {role} detects {classes} classes (with background), but the data has "
                f"{self.num_classes}: build it with the data's num_classes"
            )

    def check_batch(self, batch: Any) -> None:
        images, targets = batch[0], batch[1]
        height, width = images.shape[-2:]
        for i, target in enumerate(targets):
            boxes, labels = target["boxes"], target["labels"]
            if len(boxes) == 0:
                continue  # an image without objects is a valid negative
            bad = (boxes[:, 0] < 0) | (boxes[:, 1] < 0)
            bad |= (boxes[:, 2] > width) | (boxes[:, 3] > height)
            bad |= (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if bool(bad.any()):
                raise ValueError(
                    f"image {i} of a batch has a box {boxes[bad][0].tolist()} outside "
                    f"its {width}x{height} image or of no area: boxes are xyxy pixels inside "
                    "the image"
                )
            if int(labels.min()) < 1 or int(labels.max()) >= self.num_classes:
                raise ValueError(
                    f"image {i} of a batch has box labels {labels.tolist()}, outside "
                    f"1..{self.num_classes - 1} (0 is the background)"
                )

    def student_forward(self, model: nn.Module, inputs: Tensor, targets: Any):
        losses = model(list(inputs), targets)
        return None, {"losses": losses}

    def predict(self, model: nn.Module, inputs: Tensor) -> list[dict[str, Tensor]]:
        return model(list(inputs))

    def loss(self, out: StepOutputs, label_smoothing: float = 0.0) -> Tensor:
        if label_smoothing:
            raise ValueError("label_smoothing has no meaning for task=detection")
        return torch.stack([v.float() for v in out.student_outputs["losses"].values()]).sum()

    def logit_rows(self, logits: Tensor) -> Tensor:
        raise ValueError("a detector in training gives no logits: logit methods do not fit")

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "student": MeanAveragePrecision(box_format="xyxy", iou_type="bbox"),
                "teacher": MeanAveragePrecision(box_format="xyxy", iou_type="bbox"),
                "agreement": MeanAveragePrecision(
                    box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5]
                ),
            },
            compute_groups=False,
        )

    def update(
        self, metrics: MetricCollection, student: list, teacher: list | None, targets: list
    ) -> list[str]:
        metrics["student"].update(student, targets)
        if teacher is None:
            return list(MAP_KEYS)
        metrics["teacher"].update(teacher, targets)
        confident = [
            {"boxes": t["boxes"][keep], "labels": t["labels"][keep]}
            for t in teacher
            for keep in [t["scores"] >= self.agreement_score]
        ]
        metrics["agreement"].update(student, confident)
        return [*MAP_KEYS, *(f"teacher_{k}" for k in MAP_KEYS), "agreement"]

    def compute(self, metrics: MetricCollection, names: list[str]) -> dict[str, Tensor]:
        results = {
            part: metrics[part].compute()
            for part in ("student", "teacher", "agreement")
            if metrics[part].update_called
        }
        values = {}
        for name in names:
            if name == "agreement":
                values[name] = results["agreement"]["map"]
            elif name.startswith("teacher_"):
                values[name] = results["teacher"][MAP_KEYS[name.removeprefix("teacher_")]]
            else:
                values[name] = results["student"][MAP_KEYS[name]]
        # torchmetrics gives -1 where there is nothing to score (no ground-truth boxes; no
        # confident teacher box to agree with): undefined, not a score.
        return {k: torch.where(v < 0, torch.nan, v.float()) for k, v in values.items()}


def _class_count(model: nn.Module) -> int | None:
    """The class count (with background) of a torchvision Faster R-CNN or RetinaNet/FCOS."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None and hasattr(predictor, "cls_score"):
        return predictor.cls_score.out_features
    head = getattr(getattr(model, "head", None), "classification_head", None)
    return getattr(head, "num_classes", None)
