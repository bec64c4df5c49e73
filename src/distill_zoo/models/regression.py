"""Regression models: a multilayer perceptron for tabular data.

Every model's ``forward(x)`` returns ``(batch, D)`` values, D being the ``num_classes``
argument every model constructor takes (the task passes the number of targets there).

Image regression needs no model of its own: a classification model whose last layer is a
linear map to ``num_classes`` outputs is a regressor of ``num_classes`` values, so every
``conf/student`` classification config (``resnet20``, ``resnet56``, ``wrn_40_2``,
``torchvision``, ...) serves as it is, with the same ``feature_layers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected network: hidden blocks ``Linear -> ReLU`` (dropout between), linear head.

    The hidden blocks are ``blocks.0``, ``blocks.1``, ... (each an ``nn.Sequential`` whose
    output is the block's activation, before dropout), the head ``head``.

    Args:
        num_classes: Outputs (the regression targets' dimension D; or classes).
        in_channels: Input features.
        hidden: Widths of the hidden blocks; empty for a linear model.
        dropout: Dropout probability after each hidden block.
        name: A label for summaries (the configs' ``name``); it does not change the model.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        name: str = "mlp",
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"MLP needs in_channels (input features) and num_classes (outputs) >= 1, got "
                f"{in_channels} and {num_classes}"
            )
        self.name = name
        widths = [in_channels, *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in pairwise(widths)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``(batch, num_classes)`` outputs of ``(batch, in_channels)`` features (any
        trailing dimensions are flattened)."""
        x = x.flatten(1)
        for block in self.blocks:
            x = self.dropout(block(x))
        return self.head(x)
