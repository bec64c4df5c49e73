"""Logit knowledge distillation."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs


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
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            kd_temperature=temperature,
        )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        return self.logit_terms(out)
