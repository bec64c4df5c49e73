"""A student built from flat search parameters: the family, the depth level and the width.

Search to Distill: Pearls are Everywhere but not the Eyes (Yu Liu, Xuhui Jia, Mingxing Tan,
Raviteja Vemulapalli, Yukun Zhu, Bradley Green, Xiaogang Wang, CVPR 2020),
https://arxiv.org/abs/1911.09074, finds that the best student architecture depends on the
teacher; ``conf/hparams_search/arch_kd.yaml`` searches students through this factory.

Hydra's Optuna sweeper samples every parameter in every trial (it has no conditional
parameters), so the factory takes flat keys that are valid in every combination:

- ``family``: ``cifar_resnet`` (He et al.'s 6n+2 CIFAR ResNet), ``wrn`` (a 6n+4 Wide ResNet),
  or the name of a fixed model: a CIFAR zoo name (``mobilenetv2``, ``shufflenetv2``, ...)
  or else a torchvision classification model (``resnet18``, ...), built with random weights;
- ``blocks``: blocks per stage ``n``, the depth level a search samples: depth ``6n + 2``
  (ResNet) or ``6n + 4`` (WRN), so every level is valid for both families; or ``depth``, the
  full depth (one of the two, the other ``None``);
- ``width``: multiplier of the family's base widths: ResNet stages ``16w, 32w, 64w`` after a
  ``min(16w, 32)`` stem (w=1 is ``resnet<d>``, w=4 RepDistiller's ``resnet<d>x4``); WRN's
  widen factor ``k = w`` (a whole number), stages ``16k, 32k, 64k``.

A fixed model ignores ``blocks``, ``depth`` and ``width``: trials that differ only there build
the same network. :func:`architecture_name` gives every network one canonical name
(``resnet20``, ``resnet8x4``, ``wrn_16_2``, ``mobilenetv2``), which the search records, so
such trials show as the same architecture in the report.
"""

from __future__ import annotations

import logging

from torch import nn

from distill_zoo.models import resnet, wrn
from distill_zoo.models.registry import ZOO_NAMES, create_model
from distill_zoo.models.torchvision_adapter import torchvision_model, torchvision_names

log = logging.getLogger(__name__)

FAMILIES = ("cifar_resnet", "wrn")
"""The families whose depth and width the search sets."""


def _blocks(family: str, depth: int | None, blocks: int | None) -> int:
    """Blocks per stage from ``depth`` or ``blocks`` (exactly one given)."""
    offset, rule, examples = (
        (2, "6n+2", "8, 14, 20, 26, 32, ...")
        if family == "cifar_resnet"
        else (4, "6n+4", "10, 16, 22, 28, 40, ...")
    )
    if (depth is None) == (blocks is None):
        raise ValueError(
            f"family={family} needs either depth (the full depth, {rule}: {examples}) or "
            f"blocks (blocks per stage n >= 1), not {'both' if depth is not None else 'neither'}: "
            "set the other to null, e.g. student.depth=null student.blocks=3"
        )
    if blocks is not None:
        if int(blocks) != blocks or blocks < 1:
            raise ValueError(
                f"blocks must be a whole number >= 1 (blocks per stage), got {blocks}"
            )
        return int(blocks)
    if int(depth) != depth or depth < 6 + offset or (depth - offset) % 6:
        raise ValueError(
            f"family={family} needs a depth of the form {rule} ({examples}), got {depth}; or "
            "give blocks per stage instead (student.depth=null student.blocks=<n>)"
        )
    return (int(depth) - offset) // 6


def _resnet_widths(width: float) -> tuple[int, int, int, int]:
    if width <= 0 or (16 * width) != int(16 * width):
        raise ValueError(
            "family=cifar_resnet needs a width multiplier w > 0 with 16*w a whole number "
            f"(0.5, 1, 1.5, 2, 4, ...), got {width}"
        )
    stages = [int(16 * width * base) for base in (1, 2, 4)]
    return (min(stages[0], 32), *stages)


def _widen_factor(width: float) -> int:
    if width < 1 or int(width) != width:
        raise ValueError(
            f"family=wrn needs a whole widen factor (width 1, 2, 4, ...), got {width}: WRN-d-k "
            "widens its stages by an integer k"
        )
    return int(width)


def architecture_name(
    family: str, depth: int | None = None, blocks: int | None = None, width: float = 1.0
) -> str:
    """The canonical name of what :func:`searchable_model` builds: ``resnet20``,
    ``resnet8x4``, ``resnet14x0.5``, ``wrn_16_2``, or a fixed model's own name (its depth and
    width ignored). Raises as :func:`searchable_model` does for invalid settings."""
    if family not in FAMILIES:
        return family
    n = _blocks(family, depth, blocks)
    if family == "cifar_resnet":
        _resnet_widths(width)
        return f"resnet{6 * n + 2}" + ("" if width == 1 else f"x{width:g}")
    return f"wrn_{6 * n + 4}_{_widen_factor(width)}"


def searchable_model(
    family: str,
    num_classes: int,
    in_channels: int = 3,
    depth: int | None = None,
    blocks: int | None = None,
    width: float = 1.0,
) -> nn.Module:
    """Build the student a search trial proposes (see the module docstring for the keys).

    Args:
        family: ``cifar_resnet``, ``wrn``, or a CIFAR zoo / torchvision model name (a zoo
            name wins where both have it, e.g. ``resnet50``).
        num_classes: Size of the logit vector.
        in_channels: Channels of the input images.
        depth: Full depth (``6n + 2`` ResNet, ``6n + 4`` WRN); ``None`` when ``blocks`` is set.
        blocks: Blocks per stage ``n``; ``None`` when ``depth`` is set.
        width: Multiplier of the family's base widths.

    Returns:
        The randomly initialised model; ``model(x)`` returns ``(batch, num_classes)`` logits.

    Raises:
        ValueError: For an unknown family (the message lists the choices), both or neither of
            ``depth`` and ``blocks``, a depth of the wrong form, or an unusable width.
    """
    if family == "cifar_resnet":
        n = _blocks(family, depth, blocks)
        return resnet.CifarResNet(6 * n + 2, _resnet_widths(width), num_classes, in_channels)
    if family == "wrn":
        n = _blocks(family, depth, blocks)
        return wrn.WideResNet(6 * n + 4, _widen_factor(width), num_classes, in_channels)
    if family in ZOO_NAMES:
        log.info("family=%s is a fixed model: blocks, depth and width are ignored", family)
        return create_model(family, num_classes, in_channels)
    if family in torchvision_names():
        log.info("family=%s is a fixed model: blocks, depth and width are ignored", family)
        return torchvision_model(family, num_classes, in_channels)
    raise ValueError(
        f"Unknown student family {family!r}. Choose cifar_resnet or wrn (depth and width "
        f"searched), a CIFAR zoo model ({', '.join(ZOO_NAMES)}), or a torchvision "
        "classification model (torchvision.models.list_models(module=torchvision.models))."
    )
