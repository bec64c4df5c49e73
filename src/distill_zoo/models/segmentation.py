"""Semantic segmentation models: small nets on the CIFAR zoo's ResNets, and torchvision's.

Every model's ``forward(x)`` takes ``(batch, in_channels, H, W)`` images and returns
``(batch, num_classes, H, W)`` logits at the input resolution (``num_classes`` counts the
background class). Build them with :func:`segmentation_model`, by name:

- ``fcn_<zoo resnet>`` / ``psp_<zoo resnet>`` (``fcn_resnet20``, ``psp_resnet56``,
  ``fcn_resnet8x4``, ...): :class:`ZooSegmenter`, a CIFAR ResNet body (``conv1``, ``bn1``,
  ``relu``, ``layer1``-``layer3``, named as in the classification zoo) whose last stage is
  dilated instead of strided, with an FCN head (Long, Shelhamer & Darrell, "Fully Convolutional
  Networks for Semantic Segmentation", CVPR 2015, https://arxiv.org/abs/1411.4038) or a
  pyramid-pooling head (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017,
  https://arxiv.org/abs/1612.01105), and bilinear upsampling to the input size. Sized for
  small canvases (64x64 scenes): output stride 4 by default (a 16x16 map on 64x64 inputs;
  ``output_stride=2`` keeps the stem at stride 1, for 4x the cost).
- torchvision's ``fcn_resnet50``, ``fcn_resnet101``, ``deeplabv3_resnet50``,
  ``deeplabv3_resnet101``, ``deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large``,
  built without auxiliary head and with ``forward`` returning the ``"out"`` tensor only
  (:class:`FCN`, :class:`DeepLabV3`, :class:`LRASPP`). Their layer names are torchvision's
  (``backbone.layer1`` .. ``backbone.layer4``, ``classifier.0``, ...).

Features are read with forward hooks on named submodules; each config in ``conf/student``
lists them as ``feature_layers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import segmentation as tv_seg

from distill_zoo.models.init import init_weights
from distill_zoo.models.registry import ZOO_NAMES, create_model
from distill_zoo.models.resnet import BasicBlock, CifarResNet
from distill_zoo.models.torchvision_adapter import replace_stem

HEADS = ("fcn", "psp")
"""Heads of :class:`ZooSegmenter`."""

TORCHVISION_NAMES = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet101",
    "deeplabv3_resnet50",
    "fcn_resnet101",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
)
"""torchvision segmentation models :func:`segmentation_model` builds."""


def _zoo_resnets() -> list[str]:
    """Zoo names whose model is a :class:`CifarResNet` (usable as a segmentation body)."""
    return [n for n in ZOO_NAMES if n.startswith("resnet") and n != "resnet50"]


class FCNHead(nn.Module):
    """FCN head: 3x3 conv to ``in_channels // 4`` channels, BN, ReLU, dropout, 1x1 classifier.

    As torchvision's ``FCNHead``, with the pre-classifier features in ``block`` (a tensor a
    forward hook can read) and the classifier in ``classifier``.

    Args:
        in_channels: Channels of the backbone's last stage.
        num_classes: Output channels (classes, background included).
        dropout: Dropout probability before the classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        width = max(in_channels // 4, 16)
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.block(x)))


class PSPHead(nn.Module):
    """Pyramid pooling module and classifier (Zhao et al., CVPR 2017).

    The feature map is average-pooled to each of ``bins`` (1x1, 2x2, 3x3, 6x6), reduced by a 1x1
    conv to ``in_channels // len(bins)`` channels, upsampled back and concatenated with the
    input; a 3x3 conv-BN-ReLU (``block``) fuses them, then dropout and a 1x1 classifier. The
    pooled branches have a conv bias and no BatchNorm, so a training batch of one image (a
    1x1 pooled map) works.

    Args:
        in_channels: Channels of the backbone's last stage.
        num_classes: Output channels (classes, background included).
        bins: Output sizes of the pyramid's pooling levels.
        dropout: Dropout probability before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        reduced = max(in_channels // len(bins), 8)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, reduced, 1), nn.ReLU())
            for b in bins
        )
        self.block = nn.Sequential(
            nn.Conv2d(in_channels + reduced * len(bins), in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pyramid = [x] + [
            F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        return self.classifier(self.dropout(self.block(torch.cat(pyramid, dim=1))))


class ZooSegmenter(nn.Module):
    """A CIFAR-zoo ResNet body with a dilated last stage, a segmentation head, and upsampling.

    The body keeps the classification model's module names (``conv1``, ``bn1``, ``relu``,
    ``layer1``, ``layer2``, ``layer3``), so ``feature_layers`` read the same stages; ``layer3``
    keeps the resolution of ``layer2`` (stride 1, its 3x3 convs dilated by 2, as in DeepLab's
    dilated ResNets) and ``head`` turns its output into class scores, upsampled bilinearly to
    the input size.

    Args:
        body: A :class:`CifarResNet` (its ``avgpool`` and ``fc`` are dropped).
        num_classes: Classes, background included.
        head: ``"fcn"`` (:class:`FCNHead`) or ``"psp"`` (:class:`PSPHead`).
        output_stride: Input size over the size of ``layer3``'s output: 4 (the default; the
            stem conv has stride 2) or 2 (the stem keeps the classification zoo's stride 1:
            four times the cost, for canvases of 32 px and less).
        dropout: Dropout probability before the head's classifier.
    """

    def __init__(
        self,
        body: CifarResNet,
        num_classes: int,
        head: str = "fcn",
        output_stride: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"Unknown segmentation head {head!r}; choose one of {HEADS}")
        if output_stride not in (2, 4):
            raise ValueError(f"output_stride must be 2 or 4, got {output_stride}")
        self.conv1 = body.conv1
        self.conv1.stride = (output_stride // 2, output_stride // 2)
        self.bn1, self.relu = body.bn1, body.relu
        self.layer1, self.layer2, self.layer3 = body.layer1, body.layer2, body.layer3
        _dilate(self.layer3, dilation=2)
        width = self.layer3[-1].conv2.out_channels
        self.head = (
            FCNHead(width, num_classes, dropout)
            if head == "fcn"
            else PSPHead(width, num_classes, dropout=dropout)
        )
        init_weights(self.head)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``(batch, num_classes, H, W)`` logits."""
        size = x.shape[-2:]
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.interpolate(self.head(out), size=size, mode="bilinear", align_corners=False)


