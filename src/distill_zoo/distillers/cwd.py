"""Channel-wise distillation: each channel's map as a spatial distribution."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.feature_pairs import FeaturePairs
from distill_zoo.distillers.layers import LayerChoice
from distill_zoo.losses import cwd_loss

LOGITS = "logits"
"""Layer choice meaning the task's prediction (a segmenter's per-pixel class logits)."""

TASK_DEFAULTS = {"segmentation": (LOGITS, 4.0, 3.0), "detection": ("all", 1.0, 10.0)}
"""Per task: (layers, tau, weight) as published: the official segmentation setting (logits,
tau 4, weight 3) and MMRazor's detection configs (every FPN level, tau 1, weight 10)."""


class CWD(Distiller):
    """Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV 2021),
    https://arxiv.org/abs/2011.13256. Each channel's map becomes a distribution over its
    H x W positions, ``softmax(y_c / tau)``, and the student's is pulled to the teacher's:
    ``weight * tau^2 / (N C) * sum_c KL(teacher_c || student_c)`` per compared map, summed
    over maps (:func:`~distill_zoo.losses.cwd_loss`).

    Left at ``null``, the layers, ``tau`` and ``weight`` take the published setting of the
    run's task: on segmentation the class logits (``tau`` 4, weight 3), on detection every
    FPN level of ``feature_layers`` (``tau`` 1, weight 10 per level). Other layers by name or
    stage index; a 1x1 conv + BN connector maps a student level whose channels or size differ
    to the teacher's.

    Args:
        tau: Temperature of the spatial softmax; ``None``: the task's default.
        weight: Weight of each compared map; ``None``: the task's default.
        student_layers: ``"logits"``, or layers (stage indices, ``"all"``, names);
            ``None``: the task's default.
        teacher_layers: The teacher's, in the same forms.
        ce_weight: Weight of the task loss.
        kd_weight: Weight of an added Hinton KD term (0: none).
        kd_temperature: Temperature of that KD term.
    """

    tasks = ("segmentation", "detection")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        tau: float | None = None,
        weight: float | None = None,
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
        layers, default_tau, default_weight = TASK_DEFAULTS[self.context.task]
        self.tau = default_tau if tau is None else tau
        self.weight = default_weight if weight is None else weight
        if self.tau <= 0:
            raise ValueError(f"CWD's tau must be > 0, got {self.tau}")
        student_layers = layers if student_layers is None else student_layers
        teacher_layers = layers if teacher_layers is None else teacher_layers
        self.on_logits = LOGITS in (student_layers, teacher_layers)
        if self.on_logits and student_layers != teacher_layers:
            raise ValueError(
                "CWD compares the logits of both networks or features of both: set "
                f"student_layers and teacher_layers both to '{LOGITS}' or both to layers"
            )
        if self.on_logits and self.context.task != "segmentation":
            raise ValueError(
                f"CWD on '{LOGITS}' needs per-pixel class logits (task=segmentation); a "
                f"detector in training gives none: choose FPN layers for task="
                f"{self.context.task}"
            )
        self.pairs = None
        if not self.on_logits:
            self.pairs = FeaturePairs(
                student, teacher, self.context, student_layers, teacher_layers, "CWD"
            )
            self.student_layers, self.teacher_layers = (
                self.pairs.student_layers,
                self.pairs.teacher_layers,
            )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        pairs = [(out.student_logits, out.teacher_logits)] if self.on_logits else self.pairs(out)
        loss = sum(cwd_loss(s, t, self.tau) for s, t in pairs)
        return {**self.logit_terms(out), "cwd": self.weight * loss}
