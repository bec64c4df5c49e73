"""Logit knowledge distillation."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.losses import kd_loss


class KD(Distiller):
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (NIPS-W 2014),
    https://arxiv.org/abs/1503.02531. Match the teacher's softened class probabilities.

    ``loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``.
    Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR 2020): ``T=4``,
    ``ce_weight=0.1``, ``kd_weight=0.9``.

    Args:
        temperature: Softmax temperature ``T``.
        kd_weight: Weight of the soft term.
        ce_weight: Weight of the hard-label cross-entropy.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        temperature: float = 4.0,
        kd_weight: float = 0.9,
        ce_weight: float = 0.1,
    ) -> None:
        super().__init__(student, teacher, context=context, ce_weight=ce_weight)
        if temperature <= 0:
            raise ValueError(f"distiller.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.kd_weight = kd_weight

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        terms["kd"] = self.kd_weight * kd_loss(
            out.student_logits, out.teacher_logits, self.temperature
        )
        return terms
