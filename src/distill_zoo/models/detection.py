"""Object detectors for small canvases: torchvision's detectors on small FPN backbones.

Build them with :func:`detection_model`, by name ``<detector>_<backbone>``:

- detectors: ``fasterrcnn`` (Faster R-CNN, Ren et al., NeurIPS 2015,
  https://arxiv.org/abs/1506.01497, with a feature pyramid: Lin et al., CVPR 2017,
  https://arxiv.org/abs/1612.03144; the two-stage detector distilled by Chen et al.,
  "Learning Efficient Object Detection Models with Knowledge Distillation", NeurIPS 2017),
  ``retinanet`` (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
  https://arxiv.org/abs/1708.02002) and ``fcos`` (Tian et al., "FCOS: Fully Convolutional
  One-Stage Object Detection", ICCV 2019, https://arxiv.org/abs/1904.01355);
- backbones: a CIFAR-zoo ResNet (``resnet8`` .. ``resnet110``, ``resnet8x4``,
  ``resnet14x4``, ``resnet32x4``; stem stride 2, so its three stages have strides 2, 4 and 8)
  or torchvision's ``resnet18``, ``resnet34``, ``resnet50`` (``layer1``-``layer3``, strides
  4, 8, 16), each with torchvision's FPN on its three stages plus a max-pooled level.

The models follow torchvision's detection API: images are a float tensor ``(B, C, H, W)`` (or
a list of ``(C, H, W)`` tensors) in [0, 1]; in train mode ``model(images, targets)`` (targets
a list of ``{"boxes": (N, 4) float xyxy pixels, "labels": (N,) int64 in 1..K-1}``, N may be 0)
returns a dict of losses, in eval mode ``model(images)`` a list of
``{"boxes", "scores", "labels"}``. ``num_classes`` counts the background (label 0).

Unlike torchvision's defaults, images are NOT resized (no 800 px upscaling: the detector sees
the canvas as it is, any size), the detector normalises them with ``image_mean`` /
``image_std``, anchors fit objects of about 8-90 px on the zoo backbones, and the proposal and
sampling counts are small, so that a training step on a batch of 64x64 images takes a fraction
of a second on a CPU. Any other torchvision argument of the detector class (e.g.
``rpn_post_nms_top_n_train``, ``box_score_thresh``, ``topk_candidates``) can be passed as a
keyword.

Distillation layers: the FPN outputs ``backbone.fpn.layer_blocks.2``, ``.1``, ``.0`` (coarse
to fine, the order in which the FPN computes them; all ``fpn_channels`` wide), or the
backbone stages ``backbone.body.layer1`` .. ``layer3``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from distill_zoo.models.registry import ZOO_NAMES, create_model
from distill_zoo.models.resnet import CifarResNet
from distill_zoo.models.torchvision_adapter import replace_stem

DETECTORS = ("fasterrcnn", "retinanet", "fcos")
"""Detector families of :func:`detection_model`."""

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50")
"""torchvision backbones of :func:`detection_model` (the others are CIFAR-zoo ResNets)."""

# Defaults of the torchvision detectors' own arguments, sized for small canvases with a few
# objects each; every one can be overridden by a keyword of detection_model.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "fasterrcnn": {
        "rpn_pre_nms_top_n_train": 200,  # per FPN level
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100,
        "rpn_post_nms_top_n_test": 50,
        "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 32,
        "box_detections_per_img": 50,
    },
    "retinanet": {"topk_candidates": 100, "detections_per_img": 50},
    "fcos": {"topk_candidates": 100, "detections_per_img": 50},
}


def _zoo_resnets() -> list[str]:
    """Zoo names whose model is a :class:`CifarResNet`."""
    return [n for n in ZOO_NAMES if n.startswith("resnet") and n != "resnet50"]


class KeepSizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without resizing: normalise and batch only.

    torchvision rescales every image so its short side is ``min_size`` (800 px by default),
    which would blow a 64x64 canvas up 12-fold; here images keep their size (boxes and
    predictions stay in input pixels) and are only normalised with ``image_mean`` /
    ``image_std`` and zero-padded to a multiple of ``size_divisible`` when batched.
    """

    def __init__(
        self, image_mean: list[float], image_std: list[float], size_divisible: int = 32
    ) -> None:
        super().__init__(
            min_size=1,
            max_size=1,
            image_mean=image_mean,
            image_std=image_std,
            size_divisible=size_divisible,
        )

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(no resize, mean={self.image_mean}, std={self.image_std}, "
            f"size_divisible={self.size_divisible})"
        )


