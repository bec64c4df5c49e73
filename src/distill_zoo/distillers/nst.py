"""Neuron selectivity transfer (NST)."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import ALL_TASKS, DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.layers import LayerChoice, pair_stages, probe_maps
from distill_zoo.losses import nst_loss


class NST(Distiller):
    """Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
    (arXiv 2017), https://arxiv.org/abs/1707.01219. Match the distribution of the student's
    per-channel spatial activation patterns to the teacher's, by minimising their squared
    maximum mean discrepancy (MMD).

    ``loss = ce_weight * CE + kd_weight * KD + weight * nst_loss`` (see
    :func:`~distill_zoo.losses.nst_loss`), summed over the paired stages:
    each channel's map, flattened and L2-normalised over positions, is one sample; the MMD
    uses the polynomial kernel ``k(x, y) = (x^T y + c)^d``. The paper's ``lambda/2`` is
    ``weight``. RepDistiller's loss is the same formula, so there is no formulation switch.

    Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR 2020): ``d=2``, ``c=0``
    (the paper's best kernel), ``weight=50``, ``ce_weight=1``, no KD, all stages (as
    RepDistiller; with different stage counts the last ``k`` of each are paired). The larger
    feature map of a pair is average-pooled to the smaller's spatial size; channel counts may
    differ (MMD compares sets of any size), so NST needs no trainable parts.

    Args:
        weight: Weight ``b`` of the MMD term.
        degree: Polynomial kernel degree ``d`` (1 with ``c=0``: the linear kernel).
        c: Polynomial kernel offset.
        student_layers: Student layers: ``"all"``, ``"last"``, stage index (or list of them),
            layer names; ``None`` for all stages.
        teacher_layers: Teacher layers, in the same forms.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of an added Hinton KD term (0: none).
        kd_temperature: Temperature of that KD term.
    """

    tasks = ALL_TASKS

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 50.0,
        degree: int = 2,
        c: float = 0.0,
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
        if int(degree) != degree or degree < 1:
            raise ValueError(f"the kernel degree must be a positive integer, got {degree}")
        self.weight = weight
        self.degree = int(degree)
        self.c = c
        self.student_layers, self.teacher_layers = pair_stages(
            student, teacher, self.context, student_layers, teacher_layers, method="NST"
        )
        probe_maps(student, self.student_layers, self.context, "NST")
        probe_maps(teacher, self.teacher_layers, self.context, "NST")

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        student = [out.student_features[name] for name in self.student_layers]
        teacher = [out.teacher_features[name] for name in self.teacher_layers]
        loss = nst_loss(student, teacher, degree=self.degree, c=self.c)
        return {**self.logit_terms(out), "nst": self.weight * loss}
