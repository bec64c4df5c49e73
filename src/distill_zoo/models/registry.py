"""Name -> constructor table of the CIFAR model zoo, and :func:`create_model`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from distill_zoo.models import mobilenetv2, resnet, resnet50, shufflenetv1, shufflenetv2, vgg, wrn

_ZOO: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet8": resnet.resnet8,
    "resnet14": resnet.resnet14,
    "resnet20": resnet.resnet20,
    "resnet32": resnet.resnet32,
    "resnet44": resnet.resnet44,
    "resnet56": resnet.resnet56,
    "resnet110": resnet.resnet110,
    "resnet8x4": resnet.resnet8x4,
    "resnet14x4": resnet.resnet14x4,
    "resnet32x4": resnet.resnet32x4,
    "resnet50": resnet50.resnet50,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "mobilenetv2": mobilenetv2.mobilenetv2,
    "shufflenetv1": shufflenetv1.shufflenetv1,
    "shufflenetv2": shufflenetv2.shufflenetv2,
}

ZOO_NAMES: list[str] = sorted(_ZOO)


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a model of the CIFAR zoo by name.

    Args:
        name: One of :data:`ZOO_NAMES` (``resnet20``, ``resnet32x4``, ``wrn_40_2``, ``vgg13``,
            ``mobilenetv2``, ``shufflenetv1``, ...).
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.

    Returns:
        The randomly initialised model; ``model(x)`` returns ``(batch, num_classes)`` logits.

    Raises:
        ValueError: For an unknown name; the message lists the zoo and how to get a torchvision
            model instead.
    """
    try:
        constructor = _ZOO[name]
    except KeyError:
        raise ValueError(
            f"Unknown zoo model {name!r}. Zoo models: {', '.join(ZOO_NAMES)}. "
            "For a torchvision model use student=torchvision student.name=<torchvision name> "
            "(or teacher=torchvision teacher.name=<torchvision name>)."
        ) from None
    return constructor(num_classes, in_channels)
