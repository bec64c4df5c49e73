"""Activation boundaries (AB)."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.connectors import ConvConnector
from distill_zoo.distillers.layers import LayerChoice, pair_stages, preactivation, probe_maps
from distill_zoo.losses import ab_loss
from distill_zoo.losses.common import check_formulation


class AB(Distiller):
    """Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons" (AAAI 2019), https://arxiv.org/abs/1811.03233. The student learns where
    each teacher neuron switches on and off: its pre-activations, through a connector, are
    pushed beyond a margin on the side of the teacher's sign.

    ``loss = ce_weight * CE + kd_weight * KD + weight * ab_loss`` (see
    :func:`~distill_zoo.losses.ab_loss`) over the paired stages. Each stage is read before its
    final ReLU (:func:`~distill_zoo.distillers.layers.preactivation`, e.g.
    ``layer3.2.relu2:input``); a connector per pair (1x1 conv + BN, resized to the teacher's
    resolution, :class:`ConvConnector`, the paper's ``r``) maps the student to the teacher's
    shape.

    In the paper (and in RepDistiller) AB is an initialisation stage: the student's layers
    and the connectors train on the AB loss alone, then the student trains on the labels.
    ``ab_only=True`` returns only the ``ab`` term, for that stage;
    ``python -m distill_zoo pipeline=ab_2stage`` runs both stages. The default here is the
    one-stage form ``CE + weight * AB`` (``ce_weight=1``, ``weight=1``, no KD). Defaults:
    all stages (RepDistiller's ``feat[1:-1]``; with different stage counts the last ``k`` of
    each), ``margin=1``, ``formulation="repdistiller"`` (deeper pairs weigh more, times
    3/1000); ``formulation="paper"`` sums the pairs' losses unweighted.

    Args:
        weight: Weight ``b`` of the AB term.
        margin: The margin ``mu`` of the boundary.
        formulation: ``"repdistiller"`` or ``"paper"``.
        ab_only: Return only the weighted AB term (the initialisation stage).
        student_layers: Student stages: ``"all"``, stage indices, layer names (their
            pre-activations are found automatically); ``None`` for all stages.
        teacher_layers: Teacher stages, in the same forms.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of an added Hinton KD term (0: none).
        kd_temperature: Temperature of that KD term.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 1.0,
        margin: float = 1.0,
        formulation: str = "repdistiller",
        ab_only: bool = False,
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
        if margin <= 0:
            raise ValueError(f"the AB margin must be > 0, got {margin}")
        if self.context.example_input is None:
            raise ValueError("AB needs context.example_input to build its connectors")
        self.weight = weight
        self.margin = margin
        self.formulation = formulation
        self.ab_only = ab_only
        stages_s, stages_t = pair_stages(
            student, teacher, self.context, student_layers, teacher_layers, method="AB"
        )
        example = self.context.example_input
        self.student_layers = [preactivation(student, name, example) for name in stages_s]
        self.teacher_layers = [preactivation(teacher, name, example) for name in stages_t]
        s_shapes = probe_maps(student, self.student_layers, self.context, "AB")
        t_shapes = probe_maps(teacher, self.teacher_layers, self.context, "AB")
        self.connectors = nn.ModuleList(
            ConvConnector(s_shapes[s][1], t_shapes[t][1], t_shapes[t][2:])
            for s, t in zip(self.student_layers, self.teacher_layers, strict=True)
        )

    def trains_only_part(self) -> bool:
        return self.ab_only

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        student = [
            connect(out.student_features[name])
            for name, connect in zip(self.student_layers, self.connectors, strict=True)
        ]
        teacher = [out.teacher_features[name] for name in self.teacher_layers]
        loss = ab_loss(student, teacher, margin=self.margin, formulation=self.formulation)
        term = {"ab": self.weight * loss}
        return term if self.ab_only else {**self.logit_terms(out), **term}
