"""No distillation: the task loss alone (teachers, vanilla baselines)."""

from __future__ import annotations

from torch import Tensor

from distill_zoo.distillers.base import Distiller, StepOutputs
from distill_zoo.tasks.base import TASKS


class CrossEntropyOnly(Distiller):
    """Plain supervised training; trains teachers and the vanilla students KD is compared to.

    Args:
        label_smoothing: Label smoothing of the cross-entropy (Szegedy et al., CVPR 2016).
    """

    requires_teacher = False
    tasks = TASKS

    def __init__(self, student, teacher=None, *, context=None, label_smoothing: float = 0.0):
        super().__init__(student, teacher, context=context, ce_weight=1.0)
        self.label_smoothing = label_smoothing

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if not self.label_smoothing:
            return {out.task_term: out.task_loss()}
        return {out.task_term: out.task_loss(label_smoothing=self.label_smoothing)}
