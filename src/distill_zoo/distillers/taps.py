"""FeatureTap: read intermediate activations of any ``nn.Module`` by layer name.

Forward hooks record the outputs of named submodules, so no model's ``forward`` is ever
rewritten to return features (the habit of RepDistiller-style code bases). A name ending in
``:input`` records the module's input instead, e.g. ``layer3.2.relu2:input`` is the
pre-activation of the last block of ``layer3`` (what AB and OFD distil).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def layer_names(model: nn.Module, max_depth: int | None = None) -> list[str]:
    """Names of the submodules of ``model`` in order, at most ``max_depth`` levels deep."""
    names = [name for name, _ in model.named_modules() if name]
    if max_depth is not None:
        names = [n for n in names if n.count(".") < max_depth]
    return names


INPUT_SUFFIX = ":input"


def module_name(name: str) -> str:
    """The submodule a tap name refers to (``layer3.2.relu2:input`` -> ``layer3.2.relu2``)."""
    return name.removesuffix(INPUT_SUFFIX)


def check_layers(model: nn.Module, names: list[str], role: str = "model") -> None:
    """Raises ``ValueError`` naming the valid choices if any of ``names`` is not a submodule."""
    valid = set(layer_names(model))
    unknown = [n for n in names if module_name(n) not in valid]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=3)
        hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    shallow = layer_names(model, max_depth=2)
    raise ValueError(
        f"unknown layer {', '.join(hints)} in the {role} ({type(model).__name__}). "
        f"Valid names (two levels deep; `python scripts/list_layers.py <arch>` lists all): "
        f"{', '.join(shallow)}"
    )


class FeatureTap:
    """Records the outputs of named submodules on every forward pass.

    Example:
        >>> tap = FeatureTap(model, ["layer2", "layer3"])
        >>> logits = model(images)
        >>> tap.features["layer3"].shape

    Args:
        model: Any module; names are those of ``model.named_modules()``, optionally ending
            in ``:input`` to record the module's (first) input rather than its output.
        names: Layers to record. Unknown names fail here, listing the valid ones.
        role: How error messages refer to the model ("student", "teacher").
    """

    def __init__(self, model: nn.Module, names: list[str], role: str = "model") -> None:
        names = list(dict.fromkeys(names))
        check_layers(model, names, role)
        self.names = names
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = [
            model.get_submodule(module_name(name)).register_forward_hook(self._recorder(name))
            for name in names
        ]

    def _recorder(self, name: str):
        take_input = name.endswith(INPUT_SUFFIX)

        def record(_module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.features[name] = inputs[0] if take_input else output

        return record

    def pop(self) -> dict[str, Tensor]:
        """Returns the features of the last forward pass and forgets them (frees memory)."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        """Detaches the hooks; the model runs as if never tapped."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features = {}


def probe_shapes(
    model: nn.Module, names: list[str], example_input: Tensor
) -> dict[str, tuple[int, ...]]:
    """Output shapes of the layers ``names`` of ``model`` on ``example_input``.

    Runs one forward pass in eval mode without gradients, so BatchNorm statistics are left
    as they were, and restores the model's train/eval mode afterwards.
    """
    tap = FeatureTap(model, names)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
        return {name: tuple(feature.shape) for name, feature in tap.pop().items()}
    finally:
        tap.remove()
        model.train(was_training)


def select_layers(
    stages: list[str], choice: str | int | list | None, default: str | int
) -> list[str]:
    """Layer names from a portable choice over a model's stages (zoo ``feature_layers``).

    Args:
        stages: The model's stage layers in forward order.
        choice: ``"all"``, ``"last"``, an int index into ``stages`` (negative counts from the
            end), a list of such ints, a list of explicit layer names, or ``None`` for
            ``default``.
        default: The method's own default, in the same forms.

    Raises:
        ValueError: an index outside ``stages``, or a portable choice on a model whose config
            names no ``feature_layers``.
    """
    choice = default if choice is None else choice
    if isinstance(choice, str) and choice not in ("all", "last"):
        return [choice]
    if isinstance(choice, Sequence) and not isinstance(choice, str):
        choice = list(choice)  # Hydra passes ListConfig
        if all(isinstance(c, str) for c in choice):
            return choice
    if not stages:
        raise ValueError(
            f"layer choice {choice!r} needs the model's stage layers, but its config names no "
            "feature_layers: add them to the student/teacher config or name layers explicitly"
        )
    if choice == "all":
        return list(stages)
    if choice == "last":
        return [stages[-1]]
    indices = [choice] if isinstance(choice, int) else list(choice)
    for i in indices:
        if not -len(stages) <= i < len(stages):
            raise ValueError(f"stage index {i} is outside the {len(stages)} stages {stages}")
    return [stages[i] for i in indices]
