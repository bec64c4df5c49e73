"""Similarity-preserving knowledge distillation (SP)."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import ALL_TASKS, DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.layers import layer_pairs, probe_pairs
from distill_zoo.losses import sp_loss


class SP(Distiller):
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019),
    https://arxiv.org/abs/1907.09682. Inputs that the teacher activates similarly should
    activate the student similarly: match the batch's row-normalised Gram matrices.

    ``loss = ce_weight * CE + kd_weight * KD + weight * sum over layer pairs of
    ||G_s - G_t||_F^2 / b^2`` with ``G = normalize_rows(A A^T)`` of the flattened activations
    (``sp_loss``). The ``b x b`` matrices match whatever the widths and resolutions, so any
    pair of models works without connectors. Defaults follow the CIFAR-100 benchmark of Tian
    et al. (CRD, ICLR 2020; RepDistiller): ``weight=3000``, ``ce_weight=1``, ``kd_weight=0``,
    the output of the last stage (RepDistiller's choice; the paper sums the loss over one or
    more layer pairs, e.g. ``student_layers=all teacher_layers=all``). Paper and RepDistiller
    agree on the loss itself.

    Args:
        weight: Weight of the SP term.
        student_layers: Student layer(s): ``"last"`` (default), ``"all"``, stage indices or
            layer names.
        teacher_layers: The same number of teacher layers, paired in order.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of Hinton's KD term added on top (0: none).
        kd_temperature: Temperature of that KD term.
    """

    tasks = ALL_TASKS

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 3000.0,
        student_layers: str | int | list | None = None,
        teacher_layers: str | int | list | None = None,
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
        self.student_layers, self.teacher_layers = layer_pairs(
            student, teacher, self.context, student_layers, teacher_layers, "last", "SP"
        )
        probe_pairs(student, teacher, self.context, self.student_layers, self.teacher_layers)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        loss = sum(sp_loss(s, t) for s, t in self.paired_features(out))
        return {**self.logit_terms(out), "sp": self.weight * loss}
