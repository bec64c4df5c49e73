"""Teacher-bounded regression: the teacher as an upper bound on the student's error."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.losses import bounded_regression_loss


class TeacherBounded(Distiller):
    """Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation"
    (NeurIPS 2017, Sec. 3.2), https://papers.nips.cc/paper/6676, as a general regression
    distiller: the teacher is not a target (it may be wrong) but a bound. Per sample,
    ``||s - y||^2`` counts only while the student is not better than the teacher by the margin
    ``m`` (``||s - y||^2 + m > ||t - y||^2``), else 0:

    ``loss = ce_weight * L_task(s, y) + nu * mean_i bounded_i``
    (:func:`~distill_zoo.losses.bounded_regression_loss`; squared errors over the D
    standardised targets of a sample). ``nu = 1`` and ``m = 0`` are ours (the paper gives
    neither): the student gets an L2 push exactly where it trails the teacher.

    Args:
        nu: Weight of the bounded term.
        margin: Margin ``m`` (in squared standardised units).
        ce_weight: Weight of the task loss (``task.loss``).
        kd_weight: Weight of added output matching (MSE to the teacher; 0: none).
    """

    tasks = ("regression",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        nu: float = 1.0,
        margin: float = 0.0,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
        )
        if nu < 0:
            raise ValueError(f"teacher_bounded's nu must be >= 0, got {nu}")
        self.nu = nu
        self.margin = margin

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        bounded = bounded_regression_loss(
            out.student_logits, out.teacher_logits, out.targets, self.margin
        )
        return {**self.logit_terms(out), "bounded": self.nu * bounded}
