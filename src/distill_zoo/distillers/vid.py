"""Variational information distillation (VID)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_zoo.distillers.base import ALL_TASKS, DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.layers import layer_pairs, probe_pairs
from distill_zoo.losses import vid_loss


class VIDRegressor(nn.Module):
    """The variational distribution of one layer pair: a Gaussian over the teacher feature
    with mean ``mu(s)`` = conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1 of the student feature
    and a learnable per-channel variance ``softplus(alpha) + eps``.

    Args:
        in_channels: Student channels.
        mid_channels: Hidden channels of the regressor.
        out_channels: Teacher channels.
        init_variance: Initial variance of every channel.
        eps: Floor of the variance.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        init_variance: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if init_variance <= eps:
            raise ValueError(f"init_variance must exceed eps={eps}, got {init_variance}")
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=False),
        )
        # softplus(alpha) + eps == init_variance
        alpha = math.log(math.expm1(init_variance - eps))
        self.alpha = nn.Parameter(torch.full((out_channels,), alpha))
        self.eps = eps

    def variance(self) -> Tensor:
        """``[C]`` per-channel variances of the teacher feature."""
        return F.softplus(self.alpha) + self.eps

    def forward(self, student_feature: Tensor) -> Tensor:
        """The predicted mean of the teacher feature."""
        return self.mean(student_feature)


class VID(Distiller):
    """Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019),
    https://arxiv.org/abs/1904.05835. Maximise a variational lower bound of the mutual
    information between teacher and student features: the student must predict the teacher's
    features under a Gaussian with learned per-channel variance.

    ``loss = ce_weight * CE + kd_weight * KD + weight * sum over layer pairs of
    mean(0.5 * (log sigma^2 + (t - mu(s))^2 / sigma^2))`` (``vid_loss``), with ``mu`` and
    ``sigma^2`` from a trainable :class:`VIDRegressor` per pair (bias-free 1x1 convs, hidden
    width = teacher channels, initial variance 5, as in RepDistiller/the authors' code). Any
    channel counts pair; where resolutions differ the larger map is average-pooled to the
    smaller. Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR 2020;
    RepDistiller): ``weight=1``, ``ce_weight=1``, ``kd_weight=0``, every stage output of both
    models (paired from the last stage backwards when their stage counts differ).

    Args:
        weight: Weight of the VID term.
        init_variance: Initial per-channel variance.
        eps: Floor of the variance.
        mid_channels: Hidden width of the regressors (``None``: the teacher's channels).
        student_layers: Student layers: ``"all"`` (default), ``"last"``, stage indices or
            layer names; each must give ``[B, C, H, W]`` (or ``[B, C]``, read as 1x1 maps).
        teacher_layers: The same number of teacher layers, paired in order.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of Hinton's KD term added on top (0: none).
        kd_temperature: Temperature of that KD term.
    """

    tasks = ALL_TASKS

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 1.0,
        init_variance: float = 5.0,
        eps: float = 1e-5,
        mid_channels: int | None = None,
        student_layers: str | int | list | None = None,
        teacher_layers: str | int | list | None = None,
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
        self.weight = weight
        self.student_layers, self.teacher_layers = layer_pairs(
            student, teacher, self.context, student_layers, teacher_layers, "all", "VID"
        )
        s_shapes, t_shapes = probe_pairs(
            student, teacher, self.context, self.student_layers, self.teacher_layers
        )
        self.regressors = nn.ModuleList()
        for s, t in zip(self.student_layers, self.teacher_layers, strict=True):
            for name, shape, role in ((s, s_shapes[s], "student"), (t, t_shapes[t], "teacher")):
                if len(shape) not in (2, 4):
                    raise ValueError(
                        f"VID regresses feature maps [B, C, H, W], but {role} layer '{name}' "
                        f"gives {shape}: choose convolutional layers"
                    )
            s_channels, t_channels = s_shapes[s][1], t_shapes[t][1]
            self.regressors.append(
                VIDRegressor(
                    s_channels, mid_channels or t_channels, t_channels, init_variance, eps
                )
            )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        loss = 0.0
        for s, t, regressor in zip(
            self.student_layers, self.teacher_layers, self.regressors, strict=True
        ):
            s_map, t_map = _as_map(out.student_features[s]), _as_map(out.teacher_features[t])
            size = (min(s_map.shape[2], t_map.shape[2]), min(s_map.shape[3], t_map.shape[3]))
            if tuple(s_map.shape[2:]) != size:
                s_map = F.adaptive_avg_pool2d(s_map, size)
            if tuple(t_map.shape[2:]) != size:
                t_map = F.adaptive_avg_pool2d(t_map, size)
            loss = loss + vid_loss(regressor(s_map), t_map, regressor.variance())
        return {**self.logit_terms(out), "vid": self.weight * loss}


def _as_map(x: Tensor) -> Tensor:
    """``[B, C]`` as ``[B, C, 1, 1]``; feature maps unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x
