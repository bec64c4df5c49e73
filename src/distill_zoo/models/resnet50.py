"""ResNet-50 adapted to 32x32 inputs, the large teacher of the CIFAR distillation benchmarks.

Deep Residual Learning for Image Recognition (Kaiming He, Xiangyu Zhang, Shaoqing Ren, Jian Sun,
CVPR 2016), https://arxiv.org/abs/1512.03385.

The ImageNet ResNet-50 (Bottleneck blocks, [3, 4, 6, 3] per stage, widths 256/512/1024/2048)
with its 7x7 stride-2 stem and max-pool replaced by one 3x3 stride-1 conv, as in the CRD/
RepDistiller code base (https://github.com/HobbitLong/RepDistiller, ``models/resnetv2.py``,
``ResNet50``). Stages are ``layer1`` .. ``layer4``, the head is ``fc``. This is *not*
torchvision's ``resnet50``: use ``student=torchvision student.name=resnet50`` for that one.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.models.init import init_weights


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with a residual connection.

    Args:
        in_planes: Input channels.
        planes: Channels of the 3x3 conv; the block outputs ``4 * planes``.
        stride: Stride of the 3x3 conv (2 to halve the resolution).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class CifarResNet50(nn.Module):
    """ResNet-50 with a 3x3 stride-1 stem and no max-pool, for small images.

    Args:
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.
    """

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(64, 64, 3, stride=1)
        self.layer2 = _make_stage(256, 128, 4, stride=2)
        self.layer3 = _make_stage(512, 256, 6, stride=2)
        self.layer4 = _make_stage(1024, 512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(batch, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_planes, planes, stride)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet50(num_classes: int = 100, in_channels: int = 3) -> CifarResNet50:
    """CIFAR ResNet-50 (RepDistiller's ``ResNet50``), 23.7M parameters at 100 classes."""
    return CifarResNet50(num_classes, in_channels)