def fpn_backbone(
    name: str,
    in_channels: int = 3,
    fpn_channels: int = 64,
    weights_backbone: str | None = None,
) -> tuple[BackboneWithFPN, list[int]]:
    """A ResNet body with torchvision's FPN on its three stages and a max-pooled extra level.

    Args:
        name: A CIFAR-zoo ResNet (stem conv made stride 2) or one of
            :data:`TORCHVISION_BACKBONES` (trainable BatchNorm, not torchvision's frozen one).
        in_channels: Channels of the input images.
        fpn_channels: Channels of every FPN level.
        weights_backbone: torchvision backbones only: ImageNet weights name, or None.

    Returns:
        The backbone (``body`` = the ResNet up to ``layer3``, ``fpn``; it returns an ordered
        dict of levels ``"0"``, ``"1"``, ``"2"``, ``"pool"``) and the strides of those levels.
    """
    return_layers = {"layer1": "0", "layer2": "1", "layer3": "2"}
    if name in _zoo_resnets():
        if weights_backbone is not None:
            raise ValueError(f"weights_backbone applies to torchvision backbones, not to {name}")
        body = create_model(name, num_classes=1, in_channels=in_channels)
        assert isinstance(body, CifarResNet)
        body.conv1.stride = (2, 2)
        widths = [
            stage[-1].conv2.out_channels for stage in (body.layer1, body.layer2, body.layer3)
        ]
        strides = [2, 4, 8, 16]
    elif name in TORCHVISION_BACKBONES:
        body = torchvision.models.get_model(name, weights=weights_backbone)
        if in_channels != 3:
            replace_stem(body, in_channels, pretrained=weights_backbone is not None)
        expansion = 4 if name == "resnet50" else 1
        widths = [64 * expansion, 128 * expansion, 256 * expansion]
        strides = [4, 8, 16, 32]
    else:
        raise ValueError(
            f"Unknown detection backbone {name!r}; choose a CIFAR-zoo ResNet "
            f"({', '.join(_zoo_resnets())}) or a torchvision one "
            f"({', '.join(TORCHVISION_BACKBONES)})"
        )
    backbone = BackboneWithFPN(
        body, return_layers, widths, fpn_channels, extra_blocks=LastLevelMaxPool()
    )
    return backbone, strides


def default_anchor_sizes(detector: str, strides: Sequence[int]) -> list[list[int]]:
    """Anchor sizes per FPN level, in input pixels.

    ``fasterrcnn``: 4 and 6 times the level's stride; ``retinanet``: 4 times the stride at
    three octave scales (x1, x2^(1/3), x2^(2/3)), as in the paper; ``fcos``: the stride (FCOS
    sizes are the location's scale: it regresses distances in units of it, and each level
    takes objects whose largest distance is 4-8 times it).
    """
    if detector == "fasterrcnn":
        return [[4 * s, 6 * s] for s in strides]
    if detector == "retinanet":
        return [[round(4 * s * 2 ** (i / 3)) for i in range(3)] for s in strides]
    return [[s] for s in strides]


