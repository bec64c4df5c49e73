"""Any torchvision classification model as a teacher or student.

Builds the model with :func:`torchvision.models.get_model`, optionally with pretrained weights,
and fits its head to the data set's classes and its stem to the data set's channels. Feature
layers are named as in torchvision (``layer1`` .. ``layer4`` for the ResNet family; see
``scripts/list_layers.py`` or ``model.named_modules()`` for the others).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from distill_zoo.models.registry import ZOO_NAMES

log = logging.getLogger(__name__)

# Models whose forward re-normalises the three input channels (``transform_input``).
_RGB_ONLY = ("googlenet", "inception_v3")


def torchvision_names() -> list[str]:
    """Return the sorted names of torchvision's classification models."""
    return sorted(list_models(module=torchvision.models))


def torchvision_model(
    name: str, num_classes: int, in_channels: int = 3, weights: str | None = None
) -> nn.Module:
    """Build a torchvision classification model whose ``forward`` returns logits only.

    Args:
        name: A name from ``torchvision.models.list_models(module=torchvision.models)``, e.g.
            ``resnet18``, ``mobilenet_v3_small``, ``efficientnet_b0``.
        num_classes: Size of the logit vector. With ``weights``, a head of another size is
            replaced by a freshly initialised one.
        in_channels: Channels of the input images. Other than 3, the first conv is replaced by
            one taking ``in_channels`` (pretrained RGB filters are averaged over their input
            channels and repeated, with a warning). ``googlenet`` and ``inception_v3`` only
            accept 3 channels.
        weights: ``None`` for random initialisation, or a weights name understood by torchvision,
            e.g. ``"DEFAULT"`` or ``"IMAGENET1K_V1"``. Pretrained weights are downloaded from the
            torchvision hub on first use, which needs internet access (or a filled
            ``$TORCH_HOME`` cache).

    Returns:
        The model; ``model(x)`` returns a ``(batch, num_classes)`` tensor (auxiliary classifiers
        of GoogLeNet and Inception-v3 are disabled).

    Raises:
        ValueError: For an unknown ``name`` (the message lists the valid ones), a model whose
            head or stem cannot be found, or ``in_channels != 3`` for an RGB-only model.
    """
    valid = torchvision_names()
    if name not in valid:
        hint = (
            f"{name!r} is a CIFAR zoo model: use student={name} (or teacher={name})."
            if name in ZOO_NAMES
            else "For the CIFAR zoo (resnet20, wrn_40_2, ...) use student=<zoo name>."
        )
        raise ValueError(
            f"Unknown torchvision model {name!r}. Valid names: {', '.join(valid)}. {hint}"
        )
    if in_channels != 3 and name in _RGB_ONLY:
        raise ValueError(
            f"torchvision's {name} only accepts 3-channel (RGB) input, but the data has "
            f"{in_channels} channel(s). Use a 3-channel data set, another torchvision model "
            "(e.g. resnet18), or a CIFAR zoo model (e.g. student=resnet20)."
        )
    kwargs = {"aux_logits": False} if name in _RGB_ONLY else {}
    if weights is None:
        model = get_model(name, num_classes=num_classes, **kwargs)
    else:
        weights_enum = get_model_weights(name).verify(weights)
        model = get_model(name, weights=weights_enum, **kwargs)
        pretrained_classes = len(weights_enum.meta["categories"])
        if pretrained_classes != num_classes:
            replace_head(model, pretrained_classes, num_classes)
    if in_channels != 3:
        replace_stem(model, in_channels, pretrained=weights is not None)
    return model


def replace_head(model: nn.Module, old_classes: int, num_classes: int) -> str:
    """Replace the classifier of a torchvision model by a fresh one with ``num_classes`` outputs.

    The classifier is the last ``nn.Linear`` (or 1x1 ``nn.Conv2d``, as in SqueezeNet) with
    ``old_classes`` outputs, which holds for every torchvision classification model.

    Args:
        model: The model, changed in place.
        old_classes: Number of outputs of the current classifier.
        num_classes: Number of outputs wanted.

    Returns:
        The name of the replaced module.

    Raises:
        ValueError: If no such layer exists.
    """
    head_name, head = None, None
    for module_name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.out_features == old_classes) or (
            isinstance(module, nn.Conv2d) and module.out_channels == old_classes
        ):
            head_name, head = module_name, module
    if head is None or head_name is None:
        raise ValueError(
            f"Cannot find the {old_classes}-way classifier of {type(model).__name__} to resize "
            f"it to {num_classes} classes; build it with weights=None instead."
        )
    if isinstance(head, nn.Linear):
        new: nn.Module = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:
        new = nn.Conv2d(head.in_channels, num_classes, head.kernel_size, head.stride)
    model.set_submodule(head_name, new)
    log.info("Replaced the %d-way head %r by a %d-way one", old_classes, head_name, num_classes)
    return head_name


def replace_stem(model: nn.Module, in_channels: int, pretrained: bool = False) -> str:
    """Replace the first 3-channel ``nn.Conv2d`` of a model by one taking ``in_channels``.

    Args:
        model: The model, changed in place.
        in_channels: Input channels wanted.
        pretrained: Whether the stem holds pretrained weights; if so, warn that it was adapted.
            Either way the new filters are the old ones averaged over the RGB channels, repeated
            ``in_channels`` times and scaled by ``3 / in_channels`` (so a gray image replicated
            to RGB gives the same response, and a random init keeps its scale).

    Returns:
        The name of the replaced module.

    Raises:
        ValueError: If the model has no 3-channel conv.
    """
    stem_name, stem = next(
        (
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.in_channels == 3
        ),
        (None, None),
    )
    if stem is None or stem_name is None:
        raise ValueError(
            f"{type(model).__name__} has no 3-channel input conv to adapt to {in_channels} "
            "channels. Use a 3-channel data set or a CIFAR zoo model (e.g. student=resnet20)."
        )
    new = nn.Conv2d(
        in_channels,
        stem.out_channels,
        stem.kernel_size,
        stem.stride,
        stem.padding,
        stem.dilation,
        stem.groups,
        bias=stem.bias is not None,
        padding_mode=stem.padding_mode,
    )
    with torch.no_grad():
        mean = stem.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3 / in_channels))
        if stem.bias is not None:
            new.bias.copy_(stem.bias)
    if pretrained:
        warnings.warn(
            f"Adapted the pretrained 3-channel stem {stem_name!r} to {in_channels} input "
            "channel(s) by averaging its RGB filters.",
            stacklevel=3,
        )
    model.set_submodule(stem_name, new)
    log.info("Replaced the 3-channel stem %r by a %d-channel one", stem_name, in_channels)
    return stem_name
