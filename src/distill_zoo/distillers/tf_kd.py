"""Teacher-free KD with a hand-designed virtual teacher (Tf-KD_reg)."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.losses import TF_KD_FORMULATIONS, tf_kd_reg_loss


class TfKD(Distiller):
    """Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization"
    (CVPR 2020), https://arxiv.org/abs/1909.11723. KD works partly as a learned label
    smoothing; Tf-KD_reg replaces the trained teacher by a virtual one that puts probability
    ``a`` on the correct class and ``(1 - a) / (K - 1)`` on each other class. No teacher
    network is needed (``teacher=none``).

    ``loss = ce_weight * CE + weight * tf_kd_reg_loss`` (see
    :func:`~distill_zoo.losses.tf_kd_reg_loss`). The paper writes
    ``(1 - alpha) * H(q, p) + alpha * D_KL(p^d_tau, p^tau)``, so ``ce_weight = 1 - alpha``
    and ``weight = alpha`` there; the authors' code also multiplies the soft term by a
    per-model ``multiplier``, so ``weight = alpha * multiplier``.

    The two formulations differ in how the temperature meets the virtual teacher:

    - ``official`` (default, the authors' ``loss_kd_regularization``): the teacher is
      ``softmax(p^d / T)`` (the probabilities divided by ``T`` as if they were logits: nearly
      uniform for large ``T``) and the student is not softened; the KL divergence is averaged
      over all ``B*K`` entries.
    - ``paper``: both softened at ``T``, the teacher as ``p^d_tau ∝ (p^d)^(1/T)``, the KL
      divergence summed over classes and averaged over the batch.

    Defaults: the authors' CIFAR-100 ResNet-18 setting
    (``experiments/base_experiments/base_resnet18/params.json``: ``reg_temperature=20``,
    ``reg_alpha=0.1``, ``multiplier=100``) with the code's fixed ``a = 0.99``: ``T=20``,
    ``ce_weight=0.9``, ``weight=10``. Their other CIFAR-100 settings: MobileNetV2 ``T=40``,
    ``alpha=0.95``, multiplier 1 (``ce_weight=0.05``, ``weight=0.95``); ShuffleNetV2
    ``T=10``, ``alpha=0.95``, multiplier 1; GoogLeNet ``T=40``, ``alpha=0.1``, multiplier 50
    (``ce_weight=0.9``, ``weight=5``). The paper only asks for ``a >= 0.9``.

    Args:
        correct_prob: ``a``, the virtual teacher's probability of the correct class.
        temperature: Temperature ``T`` (see the formulations).
        weight: Weight of the virtual-teacher term.
        formulation: ``"official"`` or ``"paper"``.
        ce_weight: Weight of the hard-label cross-entropy.
    """

    requires_teacher = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        context: DistillContext | None = None,
        correct_prob: float = 0.99,
        temperature: float = 20.0,
        weight: float = 10.0,
        formulation: str = "official",
        ce_weight: float = 0.9,
    ) -> None:
        super().__init__(student, teacher, context=context, ce_weight=ce_weight)
        if formulation not in TF_KD_FORMULATIONS:
            raise ValueError(
                f"formulation must be one of {TF_KD_FORMULATIONS}, got {formulation!r}"
            )
        if not 0 < correct_prob < 1:
            raise ValueError(
                f"correct_prob (the virtual teacher's probability of the correct class) must "
                f"be in (0, 1), got {correct_prob}"
            )
        if temperature <= 0:
            raise ValueError(f"the Tf-KD temperature must be > 0, got {temperature}")
        self.correct_prob = correct_prob
        self.temperature = temperature
        self.weight = weight
        self.formulation = formulation

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        loss = tf_kd_reg_loss(
            out.student_logits,
            out.targets,
            correct_prob=self.correct_prob,
            temperature=self.temperature,
            formulation=self.formulation,
        )
        return {**self.ce_term(out), "tf_kd": self.weight * loss}
