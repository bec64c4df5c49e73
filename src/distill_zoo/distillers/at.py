"""Attention transfer (AT)."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import (
    ALL_TASKS,
    DistillContext,
    Distiller,
    StepOutputs,
)
from distill_zoo.distillers.layers import LayerChoice, pair_stages, probe_maps
from distill_zoo.losses import at_loss
from distill_zoo.losses.common import check_formulation


class AT(Distiller):
    """Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer" (ICLR 2017),
    https://arxiv.org/abs/1612.03928. The student mimics where the teacher's activations are
    strong: its normalised spatial attention maps ``Q = mean_c |A_c|^p``.

    ``loss = ce_weight * CE + kd_weight * KD + weight * at_loss`` (see
    :func:`~distill_zoo.losses.at_loss`), summed over the paired stages.

    ``formulation="repdistiller"`` (default) is RepDistiller's (and the authors' code's)
    ``mean (q_s - q_t)^2`` per layer, to which the benchmark's ``weight=1000`` belongs;
    ``formulation="paper"`` is Eq. 2's ``||q_s - q_t||_2`` averaged over the batch, whose
    ``beta/2`` is ``weight`` (set it yourself: 1000 is far too large there).

    Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR 2020): ``p=2``,
    ``weight=1000``, ``ce_weight=1``, no KD; all stages (the paper transfers attention after
    every residual group). With different stage counts the last ``k`` of each are paired.
    Where the resolutions differ, the larger feature map is average-pooled to the smaller
    before its attention map is taken (as RepDistiller does); channel counts never matter, so
    AT needs no trainable parts.

    Args:
        weight: Weight ``b`` of the attention term.
        p: Exponent of the attention map.
        formulation: ``"repdistiller"`` or ``"paper"``.
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
        weight: float = 1000.0,
        p: float = 2.0,
        formulation: str = "repdistiller",
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
        check_formulation(formulation)
        if p <= 0:
            raise ValueError(f"the attention exponent p must be > 0, got {p}")
        self.weight = weight
        self.p = p
        self.formulation = formulation
        self.student_layers, self.teacher_layers = pair_stages(
            student, teacher, self.context, student_layers, teacher_layers, method="AT"
        )
        probe_maps(student, self.student_layers, self.context, "AT")
        probe_maps(teacher, self.teacher_layers, self.context, "AT")

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        student = [out.student_features[name] for name in self.student_layers]
        teacher = [out.teacher_features[name] for name in self.teacher_layers]
        loss = at_loss(student, teacher, p=self.p, formulation=self.formulation)
        return {**self.logit_terms(out), "at": self.weight * loss}
