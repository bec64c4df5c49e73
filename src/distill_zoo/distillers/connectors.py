"""Trainable adapters that bring a student feature map to a teacher's shape."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ConvConnector(nn.Module):
    """1x1 conv + BatchNorm from ``in_channels`` to ``out_channels``, then a resize of the
    spatial grid to ``out_size`` (average pooling to shrink, bilinear to grow).

    Used where student and teacher features differ in width or resolution (FitNets' regressor
    in its simplest form, and the connectors of heterogeneous pairs such as
    resnet32x4 -> ShuffleNetV2).
    """

    def __init__(self, in_channels: int, out_channels: int, out_size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.out_size = tuple(out_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        if tuple(x.shape[-2:]) == self.out_size:
            return x
        if x.shape[-2] >= self.out_size[0] and x.shape[-1] >= self.out_size[1]:
            return F.adaptive_avg_pool2d(x, self.out_size)
        return F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)


def shape_mismatch(student_layer: str, student_shape, teacher_layer: str, teacher_shape) -> str:
    """The message for features a method cannot bridge, naming both layers and shapes."""
    return (
        f"student layer '{student_layer}' gives {tuple(student_shape)[1:]} but teacher layer "
        f"'{teacher_layer}' gives {tuple(teacher_shape)[1:]}"
    )


def bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """Nothing where a student map already has the teacher's ``[C, H, W]``, else a
    :class:`ConvConnector` to it (methods that compare maps element by element)."""
    if tuple(student_shape[1:]) == tuple(teacher_shape[1:]):
        return nn.Identity()
    return ConvConnector(student_shape[1], teacher_shape[1], tuple(teacher_shape[-2:]))
