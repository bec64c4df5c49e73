"""Wide Residual Networks for CIFAR: WRN-16-1, WRN-16-2, WRN-40-1, WRN-40-2.

Wide Residual Networks (Sergey Zagoruyko, Nikos Komodakis, BMVC 2016),
https://arxiv.org/abs/1605.07146. The small members used here are the teacher/student pairs of
Paying More Attention to Attention (Zagoruyko & Komodakis, ICLR 2017),
https://arxiv.org/abs/1612.03928, and of CRD/RepDistiller
(https://github.com/HobbitLong/RepDistiller, ``models/wrn.py``).

WRN-d-k: a 3x3 stem conv (16 channels), three stages ``block1`` .. ``block3`` of (d - 4) / 6
pre-activation blocks with 16k, 32k and 64k channels (the last two halve the resolution), a final
``bn`` + ``relu``, global average pooling and a linear head ``fc``. No dropout, as in the KD
benchmarks. Because the blocks are pre-activation, a stage's output is *before* BN/ReLU; the
activated last-stage features are the output of ``relu``.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.models.init import init_weights


class PreActBlock(nn.Module):
    """``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``; a 1x1 conv on ``relu(bn1(x))`` when the
    shape changes.

    Args:
        in_planes: Input channels.
        out_planes: Output channels.
        stride: Stride of the first conv (2 to halve the resolution).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + identity


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 (or smaller) inputs.

    Args:
        depth: Number of weighted layers, ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: Width multiplier ``k`` of the three stages.
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.
    """

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = _make_stage(widths[0], widths[1], blocks, stride=1)
        self.block2 = _make_stage(widths[1], widths[2], blocks, stride=2)
        self.block3 = _make_stage(widths[2], widths[3], blocks, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(batch, num_classes)``."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.avgpool(x).flatten(1))


def _make_stage(in_planes: int, out_planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [PreActBlock(in_planes, out_planes, stride)]
    layers += [PreActBlock(out_planes, out_planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def wrn_16_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-16-1, 0.18M parameters at 100 classes."""
    return WideResNet(16, 1, num_classes, in_channels)


def wrn_16_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-16-2, 0.70M parameters at 100 classes."""
    return WideResNet(16, 2, num_classes, in_channels)


def wrn_40_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-40-1, 0.57M parameters at 100 classes."""
    return WideResNet(40, 1, num_classes, in_channels)


def wrn_40_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-40-2, 2.26M parameters at 100 classes."""
    return WideResNet(40, 2, num_classes, in_channels)
