"""CTKD: curriculum temperature for knowledge distillation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.losses import ctkd_lambda, ctkd_loss


class GradientReversal(torch.autograd.Function):
    """Ganin & Lempitsky's gradient-reversal layer ("Unsupervised Domain Adaptation by
    Backpropagation", ICML 2015, https://arxiv.org/abs/1409.7495): the identity forward,
    ``-lambda * grad`` backward, so whatever sits before it ascends the loss that
    everything after it descends."""

    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """``x`` unchanged, its gradient multiplied by ``-strength`` on the way back."""
    return GradientReversal.apply(x, strength)


class CTKD(Distiller):
    """Li et al., "Curriculum Temperature for Knowledge Distillation" (AAAI 2023),
    https://arxiv.org/abs/2211.16231. Hinton's KD with a learnable temperature that is
    trained adversarially, to *maximise* the KD loss the student minimises, through a
    gradient-reversal layer whose strength ``lambda`` grows along a cosine curriculum (easy
    to hard).

    ``loss = ce_weight * CE + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``
    (:func:`~distill_zoo.losses.ctkd_loss`) with the global temperature
    ``T = t_start + t_range * sigmoid(GRL(theta))`` (one learnable scalar ``theta``, a
    distiller parameter, so the student's optimizer steps it: the optimizer descends the
    total loss, and the reversal turns that into ascent of the KD term for ``theta``).
    ``lambda`` at epoch ``e`` (0-based) is :func:`~distill_zoo.losses.ctkd_lambda` at
    ``n = e + 1``, since the official loop counts epochs from 1: a cosine ramp from 0 to
    ``lambda_max`` over ``warmup_epochs``.

    Defaults follow the official CIFAR-100 script (zhengli97/CTKD,
    ``scripts/run_cifar_distill.sh`` and ``helper/loops.py``): ``ce_weight=0.1``,
    ``kd_weight=0.9``, ``t_start=1``, ``t_range=20`` (the code's ``--t_end``, used as the
    range: ``T`` lies in ``(1, 21)``), ``theta`` initialised to 1 (``T = 15.6`` at the
    start), ``lambda`` from 0 to 1 over ``warmup_epochs=10``. The paper's instance-wise
    temperature (a small network on the logits) is not implemented here; only the global one.

    Args:
        t_start: Lowest temperature.
        t_range: Width of the temperature range above ``t_start``.
        init: Initial value of the raw temperature parameter ``theta``.
        warmup_epochs: Epochs over which ``lambda`` ramps up (``N``).
        lambda_max: Final reversal strength.
        lambda_min: Starting reversal strength.
        kd_weight: Weight of the KD term.
        ce_weight: Weight of the hard-label cross-entropy.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        t_start: float = 1.0,
        t_range: float = 20.0,
        init: float = 1.0,
        warmup_epochs: int = 10,
        lambda_max: float = 1.0,
        lambda_min: float = 0.0,
        kd_weight: float = 0.9,
        ce_weight: float = 0.1,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
        )
        if t_start <= 0 or t_range < 0:
            raise ValueError(
                f"CTKD needs t_start > 0 and t_range >= 0 (T lies in (t_start, t_start + "
                f"t_range)), got t_start={t_start}, t_range={t_range}"
            )
        if warmup_epochs <= 0:
            raise ValueError(f"warmup_epochs must be > 0, got {warmup_epochs}")
        if not lambda_min <= lambda_max:
            raise ValueError(
                f"lambda_min must not exceed lambda_max, got {lambda_min} > {lambda_max}"
            )
        self.t_start = t_start
        self.t_range = t_range
        self.warmup_epochs = warmup_epochs
        self.lambda_max = lambda_max
        self.lambda_min = lambda_min
        self.raw_temperature = nn.Parameter(torch.full((1,), float(init)))

    def reversal_strength(self, epoch: int) -> float:
        """``lambda`` during the 0-based ``epoch``."""
        return ctkd_lambda(epoch + 1, self.warmup_epochs, self.lambda_max, self.lambda_min)

    def temperature(self, strength: float = 0.0) -> Tensor:
        """The current temperature ``T`` (one-element tensor); gradients reaching it are
        reversed and scaled by ``strength`` before they reach the raw parameter."""
        raw = reverse_gradient(self.raw_temperature, strength)
        return self.t_start + self.t_range * torch.sigmoid(raw)

    def monitored(self) -> dict[str, Tensor]:
        """The learned temperature, logged as ``train/ctkd_temperature``."""
        return {"ctkd_temperature": self.temperature().detach().squeeze()}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        temperature = self.temperature(self.reversal_strength(out.epoch))
        terms["kd"] = self.kd_weight * ctkd_loss(
            out.student_logits, out.teacher_logits, temperature
        )
        return terms
