"""Decoupled knowledge distillation (DKD)."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.losses import dkd_loss, standardize_logits


class DKD(Distiller):
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022),
    https://arxiv.org/abs/2203.08679. KD rewritten as target-class KD (TCKD, the binary
    ``[p_t, 1 - p_t]`` split) plus non-target-class KD (NCKD, the distribution among the other
    classes) weighted by ``1 - p_t``; DKD weights the two freely.

    ``loss = ce_weight * CE + kd_weight * KD + warmup(epoch) * (alpha * TCKD + beta * NCKD)``
    with both parts ``T^2``-scaled batch means (:func:`~distill_zoo.losses.dkd_loss`) and the
    linear warm-up ``warmup(epoch) = min((epoch + 1) / warmup_epochs, 1)``.

    Defaults are mdistiller's (the authors' code, ``CFG.DKD``): ``alpha=1``, ``beta=8``,
    ``T=4``, ``ce_weight=1``, 20 warm-up epochs. Its CIFAR-100 per-pair configs
    (``configs/cifar100/dkd/``) lower ``beta`` for some pairs: 6 for vgg13 -> vgg8,
    vgg13 -> mobilenetv2, wrn_40_2 -> wrn_16_2 and wrn_40_2 -> wrn_40_1; 2 for
    resnet56 -> resnet20 and resnet110 -> resnet32 (the others keep 8). Its ImageNet
    ResNet-34 -> ResNet-18 config uses ``beta=0.5``, ``T=1``, 1 warm-up epoch.

    Warm-up: mdistiller counts epochs from 1 and weights epoch ``e`` by ``min(e / 20, 1)``,
    so its first epoch already has weight 1/20. ``StepOutputs.epoch`` counts from 0, hence
    the ``+ 1``: epoch by epoch the weights are the reference's. ``warmup_epochs=0`` turns the
    warm-up off.

    ``logit_standardize=True`` Z-scores both networks' logits per sample before the DKD term
    (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024,
    https://arxiv.org/abs/2403.01427; :func:`~distill_zoo.losses.standardize_logits`); the CE
    and any added KD term keep the raw logits. Their training script (``tools/train.py
    --logit-stand``) multiplies ``alpha`` and ``beta`` by 9 and sets ``T`` to a base
    temperature of 2: standardised logits have unit spread, so the default weights and
    temperature give a much weaker DKD term.

    Args:
        alpha: Weight of TCKD.
        beta: Weight of NCKD.
        temperature: Softmax temperature ``T``.
        warmup_epochs: Epochs of the linear warm-up of the DKD term (0: none).
        logit_standardize: Z-score the logits before the DKD term.
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
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
        logit_standardize: bool = False,
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
        if temperature <= 0:
            raise ValueError(f"the DKD temperature must be > 0, got {temperature}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0 (0: no warm-up), got {warmup_epochs}")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.logit_standardize = logit_standardize

    @property
    def soft_temperature(self) -> float:
        """DKD softens the teacher at its own temperature."""
        return self.temperature

    def warmup(self, epoch: int) -> float:
        """Weight of the DKD term in the 0-based ``epoch``: ``min((epoch + 1) / warmup, 1)``."""
        if self.warmup_epochs == 0:
            return 1.0
        return min((epoch + 1) / self.warmup_epochs, 1.0)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        student, teacher = out.student_logits, out.teacher_logits
        if self.logit_standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        loss = dkd_loss(student, teacher, out.targets, self.alpha, self.beta, self.temperature)
        return {**self.logit_terms(out), "dkd": self.warmup(out.epoch) * loss}
