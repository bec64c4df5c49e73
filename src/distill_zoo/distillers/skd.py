"""Structured knowledge distillation for dense prediction: pixel, pair-wise and holistic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.critic import ProbabilityMapCritic, image_map_pairs
from distill_zoo.distillers.layers import LayerChoice, pair_stages, probe_maps
from distill_zoo.losses import (
    gradient_penalty,
    pairwise_affinity_loss,
    pixel_kd_loss,
    wgan_critic_loss,
    wgan_generator_loss,
)


class SKD(Distiller):
    """Liu et al., "Structured Knowledge Distillation for Semantic Segmentation" (CVPR 2019),
    https://arxiv.org/abs/1903.04197, and "Structured Knowledge Distillation for Dense
    Prediction" (TPAMI 2020), https://arxiv.org/abs/1903.04197v3. Three terms beside the
    per-pixel cross-entropy, each switched off by a zero weight:

    - ``pixel``: KL between teacher and student class distributions of each pixel, averaged
      over pixels (:func:`~distill_zoo.losses.pixel_kd_loss` at ``temperature``; the authors'
      code takes the cross-entropy with the teacher's distribution, which differs from the KL
      by the teacher's entropy, a constant: same gradients);
    - ``pair``: both networks' feature maps of one layer max-pooled into patches (kernel
      ``pool_scale`` of the map), the cosine affinity between every pair of patches, and the
      squared difference of the two affinity matrices / (W'H')^2
      (:func:`~distill_zoo.losses.pairwise_affinity_loss`);
    - ``holistic``: a conditional Wasserstein GAN with gradient penalty. A critic
      (:class:`~distill_zoo.distillers.critic.ProbabilityMapCritic`) scores (image,
      class-probability map) pairs; the student, as generator, adds
      ``holistic_weight * -E[D(image, student map)]`` to its loss. The critic is not in the
      student's optimizer: the module steps it with its own Adam after each student step, on
      ``E[D(student)] - E[D(teacher)] + gp_weight * GP``.

    Defaults are the authors' (their code's ``lambda-pi 10``, ``lambda-pa 1``, ``lambda-d
    0.1``, ``lambda-gp 10``, pool scale 0.5, critic Adam at lr 4e-4 with betas (0.9, 0.99),
    the pixel term at temperature 1). The pair-wise term reads the last backbone stage
    (``feature_layers`` index -2: the zoo's segmentation configs list the stages, then the
    head's features).

    Args:
        pixel_weight: Weight of the pixel-wise term.
        temperature: Softmax temperature of the pixel-wise term.
        pair_weight: Weight of the pair-wise term.
        pool_scale: Patch size of the pair-wise term as a share of the map (0.5: 2x2 nodes).
        student_layers: The pair-wise layer of the student (a stage index, "last" or a name).
        teacher_layers: The pair-wise layer of the teacher.
        holistic_weight: Weight of the adversarial (generator) term; 0 builds no critic.
        gp_weight: Weight of the critic's gradient penalty.
        critic_width: Channels of the critic's first conv.
        critic_lr: Learning rate of the critic's Adam.
        critic_betas: Adam betas of the critic.
        ce_weight: Weight of the per-pixel cross-entropy with the labels.
        kd_weight: Weight of an added Hinton KD term (0: none; ``pixel`` already is one).
        kd_temperature: Temperature of that KD term.
    """

    tasks = ("segmentation",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        pixel_weight: float = 10.0,
        temperature: float = 1.0,
        pair_weight: float = 1.0,
        pool_scale: float = 0.5,
        student_layers: LayerChoice = None,
        teacher_layers: LayerChoice = None,
        holistic_weight: float = 0.1,
        gp_weight: float = 10.0,
        critic_width: int = 32,
        critic_lr: float = 4e-4,
        critic_betas: Sequence[float] = (0.9, 0.99),
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
        for name, value in [
            ("pixel_weight", pixel_weight),
            ("pair_weight", pair_weight),
            ("holistic_weight", holistic_weight),
            ("gp_weight", gp_weight),
        ]:
            if value < 0:
                raise ValueError(f"SKD's {name} must be >= 0, got {value}")
        if temperature <= 0:
            raise ValueError(f"SKD's temperature must be > 0, got {temperature}")
        if not 0 < pool_scale <= 1:
            raise ValueError(f"SKD's pool_scale must be in (0, 1], got {pool_scale}")
        self.pixel_weight = pixel_weight
        self.temperature = temperature
        self.pair_weight = pair_weight
        self.pool_scale = pool_scale
        self.holistic_weight = holistic_weight
        self.gp_weight = gp_weight
        self.critic_lr = critic_lr
        self.critic_betas = tuple(critic_betas)
        if pair_weight:
            self.student_layers, self.teacher_layers = pair_stages(
                student, teacher, self.context, student_layers, teacher_layers, -2, "SKD"
            )
            if len(self.student_layers) != 1:
                raise ValueError(
                    f"SKD's pair-wise term reads one layer, but {self.student_layers} were "
                    "chosen: give one stage index or name"
                )
            probe_maps(student, self.student_layers, self.context, "SKD's pair-wise term")
            probe_maps(teacher, self.teacher_layers, self.context, "SKD's pair-wise term")
        self.critic = None
        if holistic_weight:
            example = self.context.example_input
            if example is None or not self.context.num_classes:
                raise ValueError("SKD's holistic term needs context.example_input and num_classes")
            self.critic = ProbabilityMapCritic(
                example.shape[1], self.context.num_classes, width=critic_width
            )

    def adversary(self) -> nn.Module | None:
        return self.critic

    def adversary_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.critic_lr, betas=self.critic_betas)

    def trains_only_part(self) -> bool:
        # The critic's step reaches only the critic: DDP must not wait for the student there.
        return self.critic is not None

    @property
    def soft_temperature(self) -> float:
        return self.temperature

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.logit_terms(out)
        if self.pixel_weight:
            terms["pixel"] = self.pixel_weight * pixel_kd_loss(
                out.student_logits, out.teacher_logits, self.temperature
            )
        if self.pair_weight:
            ((student, teacher),) = self.paired_features(out)
            terms["pair"] = self.pair_weight * pairwise_affinity_loss(
                student, teacher, self.pool_scale
            )
        if self.critic is not None:
            fake = image_map_pairs(out.images, out.student_logits)
            terms["holistic"] = self.holistic_weight * wgan_generator_loss(self.critic(fake))
        return terms

    def adversary_terms(self, out: StepOutputs) -> dict[str, Tensor]:
        real = image_map_pairs(out.images, out.teacher_logits.detach())
        fake = image_map_pairs(out.images, out.student_logits.detach())
        return {
            "wasserstein": wgan_critic_loss(self.critic(real), self.critic(fake)),
            "gp": self.gp_weight * gradient_penalty(self.critic, real, fake),
        }
