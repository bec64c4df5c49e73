"""PKD: feature imitation through the Pearson correlation of standardised FPN levels."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.feature_pairs import FeaturePairs
from distill_zoo.distillers.layers import LayerChoice
from distill_zoo.losses import pkd_loss


class PKD(Distiller):
    """Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient" (NeurIPS 2022), https://arxiv.org/abs/2207.02039. Each FPN level
    of student and teacher is standardised per channel (zero mean, unit variance over batch
    and positions), and the MSE of the two, halved, is taken: ``1 - r`` with ``r`` the Pearson
    correlation (:func:`~distill_zoo.losses.pkd_loss`). Standardising removes the magnitude
    gap between heterogeneous detectors (a RetinaNet teacher for a Faster R-CNN student).

    ``loss = ce_weight * det + weight * sum over levels pkd(s_l, t_l)``; weight 6 per level as
    published (their RetinaNet/Faster R-CNN configs), every FPN level of ``feature_layers`` by
    default. Where a student level's channels differ from the teacher's, a 1x1 conv + BN
    connector maps them (ours: the paper pairs FPNs of equal width).

    Args:
        weight: Weight of each level's term.
        student_layers: Student levels (stage indices, ``"all"``, names); ``None``: all.
        teacher_layers: Teacher levels, in the same forms.
        ce_weight: Weight of the detector's own losses.
        kd_weight: Must be 0 (logit KD has no meaning for a detector in training).
        kd_temperature: Unused.
    """

    tasks = ("detection",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 6.0,
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
        self.weight = weight
        self.pairs = FeaturePairs(
            student, teacher, self.context, student_layers, teacher_layers, "PKD"
        )
        self.student_layers = self.pairs.student_layers
        self.teacher_layers = self.pairs.teacher_layers

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        loss = sum(pkd_loss(s, t) for s, t in self.pairs(out))
        return {**self.logit_terms(out), "pkd": self.weight * loss}
