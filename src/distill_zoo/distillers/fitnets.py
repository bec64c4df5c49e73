"""FitNets: hints from a teacher's middle layer through a learned regressor."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distill_zoo.distillers.base import (
    ALL_TASKS,
    DistillContext,
    Distiller,
    StepOutputs,
    probe_shapes,
    select_layers,
)
from distill_zoo.distillers.connectors import shape_mismatch
from distill_zoo.distillers.layers import LayerChoice, as_choice
from distill_zoo.distillers.taps import check_layers
from distill_zoo.losses import hint_loss
from distill_zoo.losses.common import check_formulation


class HintRegressor(nn.Module):
    """Conv + BatchNorm (+ ReLU) from the student's guided-layer shape to the teacher's hint,
    as RepDistiller's ``ConvReg`` (the CRD benchmark's FitNets) builds it, convs with a bias:

    - a student twice the teacher's size: 3x3 conv, stride 2, padding 1;
    - one half the teacher's size: 4x4 transposed conv, stride 2, padding 1;
    - one as large or larger: the paper's valid conv of kernel ``N_g - N_h + 1`` (Romero et
      al., Sec. 2.2), i.e. a 1x1 conv for equal sizes (1,056 parameters for resnet56 ->
      resnet20's 32-channel hint, where a 3x3 would take 9,216);
    - any other smaller student (``ConvReg`` refuses it): a 1x1 conv and a bilinear resize.

    Args:
        student_shape: ``(B, C, H, W)`` of the guided layer.
        teacher_shape: ``(B, C, H, W)`` of the hint layer.
        relu: End with a ReLU (the hint's non-linearity, Romero et al. Sec. 2.2); turn it off
            for hints that can be negative (e.g. linear bottlenecks).
    """

    def __init__(
        self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], relu: bool = True
    ) -> None:
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape[1:], teacher_shape[1:]
        self.out_size = (t_h, t_w)
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, (s_h - t_h + 1, s_w - t_w + 1))
        else:
            self.conv = nn.Conv2d(s_c, t_c, 1)
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if tuple(x.shape[-2:]) != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return self.relu(self.bn(x))


def _one_layer(choice: LayerChoice, stages: list[str], role: str, method: str) -> str:
    names = select_layers(stages, as_choice(choice), 1)
    if len(names) != 1:
        raise ValueError(f"{method} uses one {role} hint layer, but {names} were chosen")
    return names[0]


def hint_pair(
    student: nn.Module,
    teacher: nn.Module,
    context: DistillContext,
    student_layers: LayerChoice,
    teacher_layers: LayerChoice,
    method: str,
) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
    """The guided (student) and hint (teacher) layer a hint method reads, checked to exist,
    and their output shapes from a dry forward pass: ``(s_layer, t_layer, s_shape, t_shape)``.
    """
    s_layer = _one_layer(student_layers, context.student_stages, "student", method)
    t_layer = _one_layer(teacher_layers, context.teacher_stages, "teacher", method)
    check_layers(student, [s_layer], role="student")
    check_layers(teacher, [t_layer], role="teacher")
    if context.example_input is None:
        raise ValueError(f"{method} needs context.example_input to build its regressor")
    s_shape = probe_shapes(student, [s_layer], context.example_input)[s_layer]
    t_shape = probe_shapes(teacher, [t_layer], context.example_input)[t_layer]
    return s_layer, t_layer, tuple(s_shape), tuple(t_shape)


class FitNets(Distiller):
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015),
    https://arxiv.org/abs/1412.6550. A learned regressor maps a middle ("guided") layer of the
    student onto the teacher's middle ("hint") layer, and the two are pulled together in L2.

    ``loss = ce_weight * CE + kd_weight * KD + weight * hint_loss(regressor(v_g), u_h)`` (see
    :func:`~distill_zoo.losses.hint_loss`); the regressor
    (:class:`HintRegressor`, conv + BN + ReLU) is built from the probed shapes and trains with
    the student.

    Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR 2020): guided and hint
    layers are stage index 1 of ``feature_layers`` (RepDistiller's ``hint_layer=2``, whose
    feature list starts with the stem), ``weight=100``, ``ce_weight=1``, no KD, and
    ``formulation="repdistiller"`` (mean squared error over all elements);
    ``formulation="paper"`` is Eq. 3's ``1/2 ||u_h - r(v_g)||^2`` per sample, averaged over
    the batch.

    On language models the tapped layers are decoder blocks whose outputs are hidden states
    ``[B, L, D]``: the regressor is then a linear map from the student's width to the
    teacher's (TinyBERT's ``MSE(H_S W_h, H_T)``, Jiao et al. 2020; ``distiller=hidden_kd``).

    The paper trains in two stages: first the student up to the guided layer on the hint loss
    alone, then the whole student with KD. ``hint_only=True`` returns only the ``hint`` term,
    for that first stage (layers after the guided one then get no gradient; a pipeline runs
    the two stages); the default is the one-stage form above.

    Args:
        weight: Weight ``b`` of the hint term.
        student_layers: The guided layer: a stage index, ``"last"``, or a layer name;
            ``None`` for stage index 1.
        teacher_layers: The hint layer, in the same forms.
        formulation: ``"repdistiller"`` or ``"paper"``.
        regressor_relu: End the regressor with a ReLU (as RepDistiller's ``ConvReg``).
        hint_only: Return only the weighted hint term (the paper's first stage).
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of an added Hinton KD term (0: none).
        kd_temperature: Temperature of that KD term.
    """

    tasks = (*ALL_TASKS, "language_modeling")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 100.0,
        student_layers: LayerChoice = None,
        teacher_layers: LayerChoice = None,
        formulation: str = "repdistiller",
        regressor_relu: bool = True,
        hint_only: bool = False,
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
        check_formulation(formulation)
        self.weight = weight
        self.formulation = formulation
        self.hint_only = hint_only
        self.student_layer, self.teacher_layer, s_shape, t_shape = hint_pair(
            student, teacher, self.context, student_layers, teacher_layers, "FitNets"
        )
        if len(s_shape) == 3 and len(t_shape) == 3 and s_shape[1] == t_shape[1]:
            # Token sequences [B, L, D]: a linear map of the student's hidden states onto the
            # teacher's, as TinyBERT's hidden-state loss (Jiao et al., Findings of EMNLP 2020,
            # https://arxiv.org/abs/1909.10351): MSE(H_S W_h, H_T).
            self.regressor: nn.Module = nn.Linear(s_shape[2], t_shape[2])
        elif len(s_shape) != 4 or len(t_shape) != 4:
            raise ValueError(
                "FitNets regresses [B, C, H, W] feature maps with a conv, or token sequences "
                "[B, L, D] of the same length with a linear map: "
                f"{shape_mismatch(self.student_layer, s_shape, self.teacher_layer, t_shape)}"
            )
        else:
            self.regressor = HintRegressor(s_shape, t_shape, relu=regressor_relu)

    def trains_only_part(self) -> bool:
        return self.hint_only

    def layers(self) -> tuple[list[str], list[str]]:
        return [self.student_layer], [self.teacher_layer]

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        guided = self.regressor(out.student_features[self.student_layer])
        hint = out.teacher_features[self.teacher_layer]
        term = {"hint": self.weight * hint_loss(guided, hint, formulation=self.formulation)}
        if self.hint_only:
            return term
        return {**self.logit_terms(out), **term}
