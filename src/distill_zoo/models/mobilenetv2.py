"""MobileNetV2 (width 0.5, expansion 6) as used as a student in the CIFAR distillation benchmarks.

MobileNetV2: Inverted Residuals and Linear Bottlenecks (Mark Sandler, Andrew Howard, Menglong
Zhu, Andrey Zhmoginov, Liang-Chieh Chen, CVPR 2018), https://arxiv.org/abs/1801.04381.

This is the ``mobile_half`` model of the CRD/RepDistiller code base
(https://github.com/HobbitLong/RepDistiller, ``models/mobilenetv2.py``, from Jin et al.,
Knowledge Distillation via Route Constrained Optimization, ICCV 2019): the ImageNet layout with
width multiplier 0.5, expansion ratio 6, ReLU (not ReLU6), a 1280-channel last conv and a
3x3 stem conv of stride 2, so a 32x32 image is reduced 16x to 2x2 (a 16x16 one to 1x1).

The seven bottleneck sequences of the paper are grouped by output resolution into four stages,
which are the stage ends that RepDistiller taps for feature distillation:

    layer1: t=1 c=8 n=1 s=1, t=6 c=12 n=2 s=1   (1/2 of the input size)
    layer2: t=6 c=16 n=3 s=2                   (1/4)
    layer3: t=6 c=32 n=4 s=2, t=6 c=48 n=3 s=1  (1/8)
    layer4: t=6 c=80 n=3 s=2, t=6 c=160 n=1 s=1 (1/16)

followed by ``conv2``/``bn2``/``relu2`` (1x1 to 1280 channels), global average pooling and ``fc``.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.models.init import init_weights

# (expansion t, output channels c at width 1.0, repeats n, stride s of the first repeat)
_STAGES: list[list[tuple[int, int, int, int]]] = [
    [(1, 16, 1, 1), (6, 24, 2, 1)],
    [(6, 32, 3, 2)],
    [(6, 64, 4, 2), (6, 96, 3, 1)],
    [(6, 160, 3, 2), (6, 320, 1, 1)],
]


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU, 3x3 depthwise + ReLU, 1x1 linear projection; residual when shapes match.

    The expansion conv is kept even for ``expand_ratio=1``, as in the reference.

    Args:
        in_planes: Input channels.
        out_planes: Output channels.
        stride: Stride of the depthwise conv.
        expand_ratio: Hidden width as a multiple of ``in_planes``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_planes * expand_ratio
        self.use_residual = stride == 1 and in_planes == out_planes
        self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 with four resolution stages ``layer1`` .. ``layer4``.

    Args:
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.
        width_mult: Channel multiplier of the stem and the bottlenecks (0.5 for ``mobile_half``).
        expand_ratio: Expansion ``T`` of every bottleneck sequence but the first.
        stem_stride: Stride of the stem conv; 2 in the reference. 1 keeps 4x more spatial
            positions (and FLOPs) everywhere, which is not the benchmark model.
    """

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        *,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        for i, stage in enumerate(_STAGES, start=1):
            blocks: list[nn.Module] = []
            for t, c, n, s in stage:
                out = int(c * width_mult)
                t = t if t == 1 else expand_ratio
                for j in range(n):
                    blocks.append(InvertedResidual(channels, out, s if j == 0 else 1, t))
                    channels = out
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Conv2d(channels, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(batch, num_classes)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.avgpool(x).flatten(1))


def mobilenetv2(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller's ``mobile_half`` (width 0.5, T=6), 0.81M parameters at 100 classes."""
    return MobileNetV2(num_classes, in_channels)
