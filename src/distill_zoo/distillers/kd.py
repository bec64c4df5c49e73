"""Logit knowledge distillation."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.losses import kd_loss, logit_mse_loss, prob_mse_loss, standardize_logits

SOFT_LOSSES = ("kl", "mse_logits", "mse_probs")


class KD(Distiller):
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (NIPS-W 2014),
    https://arxiv.org/abs/1503.02531. Match the teacher's softened class probabilities.

    ``loss = ce_weight * CE(s, y) + kd_weight * soft(s, t)`` where ``soft_loss`` picks:

    - ``kl`` (default, Hinton): ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the
      batch (:func:`~distill_zoo.losses.kd_loss`).
    - ``mse_logits`` (Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014,
      https://arxiv.org/abs/1312.6184): regression of the raw logits,
      ``1/(2B) sum_b ||s_b - t_b||^2`` (half the squared error summed over classes, averaged
      over the batch, as their Sec. 2.2; :func:`~distill_zoo.losses.logit_mse_loss`).
      ``temperature`` is not used.
    - ``mse_probs``: the same reduction on the softened probabilities ``softmax(./T)``, without
      a ``T^2`` factor (:func:`~distill_zoo.losses.prob_mse_loss`).

    On segmentation every pixel is a sample: the soft loss compares the class distributions of
    each pixel, averaged over pixels (the pixel-wise term of structured KD, Liu et al., CVPR
    2019). On regression, ``kd`` is output matching: ``kd_weight * mean((s - t)^2)`` beside
    ``ce_weight`` times the task loss (no temperature).

    Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR 2020): ``kl``, ``T=4``,
    ``ce_weight=0.1``, ``kd_weight=0.9``. The MSE losses have other scales: choose
    ``kd_weight`` for them yourself (Ba & Caruana train on the logit loss alone:
    ``ce_weight=0``).

    ``logit_standardize=True`` Z-scores both networks' logits per sample before the soft loss
    (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024,
    https://arxiv.org/abs/2403.01427; :func:`~distill_zoo.losses.standardize_logits`); the
    CE keeps the raw logits. Their CIFAR-100 recipe for KD with it is a base temperature
    ``T=2`` (3 for some pairs) and ``kd_weight=9`` with ``ce_weight=0.1``: standardised logits
    have unit spread, so the default ``T=4`` would soften them far more than raw logits.

    Args:
        temperature: Softmax temperature ``T``.
        kd_weight: Weight of the soft term.
        ce_weight: Weight of the hard-label cross-entropy.
        soft_loss: ``"kl"``, ``"mse_logits"`` or ``"mse_probs"``.
        logit_standardize: Z-score the logits before the soft loss.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        temperature: float = 4.0,
        kd_weight: float = 0.9,
        ce_weight: float = 0.1,
        soft_loss: str = "kl",
        logit_standardize: bool = False,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            kd_temperature=temperature,
        )
        if soft_loss not in SOFT_LOSSES:
            raise ValueError(f"soft_loss must be one of {SOFT_LOSSES}, got {soft_loss!r}")
        self.soft_loss = soft_loss
        self.logit_standardize = logit_standardize
        self.regression = self.context.task == "regression"
        if self.regression and (soft_loss != "kl" or logit_standardize):
            raise ValueError(
                "on task=regression, kd is output matching (MSE to the teacher's prediction): "
                "soft_loss and logit_standardize apply to class logits only; leave them at "
                "their defaults"
            )

    tasks = ("classification", "segmentation", "regression")

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if (self.soft_loss == "kl" and not self.logit_standardize) or self.regression:
            return self.logit_terms(out)
        terms = self.ce_term(out)
        if not self.kd_weight:
            return terms
        student, teacher = out.logit_rows()
        if self.logit_standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        if self.soft_loss == "kl":
            soft = kd_loss(student, teacher, self.kd_temperature)
        elif self.soft_loss == "mse_logits":
            soft = logit_mse_loss(student, teacher)
        else:
            soft = prob_mse_loss(student, teacher, self.kd_temperature)
        terms["kd"] = self.kd_weight * soft
        return terms
