"""VGG with batch normalisation for CIFAR: VGG-8, 11, 13, 16 and 19.

Very Deep Convolutional Networks for Large-Scale Image Recognition (Karen Simonyan, Andrew
Zisserman, ICLR 2015), https://arxiv.org/abs/1409.1556.

The CIFAR variant of the CRD/RepDistiller code base
(https://github.com/HobbitLong/RepDistiller, ``models/vgg.py``, the ``*_bn`` models): five conv
blocks ``block0`` .. ``block4`` (3x3 conv + BN + ReLU each; 64, 128, 256, 512, 512 channels),
max-pools ``pool0`` .. ``pool3`` between them, global average pooling ``pool4`` and a single
linear ``classifier`` (no 4096-wide FC layers). VGG-8 has one conv per block. Conv layers keep
their bias, as in the reference.

Each block ends with its ReLU; the pre-activation features are the output of the block's last BN
(for example ``block1.1`` in VGG-8). As in the reference, ``pool3`` is only applied to inputs of
64 px or more, so a 32x32 image reaches ``block4`` at 4x4 (and a 16x16 one at 2x2).
"""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.models.init import init_weights

_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}
_POOL3_MIN_INPUT = 64


class VGG(nn.Module):
    """VGG-BN with five conv blocks and a linear classifier on globally pooled features.

    Args:
        blocks: Output channels of each conv in each of the five blocks.
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.
    """

    def __init__(
        self, blocks: list[list[int]], num_classes: int = 100, in_channels: int = 3
    ) -> None:
        super().__init__()
        if len(blocks) != 5:
            raise ValueError(f"VGG needs five blocks of conv widths, got {len(blocks)}")
        channels = in_channels
        for i, widths in enumerate(blocks):
            self.add_module(f"block{i}", _make_block(channels, widths))
            channels = widths[-1]
            pool = nn.MaxPool2d(2) if i < 4 else nn.AdaptiveAvgPool2d(1)
            self.add_module(f"pool{i}", pool)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(batch, num_classes)``."""
        big_input = x.shape[-2] >= _POOL3_MIN_INPUT
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if big_input:
            x = self.pool3(x)
        x = self.pool4(self.block4(x))
        return self.classifier(x.flatten(1))


def _make_block(in_channels: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)


def vgg8(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-8-BN (one conv per block), 3.97M parameters at 100 classes."""
    return VGG(_CONFIGS["vgg8"], num_classes, in_channels)


def vgg11(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-11-BN (configuration A), 9.28M parameters at 100 classes."""
    return VGG(_CONFIGS["vgg11"], num_classes, in_channels)


def vgg13(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-13-BN (configuration B), 9.46M parameters at 100 classes."""
    return VGG(_CONFIGS["vgg13"], num_classes, in_channels)


def vgg16(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-16-BN (configuration D), 14.77M parameters at 100 classes."""
    return VGG(_CONFIGS["vgg16"], num_classes, in_channels)


def vgg19(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-19-BN (configuration E), 20.09M parameters at 100 classes."""
    return VGG(_CONFIGS["vgg19"], num_classes, in_channels)
