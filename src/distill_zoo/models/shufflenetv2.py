"""ShuffleNetV2 (1x) as used as a student in the CIFAR distillation benchmarks.

ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design (Ningning Ma, Xiangyu
Zhang, Hai-Tao Zheng, Jian Sun, ECCV 2018), https://arxiv.org/abs/1807.11164.

The ``ShuffleV2`` model (``net_size=1``) of the CRD/RepDistiller code base
(https://github.com/HobbitLong/RepDistiller, ``models/ShuffleNetv2.py``): a 1x1 stem conv to
24 channels (no stride, no max-pool), three stages ``layer1`` .. ``layer3`` with 116, 232 and 464
channels, each a stride-2 down-sampling unit followed by 3, 7 and 3 channel-split units, then
``conv2``/``bn2``/``relu2`` (1x1 to 1024 channels), global average pooling and ``fc``.
A 32x32 image reaches ``layer3`` at 4x4, a 16x16 one at 2x2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_zoo.models.init import init_weights
from distill_zoo.models.shufflenetv1 import ChannelShuffle


class SplitUnit(nn.Module):
    """Keep half the channels, send the other half through 1x1, 3x3 depthwise, 1x1; concatenate
    and shuffle.

    Args:
        channels: Input and output channels (even).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu3 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        kept, branch = x.chunk(2, dim=1)
        out = self.relu1(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = self.relu3(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([kept, out], 1))


class DownUnit(nn.Module):
    """Two stride-2 branches on the full input, each giving half the output channels.

    Left: 3x3 depthwise (stride 2), 1x1. Right: 1x1, 3x3 depthwise (stride 2), 1x1.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (even).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu3(self.bn3(self.conv3(x)))
        right = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNetV2 with three stages ``layer1`` .. ``layer3``.

    Args:
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.
        stage_channels: Output channels of the three stages.
        stage_units: Channel-split units per stage (after the down-sampling unit).
        last_channels: Channels of the final 1x1 conv.
    """

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        *,
        stage_channels: tuple[int, int, int] = (116, 232, 464),
        stage_units: tuple[int, int, int] = (3, 7, 3),
        last_channels: int = 1024,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        channels = 24
        for i, (out, units) in enumerate(zip(stage_channels, stage_units, strict=True), start=1):
            layers = [DownUnit(channels, out)] + [SplitUnit(out) for _ in range(units)]
            self.add_module(f"layer{i}", nn.Sequential(*layers))
            channels = out
        self.conv2 = nn.Conv2d(channels, last_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(batch, num_classes)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.avgpool(x).flatten(1))


def shufflenetv2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (``net_size=1``), 1.36M parameters at 100 classes."""
    return ShuffleNetV2(num_classes, in_channels)
