"""The weight initialisation shared by the CIFAR zoo (as in the reference CIFAR models)."""

from __future__ import annotations

from torch import nn


def init_weights(
    model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False
) -> None:
    """Kaiming-normal convolutions (He et al., ICCV 2015, fan_out), BatchNorm weight 1 and
    bias 0, conv biases 0.

    Args:
        model: Model to initialise in place.
        linear_std: If set, Linear weights are drawn from N(0, linear_std^2) and their biases
            zeroed (VGG, MobileNetV2); else Linear layers keep PyTorch's default.
        zero_linear_bias: Zero the Linear biases only (WRN).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)
