"""Probabilistic knowledge transfer (PKT)."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import (
    ALL_TASKS,
    DistillContext,
    Distiller,
    StepOutputs,
)
from distill_zoo.distillers.layers import PENULTIMATE, layer_pairs, probe_pairs
from distill_zoo.losses import PKT_REDUCTIONS, pkt_loss


class PKT(Distiller):
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer"
    (ECCV 2018), https://arxiv.org/abs/1803.10837. Match the teacher's distribution of
    pairwise cosine similarities within the batch by a KL divergence.

    ``loss = ce_weight * CE + kd_weight * KD + weight * sum over layer pairs of
    KL(P_t || P_s)``, where ``P(j | i)`` is the row-normalised ``(cos(f_i, f_j) + 1) / 2``
    of the penultimate features (``pkt_loss``). Student and teacher widths may differ; PKT has
    no trainable parts. Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR
    2020; RepDistiller): ``weight=30000``, ``ce_weight=1``, ``kd_weight=0``, the KL averaged
    over all ``b^2`` entries (``reduction="mean"``, the authors' code); ``reduction="sum"`` is
    the paper's formula as written (rescale ``weight`` accordingly).

    Args:
        weight: Weight of the PKT term.
        reduction: ``"mean"``, ``"batchmean"`` or ``"sum"`` (see ``pkt_loss``).
        student_layers: Student layer(s); ``None``/``"penultimate"``: the classifier's input
            (found by a dry forward pass; ``avgpool`` in the zoo). Stage choices (``"last"``,
            an index) and names are globally average-pooled if spatial.
        teacher_layers: The same for the teacher.
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
        weight: float = 30000.0,
        reduction: str = "mean",
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
        if reduction not in PKT_REDUCTIONS:
            raise ValueError(f"unknown PKT reduction {reduction!r}; one of {PKT_REDUCTIONS}")
        self.weight = weight
        self.reduction = reduction
        self.student_layers, self.teacher_layers = layer_pairs(
            student, teacher, self.context, student_layers, teacher_layers, PENULTIMATE, "PKT"
        )
        probe_pairs(student, teacher, self.context, self.student_layers, self.teacher_layers)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        loss = sum(
            pkt_loss(
                s,
                t,
                reduction=self.reduction,
            )
            for s, t in self.paired_features(out, pooled=True)
        )
        return {**self.logit_terms(out), "pkt": self.weight * loss}
