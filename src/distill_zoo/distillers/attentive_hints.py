"""Attentive hint training: FitNets hints weighted by the teacher's reliability per sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from distill_zoo.distillers.attentive_imitation import TeacherReliability
from distill_zoo.distillers.base import (
    DistillContext,
    Distiller,
    StepOutputs,
)
from distill_zoo.distillers.connectors import shape_mismatch
from distill_zoo.distillers.fitnets import HintRegressor, hint_pair
from distill_zoo.distillers.layers import LayerChoice
from distill_zoo.losses import reliability_weighted_mse


def adaptation_layer(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], relu: bool
) -> nn.Module:
    """The trainable map from the student's guided layer to the teacher's hint: FitNets'
    :class:`~distill_zoo.distillers.fitnets.HintRegressor` for ``[B, C, H, W]`` maps, a
    fully connected layer (+ ReLU) for ``[B, C]`` vectors (an MLP's blocks; Saputra et al.'s
    hints are fully connected layers)."""
    if len(student_shape) == 4 and len(teacher_shape) == 4:
        return HintRegressor(student_shape, teacher_shape, relu=relu)
    if len(student_shape) == 2 and len(teacher_shape) == 2:
        linear = nn.Linear(student_shape[1], teacher_shape[1])
        return nn.Sequential(linear, nn.ReLU()) if relu else linear
    raise ValueError(
        "attentive hints map [B, C, H, W] maps onto maps, or [B, C] vectors onto vectors"
    )


class AttentiveHints(Distiller):
    """Attentive hint training of Saputra, Gusmao, Almalioglu, Markham & Trigoni, "Distilling
    Knowledge From a Deep Pose Regressor Network" (ICCV 2019, Sec. 3.3),
    https://arxiv.org/abs/1908.00858: FitNets' hint (Romero et al., ICLR 2015) from a teacher
    layer to a student layer through a trainable adaptation layer ``W``, each sample weighted
    by the teacher's reliability there (``Phi_i``, as in attentive imitation,
    :class:`~distill_zoo.distillers.attentive_imitation.TeacherReliability`):

    ``hint = mean_i Phi_i * mean_k (W(h_s,i) - h_t,i)_k^2``

    (:func:`~distill_zoo.losses.reliability_weighted_mse`), each sample's squared difference
    averaged over the hint's elements ``C x H x W`` (or ``C``), so the weight does not depend
    on the layer's size. ``W`` is FitNets' regressor for feature maps, a linear layer for
    vectors (:func:`adaptation_layer`).

    ``loss = ce_weight * L_task + weight * hint``; ``hint_only=True`` returns the ``hint``
    term alone: the paper's first stage (the student up to the guided layer learns the
    teacher's hint), after which ``pipeline=aht_2stage`` trains the whole student with
    attentive imitation.

    Args:
        weight: Weight of the hint term.
        student_layers: The guided layer: a stage index, ``"last"`` or a layer name;
            ``None`` for stage index 1 (as FitNets).
        teacher_layers: The hint layer, in the same forms.
        regressor_relu: End the adaptation layer with a ReLU (hints after a ReLU).
        hint_only: Return only the weighted hint term (the paper's first stage).
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
        weight: float = 1.0,
        student_layers: LayerChoice = None,
        teacher_layers: LayerChoice = None,
        regressor_relu: bool = True,
        hint_only: bool = False,
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
        if weight < 0:
            raise ValueError(f"attentive_hints' weight must be >= 0, got {weight}")
        self.weight = weight
        self.hint_only = hint_only
        self.student_layer, self.teacher_layer, s_shape, t_shape = hint_pair(
            student, teacher, self.context, student_layers, teacher_layers, "attentive hints"
        )
        try:
            self.regressor = adaptation_layer(s_shape, t_shape, regressor_relu)
        except ValueError as err:
            mismatch = shape_mismatch(self.student_layer, s_shape, self.teacher_layer, t_shape)
            raise ValueError(f"{err}: {mismatch}") from err
        self.reliability = TeacherReliability(self.context.num_train_samples, "attentive_hints")

    def trains_only_part(self) -> bool:
        return self.hint_only

    def layers(self) -> tuple[list[str], list[str]]:
        return [self.student_layer], [self.teacher_layer]

    def before_training(self, trainer: Any, teacher: Callable[[Tensor], Tensor]) -> None:
        self.reliability.prepare(trainer, teacher)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        guided = self.regressor(out.student_features[self.student_layer])
        hint = out.teacher_features[self.teacher_layer]
        phi = self.reliability(out.indices)
        term = {"hint": self.weight * reliability_weighted_mse(guided, hint, phi)}
        if self.hint_only:
            return term
        return {**self.logit_terms(out), **term}
