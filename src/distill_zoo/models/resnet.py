"""CIFAR ResNets, the 6n+2 family used throughout the knowledge-distillation literature.

Deep Residual Learning for Image Recognition (Kaiming He, Xiangyu Zhang, Shaoqing Ren, Jian Sun,
CVPR 2016), https://arxiv.org/abs/1512.03385, Section 4.2.

A 3x3 stem conv, three stages of ``n`` BasicBlocks (``layer1``, ``layer2``, ``layer3``; the last
two halve the resolution), global average pooling and a linear head ``fc``; depth = 6n + 2.
Layout and widths follow the CRD/RepDistiller code base
(https://github.com/HobbitLong/RepDistiller, ``models/resnet.py``): the plain models use 16/32/64
channels after a 16-channel stem, the ``x4`` models 64/128/256 after a 32-channel stem, and a
stage that changes shape uses a 1x1-conv projection shortcut (He et al.'s option B).

Every activation is its own non-in-place module, so a forward hook on any submodule sees an
output that later layers do not overwrite.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.models.init import init_weights


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (2 to halve the resolution).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem, three stages of BasicBlocks, global pooling, linear head.

    Works on any input size (e.g. 16x16 digits) thanks to adaptive average pooling.

    Args:
        depth: Number of weighted layers, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
        widths: Channels of the stem and of the three stages.
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.
    """

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        blocks = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(stem, w1, blocks, stride=1)
        self.layer2 = _make_stage(w1, w2, blocks, stride=2)
        self.layer3 = _make_stage(w2, w3, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(batch, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


_PLAIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def resnet8(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 (n=1), 0.08M parameters at 100 classes."""
    return CifarResNet(8, _PLAIN, num_classes, in_channels)


def resnet14(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-14 (n=2), 0.18M parameters at 100 classes."""
    return CifarResNet(14, _PLAIN, num_classes, in_channels)


def resnet20(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3), 0.28M parameters at 100 classes."""
    return CifarResNet(20, _PLAIN, num_classes, in_channels)


def resnet32(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (n=5), 0.47M parameters at 100 classes."""
    return CifarResNet(32, _PLAIN, num_classes, in_channels)


def resnet44(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-44 (n=7), 0.67M parameters at 100 classes."""
    return CifarResNet(44, _PLAIN, num_classes, in_channels)


def resnet56(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (n=9), 0.86M parameters at 100 classes."""
    return CifarResNet(56, _PLAIN, num_classes, in_channels)


def resnet110(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (n=18), 1.74M parameters at 100 classes."""
    return CifarResNet(110, _PLAIN, num_classes, in_channels)


def resnet8x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 with 4x wider stages (CRD's student), 1.23M parameters at 100 classes."""
    return CifarResNet(8, _X4, num_classes, in_channels)


def resnet14x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-14 with 4x wider stages: a teacher assistant between resnet32x4 and resnet8x4
    (TAKD's chains)."""
    return CifarResNet(14, _X4, num_classes, in_channels)


def resnet32x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 with 4x wider stages (CRD's teacher), 7.43M parameters at 100 classes."""
    return CifarResNet(32, _X4, num_classes, in_channels)
