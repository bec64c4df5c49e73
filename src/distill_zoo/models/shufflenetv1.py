"""ShuffleNetV1 (groups=3) as used as a student in the CIFAR distillation benchmarks.

ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices (Xiangyu
Zhang, Xinyu Zhou, Mengxiao Lin, Jian Sun, CVPR 2018), https://arxiv.org/abs/1707.01083.

The ``ShuffleV1`` model of the CRD/RepDistiller code base
(https://github.com/HobbitLong/RepDistiller, ``models/ShuffleNetv1.py``): a 1x1 stem conv to
24 channels (no stride, no max-pool), three stages ``layer1`` .. ``layer3`` of 4, 8 and 4 units
with 240, 480 and 960 output channels, each starting with a stride-2 unit whose shortcut is a
3x3 average pool concatenated to the residual branch; global average pooling and ``fc``.
A 32x32 image reaches ``layer3`` at 4x4, a 16x16 one at 2x2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_zoo.models.init import init_weights


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups: (N, g*c, H, W) -> view (N, g, c) -> (N, c, g).

    Args:
        groups: Number of channel groups.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        x = x.reshape(n, self.groups, c // self.groups, h, w)
        return x.transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ShuffleUnit(nn.Module):
    """Grouped 1x1 conv, channel shuffle, 3x3 depthwise conv, grouped 1x1 conv; residual add, or
    concatenation with an average-pooled shortcut when ``stride == 2``.

    Args:
        in_planes: Input channels.
        out_planes: Channels of the residual branch (the unit outputs ``in_planes + out_planes``
            channels when ``stride == 2``, else ``out_planes``).
        stride: 1 or 2.
        groups: Groups of the 1x1 convs.
        group_first_conv: False for the network's first unit, whose input (the 24-channel stem)
            is too narrow to split, as in the paper.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, group_first_conv: bool
    ) -> None:
        super().__init__()
        mid = out_planes // 4
        first_groups = groups if group_first_conv else 1
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu3(out)


class ShuffleNetV1(nn.Module):
    """CIFAR ShuffleNetV1 with three stages ``layer1`` .. ``layer3``.

    Args:
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.
        groups: Groups of the pointwise convs (3 in the benchmarks).
        stage_planes: Output channels of the three stages.
        stage_units: Units per stage.
    """

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        *,
        groups: int = 3,
        stage_planes: tuple[int, int, int] = (240, 480, 960),
        stage_units: tuple[int, int, int] = (4, 8, 4),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        planes = 24
        for i, (out_planes, units) in enumerate(
            zip(stage_planes, stage_units, strict=True), start=1
        ):
            layers = []
            for j in range(units):
                branch = out_planes - planes if j == 0 else out_planes
                first = i == 1 and j == 0
                stride = 2 if j == 0 else 1
                layers.append(ShuffleUnit(planes, branch, stride, groups, not first))
                planes = out_planes
            self.add_module(f"layer{i}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(batch, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def shufflenetv1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1`` (groups=3), 0.95M parameters at 100 classes."""
    return ShuffleNetV1(num_classes, in_channels)