def detection_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    fpn_channels: int = 64,
    representation_size: int = 256,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    weights_backbone: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a detector ``<detector>_<backbone>`` for small canvases (see the module doc).

    Args:
        name: ``fasterrcnn_resnet8``, ``retinanet_resnet32x4``, ``fcos_resnet18``, ...
        num_classes: Classes, background (label 0) included.
        in_channels: Channels of the input images.
        fpn_channels: Channels of the FPN levels (and of the one-stage detectors' heads;
            a multiple of 32 for ``fcos``, whose head has ``GroupNorm(32)``).
        representation_size: Faster R-CNN only: width of the two-layer box head.
        anchor_sizes: One list of sizes (px) per FPN level (4 levels); None for
            :func:`default_anchor_sizes`.
        aspect_ratios: Anchor height/width ratios (Faster R-CNN, RetinaNet; FCOS uses 1).
        image_mean: Per-channel mean the detector subtracts from [0, 1] images; None for
            ImageNet's with 3 channels, 0.5 otherwise.
        image_std: Per-channel std it divides by; None for ImageNet's with 3 channels, 0.25
            otherwise.
        weights_backbone: torchvision backbones only: ImageNet weights name, or None.
        **kwargs: Further arguments of torchvision's detector class, over this module's
            small-canvas defaults.

    Returns:
        The torchvision detector (:class:`~torchvision.models.detection.FasterRCNN`,
        :class:`~torchvision.models.detection.RetinaNet` or
        :class:`~torchvision.models.detection.FCOS`) with a :class:`KeepSizeTransform`.
    """
    detector, _, backbone_name = name.partition("_")
    if detector not in DETECTORS:
        raise ValueError(
            f"Unknown detector in {name!r}; names are <detector>_<backbone> with detector one "
            f"of {', '.join(DETECTORS)} (e.g. fasterrcnn_resnet8)"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if detector == "fcos" and fpn_channels % 32:
        raise ValueError(
            f"fcos needs fpn_channels divisible by 32 (its head has GroupNorm(32)), got "
            f"{fpn_channels}"
        )
    backbone, strides = fpn_backbone(backbone_name, in_channels, fpn_channels, weights_backbone)
    sizes = [list(s) for s in (anchor_sizes or default_anchor_sizes(detector, strides))]
    if len(sizes) != len(strides):
        raise ValueError(
            f"anchor_sizes needs one list per FPN level ({len(strides)} levels, strides "
            f"{strides}), got {len(sizes)}"
        )
    ratios = [1.0] if detector == "fcos" else list(aspect_ratios)
    anchors = AnchorGenerator(
        sizes=tuple(tuple(s) for s in sizes), aspect_ratios=tuple(tuple(ratios) for _ in sizes)
    )
    options = {**_DEFAULTS[detector], **kwargs}
    if detector == "fasterrcnn":
        # Boxes of 12 x (finest stride) px and below pool from the finest level, each doubling
        # of size one level up (torchvision's 224 px -> level 4 is for ImageNet-sized objects).
        roi_pool = MultiScaleRoIAlign(
            featmap_names=["0", "1", "2"],
            output_size=7,
            sampling_ratio=2,
            canonical_scale=48 * strides[0],
            canonical_level=4,
        )
        box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        model: nn.Module = FasterRCNN(
            backbone,
            num_classes=None,
            rpn_anchor_generator=anchors,
            box_roi_pool=roi_pool,
            box_head=box_head,
            box_predictor=FastRCNNPredictor(representation_size, num_classes),
            **options,
        )
    elif detector == "retinanet":
        # GroupNorm in the head's conv towers, as torchvision's RetinaNet v2 (Detectron2's
        # recipe): without it, training from scratch spikes and stalls
        head = RetinaNetHead(
            fpn_channels,
            anchors.num_anchors_per_location()[0],
            num_classes,
            norm_layer=partial(nn.GroupNorm, math.gcd(16, fpn_channels)),
        )
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **options)
    else:
        model = FCOS(backbone, num_classes, anchor_generator=anchors, **options)
    if image_mean is None:
        image_mean = [0.485, 0.456, 0.406] if in_channels == 3 else [0.5] * in_channels
    if image_std is None:
        image_std = [0.229, 0.224, 0.225] if in_channels == 3 else [0.25] * in_channels
    if len(image_mean) != in_channels or len(image_std) != in_channels:
        raise ValueError(
            f"image_mean and image_std need one value per input channel ({in_channels})"
        )
    model.transform = KeepSizeTransform(list(image_mean), list(image_std))
    return model


__all__ = [
    "DETECTORS",
    "TORCHVISION_BACKBONES",
    "KeepSizeTransform",
    "default_anchor_sizes",
    "detection_model",
    "fpn_backbone",
]