def _dilate(stage: nn.Sequential, dilation: int) -> None:
    """Turn a strided stage of BasicBlocks into a dilated one of the same receptive field.

    As torchvision's ``replace_stride_with_dilation``: the first block's strided conv (and its
    projection shortcut) get stride 1 and the previous dilation (1); every later 3x3 conv gets
    ``dilation`` (padding likewise, so sizes are kept).
    """
    for index, block in enumerate(stage):
        assert isinstance(block, BasicBlock)
        convs = [block.conv2] if index == 0 else [block.conv1, block.conv2]
        if index == 0:
            block.conv1.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        for conv in convs:
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


class FCN(tv_seg.FCN):
    """torchvision's FCN whose ``forward`` returns the ``"out"`` logits tensor."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)["out"]


class DeepLabV3(tv_seg.DeepLabV3):
    """torchvision's DeepLabV3 whose ``forward`` returns the ``"out"`` logits tensor."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)["out"]


class LRASPP(tv_seg.LRASPP):
    """torchvision's LR-ASPP whose ``forward`` returns the ``"out"`` logits tensor."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)["out"]


_TENSOR_OUT = {tv_seg.FCN: FCN, tv_seg.DeepLabV3: DeepLabV3, tv_seg.LRASPP: LRASPP}


def torchvision_segmenter(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    weights_backbone: str | None = None,
) -> nn.Module:
    """A torchvision segmentation model whose ``forward`` returns ``(B, K, H, W)`` logits.

    Args:
        name: One of :data:`TORCHVISION_NAMES`.
        num_classes: Classes, background included.
        in_channels: Input channels; other than 3, the backbone's stem conv is replaced
            (:func:`~distill_zoo.models.torchvision_adapter.replace_stem`).
        weights_backbone: ``None`` (random init) or an ImageNet weights name of the backbone,
            e.g. ``"DEFAULT"`` (downloaded on first use: needs internet).

    Returns:
        The model, without auxiliary head.
    """
    if name not in TORCHVISION_NAMES:
        raise ValueError(
            f"Unknown torchvision segmentation model {name!r}; choose one of "
            f"{', '.join(TORCHVISION_NAMES)}"
        )
    builder = getattr(tv_seg, name)
    model = builder(
        weights=None,
        weights_backbone=weights_backbone,
        num_classes=num_classes,
        aux_loss=False,
    )
    model.__class__ = _TENSOR_OUT[type(model)]
    if in_channels != 3:
        replace_stem(model.backbone, in_channels, pretrained=weights_backbone is not None)
    return model


def segmentation_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    output_stride: int = 4,
    dropout: float = 0.1,
    weights_backbone: str | None = None,
) -> nn.Module:
    """Build a segmentation model by name.

    Args:
        name: ``<head>_<zoo resnet>`` with head ``fcn`` or ``psp`` (``fcn_resnet20``,
            ``psp_resnet56``, ``fcn_resnet8x4``, ...; see :class:`ZooSegmenter`), or a
            torchvision name from :data:`TORCHVISION_NAMES`.
        num_classes: Classes, background included.
        in_channels: Channels of the input images.
        output_stride: Zoo models only: 4 (default) or 2; see :class:`ZooSegmenter`.
        dropout: Zoo models only: dropout before the classifier.
        weights_backbone: torchvision models only: ImageNet weights of the backbone, or None.

    Returns:
        The model; ``model(x)`` returns ``(batch, num_classes, H, W)`` logits.

    Raises:
        ValueError: For an unknown name (the message lists the valid ones) or options that do
            not apply to it.
    """
    if name in TORCHVISION_NAMES:
        if output_stride != 4:
            raise ValueError(f"output_stride applies to zoo segmenters only, not to {name}")
        return torchvision_segmenter(name, num_classes, in_channels, weights_backbone)
    head, _, backbone = name.partition("_")
    if head not in HEADS or backbone not in _zoo_resnets():
        zoo = ", ".join(f"{h}_{b}" for h in HEADS for b in _zoo_resnets())
        raise ValueError(
            f"Unknown segmentation model {name!r}. Zoo segmenters: {zoo}. torchvision: "
            f"{', '.join(TORCHVISION_NAMES)}."
        )
    if weights_backbone is not None:
        raise ValueError(f"weights_backbone applies to torchvision models only, not to {name}")
    body = create_model(backbone, num_classes=1, in_channels=in_channels)
    assert isinstance(body, CifarResNet)
    return ZooSegmenter(body, num_classes, head=head, output_stride=output_stride, dropout=dropout)
