"""Chen et al.'s detection KD: soft RPN and box-head classes, teacher-bounded boxes, hints."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.feature_pairs import FeaturePairs
from distill_zoo.distillers.layers import LayerChoice
from distill_zoo.losses import (
    bounded_regression_loss,
    hint_loss,
    weighted_soft_bce,
    weighted_soft_ce,
)
from distill_zoo.models.rcnn_internals import (
    RCNNTrainPass,
    TeacherHeads,
    check_same_regions,
    rcnn_teacher_heads,
    rcnn_train_pass,
)

HARD_CLASSIFICATION = {"rpn": "loss_objectness", "box_head": "loss_classifier"}
"""The detector's hard classification loss of each head (what ``mu`` weighs)."""


def adaptation_layer(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """Chen et al.'s adaptation layer: a 1x1 conv from a student level's channels to the
    teacher's, kept even where they agree (the paper finds it helps); the maps must be of one
    size (levels of the same stride)."""
    if tuple(student_shape[2:]) != tuple(teacher_shape[2:]):
        raise ValueError(
            f"hints compare maps of one size, but they are {tuple(student_shape[2:])} and "
            f"{tuple(teacher_shape[2:])}: pair levels of the same stride"
        )
    return nn.Conv2d(student_shape[1], teacher_shape[1], 1)


class DetectionKD(Distiller):
    """Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation"
    (NeurIPS 2017), https://papers.nips.cc/paper/6676. For a Faster R-CNN student and teacher:

    - classification, for the RPN (objectness, one sigmoid logit per anchor) and the box head
      (K classes per proposal): ``mu * hard CE + (1 - mu) * weighted soft CE`` against the
      teacher's probabilities at ``temperature``, the background weighted
      ``background_weight`` = 1.5 and the other classes 1, for the class imbalance (paper,
      Sec. 3.2; :func:`~distill_zoo.losses.weighted_soft_ce`, ``weighted_soft_bce``); on the
      anchors / proposals the detector samples for its own loss;
    - regression: the detector's Smooth-L1 plus ``nu`` times the teacher-bounded L2 on the
      positive anchors / proposals (box-head: the ground-truth class's deltas): the student's
      squared error counts only where it is not below the teacher's by ``margin``
      (:func:`~distill_zoo.losses.bounded_regression_loss`), summed over the positives and
      divided by all sampled anchors / proposals, as the detector's own Smooth-L1 is;
    - hints: a 1x1 conv adaptation layer (the paper's choice, kept even where channels agree)
      maps each student level onto the teacher's, L2 (mean squared error), ``hint_weight``
      (the paper's gamma = 0.5) times the sum over levels (every FPN level by default).

    Both detectors classify the same regions: the teacher's RPN head runs on the student's
    anchors (checked equal: same anchor sizes, aspect ratios and feature strides) and its box
    head on the student's sampled proposals
    (:func:`~distill_zoo.models.rcnn_internals.rcnn_teacher_heads`).

    From the paper: background weight 1.5, hint weight 0.5, the RPN and box head weighted
    alike. Ours, where the paper gives no value: ``mu = 0.5`` (hard and soft classification
    weighted alike), ``nu = 0.5`` (the bound is an extra, not a replacement, for Smooth-L1),
    ``margin = 0`` (the student is pushed only while it is worse than the teacher; box deltas
    are normalised by the box coder's weights, so a margin has no natural unit) and
    ``temperature = 1`` (a detector's background/object probabilities are already soft where
    they matter; higher temperatures flatten the 1.5 background weight's effect).

    Each part is switchable: ``mu = 1`` (no soft classification), ``nu = 0`` (no bound),
    ``hint_weight = 0`` (no hints), ``heads`` (the heads distilled: ``[rpn, box_head]``).
    With ``mu = 1`` and ``nu = 0`` only hints remain and the teacher runs its backbone alone.

    Args:
        mu: Share of the hard classification loss; ``1 - mu`` goes to the soft one.
        temperature: Softmax/sigmoid temperature of the teacher's and student's scores.
        background_weight: Weight of the background class in the soft loss.
        nu: Weight of the teacher-bounded regression term.
        margin: Margin ``m`` of the bound.
        hint_weight: Weight of the hint term (per level, summed).
        heads: Heads whose classification and regression are distilled.
        student_layers: Hint levels of the student (stage indices, "all", names); ``None``:
            every level of ``feature_layers``.
        teacher_layers: Hint levels of the teacher.
        ce_weight: Weight of the detector's own (mu-weighted) losses.
        kd_weight: Must be 0.
        kd_temperature: Unused.
    """

    tasks = ("detection",)
    teacher_after_student = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        mu: float = 0.5,
        temperature: float = 1.0,
        background_weight: float = 1.5,
        nu: float = 0.5,
        margin: float = 0.0,
        hint_weight: float = 0.5,
        heads: list[str] | tuple[str, ...] = ("rpn", "box_head"),
        student_layers: LayerChoice = None,
        teacher_layers: LayerChoice = None,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            kd_temperature=kd_temperature,
        )
        if not 0 <= mu <= 1:
            raise ValueError(f"det_kd's mu (share of the hard loss) must be in [0, 1], got {mu}")
        if temperature <= 0 or nu < 0 or hint_weight < 0 or background_weight < 0:
            raise ValueError(
                "det_kd needs temperature > 0 and nu, hint_weight, background_weight >= 0, got "
                f"{temperature}, {nu}, {hint_weight}, {background_weight}"
            )
        unknown = set(heads) - set(HARD_CLASSIFICATION)
        if unknown:
            raise ValueError(
                f"det_kd's heads {sorted(unknown)} are unknown: choose among "
                f"{list(HARD_CLASSIFICATION)}"
            )
        self.mu, self.temperature, self.background_weight = mu, temperature, background_weight
        self.nu, self.margin, self.hint_weight = nu, margin, hint_weight
        self.heads = tuple(heads) if (mu < 1 or nu > 0) else ()
        if self.heads:
            if self.context.example_input is None:
                raise ValueError("det_kd needs context.example_input to check the detectors")
            check_same_regions(student, teacher, self.context.example_input)
        self.hints = None
        if hint_weight:
            self.hints = FeaturePairs(
                student,
                teacher,
                self.context,
                student_layers,
                teacher_layers,
                "det_kd",
                connector=adaptation_layer,
            )
            self.student_layers = self.hints.student_layers
            self.teacher_layers = self.hints.teacher_layers

    def student_forward(
        self, task: Any, student: nn.Module, images: Tensor, targets: Any, **_: Any
    ):
        if not self.heads:
            return task.student_forward(student, images, targets)
        rcnn = rcnn_train_pass(student, images, targets)
        return None, {"losses": rcnn.losses, "rcnn": rcnn}

    def teacher_pass(self, teacher: nn.Module, out: StepOutputs) -> dict[str, Any]:
        rcnn = out.student_outputs.get("rcnn")
        if rcnn is None:
            # Hints only: the teacher's backbone (its FPN levels are tapped), no heads.
            images, _ = teacher.transform(list(out.images))
            teacher.backbone(images.tensors)
            return {}
        return {"heads": rcnn_teacher_heads(teacher, out.images, rcnn)}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = {}
        if self.ce_weight:
            losses = dict(out.student_outputs["losses"])
            for head in self.heads:
                losses[HARD_CLASSIFICATION[head]] = self.mu * losses[HARD_CLASSIFICATION[head]]
            terms[out.task_term] = self.ce_weight * torch.stack(list(losses.values())).sum()
        if self.heads:
            rcnn: RCNNTrainPass = out.student_outputs["rcnn"]
            teacher: TeacherHeads = out.teacher_outputs["heads"]
            if "rpn" in self.heads:
                terms.update(self._rpn_terms(rcnn, teacher))
            if "box_head" in self.heads:
                terms.update(self._box_head_terms(rcnn, teacher))
        if self.hint_weight:
            hints = [hint_loss(s, t) for s, t in self.hints(out)]
            terms["hint"] = self.hint_weight * torch.stack(hints).sum()
        return terms

    def _rpn_terms(self, rcnn: RCNNTrainPass, teacher: TeacherHeads) -> dict[str, Tensor]:
        rpn = rcnn.rpn
        sampled = torch.cat([rpn.sampled_positive, rpn.sampled_negative])
        positive = rpn.sampled_positive
        terms = {}
        if self.mu < 1:
            soft = weighted_soft_bce(
                rpn.objectness[sampled],
                teacher.objectness[sampled],
                self.temperature,
                self.background_weight,
            )
            terms["soft_rpn"] = (1 - self.mu) * soft
        if self.nu:
            bounded = bounded_regression_loss(
                rpn.deltas[positive],
                teacher.deltas[positive],
                rpn.regression_targets[positive],
                self.margin,
            )
            share = len(positive) / max(len(sampled), 1)
            terms["bounded_rpn"] = self.nu * share * bounded
        return terms

    def _box_head_terms(self, rcnn: RCNNTrainPass, teacher: TeacherHeads) -> dict[str, Tensor]:
        head = rcnn.box_head
        terms = {}
        if self.mu < 1:
            soft = weighted_soft_ce(
                head.class_logits, teacher.class_logits, self.temperature, self.background_weight
            )
            terms["soft_box_head"] = (1 - self.mu) * soft
        if self.nu:
            positive = torch.where(head.labels > 0)[0]
            classes = head.labels[positive]
            rows = len(head.labels)
            student = head.box_regression.reshape(rows, -1, 4)[positive, classes]
            teacher_boxes = teacher.box_regression.reshape(rows, -1, 4)[positive, classes]
            bounded = bounded_regression_loss(
                student, teacher_boxes, head.regression_targets[positive], self.margin
            )
            share = len(positive) / max(rows, 1)
            terms["bounded_box_head"] = self.nu * share * bounded
        return terms
