"""Structured pruning: remove whole channels of a trained network until it is small enough.

Channels are removed with torch-pruning's dependency graph (Fang, Ma, Song, Mi & Wang,
"DepGraph: Towards Any Structural Pruning", CVPR 2023, https://arxiv.org/abs/2301.12900):
layers whose channels are coupled (a residual sum, a concatenation, a depthwise convolution and
the layer feeding it, the BatchNorm after a convolution) lose the same channels together, so
any network torch-pruning can trace stays valid. What is removed is a real, smaller dense
network (no masks), which ``prune_kd`` then fine-tunes with a distiller, the unpruned network
as its teacher. :class:`PruneSpec` says how much to remove and how channels
are ranked; the pruned sizes are recorded by :mod:`distill_zoo.models.pruned_structure` so a
checkpoint can be loaded into a model rebuilt from its config.

torch-pruning is an optional extra (``pip install -e ".[prune]"``), imported on first use.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill_zoo.models.pruned_structure import record
from distill_zoo.shipping.compression import count_macs, count_parameters

IMPORTANCES = ("l1", "bn_scale", "taylor")
SCOPES = ("layer", "global")
TARGETS = ("macs", "params")
INSTALL = 'pip install -e ".[prune]"'

MAX_CHANNEL_RATIO = 0.95
"""The largest channel fraction the search asks torch-pruning to remove from a layer."""

SEARCH_RESOLUTION = 1 / 4096
"""The bisection stops when its interval of channel fractions is this narrow."""

CLOSE_ENOUGH = 0.002
"""The search stops once the target quantity is this fraction of its start value below the
target (or closer)."""

Backward = Callable[[nn.Module], Any]


def torch_pruning():
    """The ``torch_pruning`` module, or an ImportError naming the command that installs it."""
    try:
        import torch_pruning as tp
    except ImportError as err:
        raise ImportError(
            f"Pruning needs torch-pruning, an optional extra of distill_zoo: {INSTALL}"
        ) from err
    return tp


@dataclass(frozen=True)
class PruneSpec:
    """How to prune a network: which channels go, ranked how, until what is small enough.

    Channels are removed with DepGraph (Fang et al., "DepGraph: Towards Any Structural
    Pruning", CVPR 2023, https://arxiv.org/abs/2301.12900) as torch-pruning implements it; a
    channel's importance is summed over its whole dependency group (every layer that loses it):

    - ``l1``: the L1 norm of the channel's weights (Li, Kadav, Durdanovic, Samet & Graf,
      "Pruning Filters for Efficient ConvNets", ICLR 2017, https://arxiv.org/abs/1608.08710),
      averaged over the group's layers (torch-pruning's group L1 magnitude).
    - ``bn_scale``: the absolute BatchNorm scale ``|gamma|`` of the channel (Liu, Li, Shen,
      Huang, Yan & Zhang, "Learning Efficient Convolutional Networks through Network
      Slimming", ICCV 2017, https://arxiv.org/abs/1708.06519). Needs BatchNorm layers;
      channels of groups without one are kept.
    - ``taylor``: the first-order Taylor estimate ``|w * dL/dw|`` of the loss change when the
      channel is removed (Molchanov, Mallya, Tyree, Frosio & Kautz, "Importance Estimation
      for Neural Network Pruning", CVPR 2019, https://arxiv.org/abs/1906.10771). Needs the
      gradients of the task loss: :meth:`prune` takes a ``backward`` callable.

    Args:
        importance: ``l1``, ``bn_scale`` or ``taylor`` (above).
        scope: ``layer``: every prunable layer loses the same fraction of its channels;
            ``global``: channels are ranked across all layers (torch-pruning's
            ``global_pruning``, importances normalised by their group's mean), so layers lose
            different fractions.
        target: ``macs`` (multiply-accumulates per image, as in the compression report) or
            ``params``: what ``ratio`` is a fraction of.
        ratio: Fraction of the target quantity to remove, in ``(0, 1)``: 0.5 halves it.
        steps: torch-pruning's iterative steps: channels are removed in ``steps`` rounds,
            importances re-estimated (gradients recomputed, for ``taylor``) between rounds.
        round_to: Keep every pruned layer's channel count a multiple of this (e.g. 8, for
            fast kernels), or ``None``.

    Raises:
        ValueError: For a choice not listed above, a ``ratio`` outside ``(0, 1)``,
            ``steps < 1`` or ``round_to < 1``.
    """

    importance: str = "l1"
    scope: str = "layer"
    target: str = "macs"
    ratio: float = 0.5
    steps: int = 5
    round_to: int | None = None

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("importance", self.importance, IMPORTANCES),
            ("scope", self.scope, SCOPES),
            ("target", self.target, TARGETS),
        ):
            if value not in choices:
                raise ValueError(
                    f"Unknown pruning {key} {value!r}; choose one of {', '.join(choices)}"
                )
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
            raise ValueError(f"Pruning ratio must be a number in (0, 1), got {self.ratio!r}")
        if not 0 < self.ratio < 1:
            raise ValueError(
                f"Pruning ratio is the fraction of the {self.target} to remove and must lie in "
                f"(0, 1), got {self.ratio}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Pruning steps must be an integer >= 1, got {self.steps!r}")
        if self.round_to is not None and (
            isinstance(self.round_to, bool)
            or not isinstance(self.round_to, int)
            or self.round_to < 1
        ):
            raise ValueError(f"round_to must be None or an integer >= 1, got {self.round_to!r}")

    def prune(
        self,
        model: nn.Module,
        example_input: Tensor,
        *,
        backward: Backward | None = None,
        ignored_layers: Iterable[nn.Module | str] | None = None,
        name: str | None = None,
    ) -> dict:
        """Prunes ``model`` in place until the target quantity is at most ``1 - ratio`` of
        its start value.

        torch-pruning's ``pruning_ratio`` is a fraction of channels, not of MACs or
        parameters (a layer that keeps half its input and half its output channels keeps a
        quarter of its MACs; layers torch-pruning may not touch keep all of theirs), so the
        channel fraction that meets the target is searched for: a bisection over channel
        fractions in ``[0, 0.95]``, first probing ``1 - sqrt(1 - ratio)`` (exact if every
        layer's cost scaled with the square of its width), each probe pruned (in ``steps``
        rounds) on a deep copy of the model and measured. It stops when the interval is
        narrower than 1/4096 or a probe lands within 0.2% of the start value below the
        target; the model itself is then pruned at the smallest fraction that met it (pruning
        is deterministic: this is the very structure measured). A search, rather than stopping
        torch-pruning's rounds once the target is met, keeps the result close to the target
        whatever ``steps`` is. The quantity ends at most the target, and below it by no more
        than one channel of every layer costs: with ``scope="layer"`` every layer loses the
        same fraction, so narrow layers make coarse steps (resnet20, 16 channels wide at
        first, keeps 21.6% of its MACs for a 25% target; vgg8, mobilenetv2 and resnet32x4 come
        within 1%); with ``scope="global"`` one channel at a time, within about 1%.
        Each probe costs a pruning and a forward pass (0.1-1 s for the CIFAR zoo on a CPU
        thread); a search takes 1 to 13 probes. An error during the search leaves the model
        unpruned; one in the final pruning (a failing ``backward``, say) may leave it partly
        pruned: build it afresh.

        Layers producing the model's outputs (a classifier's last ``Linear``, a segmentation
        head's final classifier conv, those of an auxiliary head or of every branch summed
        into the output) keep their output channels: they are found on torch-pruning's graph
        by walking back from each output to the first convolutions or linear layers.

        The model is traced, measured and pruned in eval mode (BatchNorm statistics are not
        touched, dropout is off), then put back in the mode it was in; parameters keep their
        ``requires_grad``, and gradients are cleared.

        Args:
            model: The trained network (any ``nn.Module`` torch-pruning can trace).
            example_input: A batch of inputs of the data's shape, on the model's device; MACs
                are counted per image (its first), as in the compression report.
            backward: ``backward(model)`` runs the task loss on a few fixed batches and calls
                ``.backward()``; needed by ``importance="taylor"`` (called with the model in
                eval mode, once per round per candidate), ignored otherwise.
            ignored_layers: More layers (modules of ``model``, or their names) whose output
                channels are kept, with everything inside them.
            name: The model's name in error messages (default: its class name).

        Returns:
            ``{"before": {"params": int, "macs": int}, "after": {...}, "structure":
            pruned_structure.record(model), "channel_ratio": float}``: parameters and MACs
            per image before and after, the record to save with the checkpoint, and the
            channel fraction torch-pruning was asked to remove.

        Raises:
            ImportError: Without torch-pruning (the message gives the install command).
            ValueError: ``taylor`` without ``backward``, ``bn_scale`` on a model without
                BatchNorm, an ignored layer the model does not have, a target that cannot be
                reached, or a model torch-pruning cannot prune (its error, with the name).
        """
        tp = torch_pruning()
        label = name or type(model).__name__
        if self.importance == "taylor" and backward is None:
            raise ValueError(
                "importance='taylor' needs gradients of the task loss: pass "
                "backward=<callable(model) that runs the loss on a few fixed batches and calls "
                ".backward()>, or choose importance 'l1' or 'bn_scale'"
            )
        if self.importance == "bn_scale" and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ):
            raise ValueError(
                f"importance='bn_scale' ranks channels by BatchNorm scales, but the {label} "
                "model has no BatchNorm layer; choose importance 'l1' or 'taylor'"
            )
        if (
            not isinstance(example_input, Tensor)
            or example_input.ndim < 1
            or not len(example_input)
        ):
            raise ValueError("example_input must be a batch of at least one input tensor")

        was_training = model.training
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(True)
            result = self._prune(tp, model, example_input, backward, ignored_layers, label)
        finally:
            model.train(was_training)
            for n, p in model.named_parameters():
                p.requires_grad_(requires_grad.get(n, True))
                p.grad = None
        result["structure"] = record(model)
        return result

    def _prune(
        self,
        tp,
        model: nn.Module,
        example_input: Tensor,
        backward: Backward | None,
        ignored_layers: Iterable[nn.Module | str] | None,
        label: str,
    ) -> dict:
        """:meth:`prune` on a model in eval mode."""
        before = _sizes(model, example_input)
        shapes = _output_shapes(model, example_input)
        ignored = sorted(
            {*_output_layers(tp, model, example_input, label), *_names(model, ignored_layers)}
        )
        goal = (1 - self.ratio) * before[self.target]
        backward = backward if self.importance == "taylor" else None

        def measure_at(channel_ratio: float) -> int:
            candidate = copy.deepcopy(model)
            self._prune_at(tp, candidate, example_input, channel_ratio, ignored, backward, label)
            with _cannot_prune(label):
                pruned_shapes = _output_shapes(candidate, example_input)
                measured = _sizes(candidate, example_input)[self.target]
            if pruned_shapes != shapes:
                raise ValueError(
                    f"torch-pruning cannot prune the {label} model: pruning changed its output "
                    f"shapes from {shapes} to {pruned_shapes}; name the layers producing its "
                    "outputs in ignored_layers"
                )
            return measured

        first_guess = 1 - math.sqrt(1 - self.ratio)  # exact when every channel count scales
        channel_ratio, reached = _search(measure_at, goal, before[self.target], first_guess)
        if reached > goal:
            raise ValueError(
                f"Pruning cannot remove {self.ratio:.0%} of the {label} model's "
                f"{self.target}: removing {MAX_CHANNEL_RATIO:.0%} of the channels "
                f"({self.scope} scope) leaves {reached / before[self.target]:.1%}; the layers "
                f"whose output channels are kept are {', '.join(ignored) or 'none'}. Choose a "
                "smaller ratio (or fewer ignored_layers)"
            )
        self._prune_at(tp, model, example_input, channel_ratio, ignored, backward, label)
        after = _sizes(model, example_input)
        return {"before": before, "after": after, "channel_ratio": channel_ratio}

    def _prune_at(
        self,
        tp,
        model: nn.Module,
        example_input: Tensor,
        channel_ratio: float,
        ignored: list[str],
        backward: Backward | None,
        label: str,
    ) -> None:
        """Removes ``channel_ratio`` of the channels of ``model`` in ``steps`` rounds."""
        importance = {
            "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "bn_scale": lambda: tp.importance.BNScaleImportance(),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
        }[self.importance]()
        with _cannot_prune(label):
            pruner = tp.pruner.BasePruner(
                model,
                example_input,
                importance=importance,
                global_pruning=self.scope == "global",
                pruning_ratio=channel_ratio,
                iterative_steps=self.steps,
                ignored_layers=[model.get_submodule(n) for n in ignored],
                round_to=self.round_to,
            )
        for _ in range(self.steps):
            if backward is not None:
                model.zero_grad(set_to_none=True)
                backward(model)
            with _cannot_prune(label):
                pruner.step()
        model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _cannot_prune(label: str) -> Iterator[None]:
    """Turns an error of torch-pruning (or of the pruned model's forward) into a ValueError
    naming the model."""
    try:
        yield
    except Exception as error:
        raise ValueError(
            f"torch-pruning cannot prune the {label} model: {type(error).__name__}: {error}"
        ) from error


def _search(
    measure: Callable[[float], int], goal: float, start: int, first_guess: float
) -> tuple[float, int]:
    """The smallest channel fraction (to :data:`SEARCH_RESOLUTION`) whose pruned model
    measures at most ``goal``, by bisection over ``[0, MAX_CHANNEL_RATIO]``
    starting at ``first_guess``; stops early once within :data:`CLOSE_ENOUGH` of ``goal``.

    Returns:
        The fraction and its measure; where even ``MAX_CHANNEL_RATIO`` misses ``goal``, that
        fraction and its measure (above ``goal``).
    """
    low, high, reached = 0.0, MAX_CHANNEL_RATIO, None
    probe = min(max(first_guess, 0.0), MAX_CHANNEL_RATIO)
    while high - low > SEARCH_RESOLUTION:
        value = measure(probe)
        if value <= goal:
            high, reached = probe, value
            if goal - value <= CLOSE_ENOUGH * start:
                break
        else:
            low = probe
        probe = (low + high) / 2
    if reached is None:
        high, reached = MAX_CHANNEL_RATIO, measure(MAX_CHANNEL_RATIO)
    return high, reached


def _sizes(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Parameters and MACs per image, as the compression report counts them."""
    return {"params": count_parameters(model), "macs": count_macs(model, example_input)}


def _output_shapes(model: nn.Module, example_input: Tensor) -> Any:
    """The shapes of ``model``'s outputs, in the structure of its output."""

    def shapes(value: Any) -> Any:
        if isinstance(value, Tensor):
            return tuple(value.shape)
        if isinstance(value, dict):
            return {key: shapes(v) for key, v in value.items()}
        if isinstance(value, list | tuple):
            return [shapes(v) for v in value]
        return None

    with torch.inference_mode():
        return shapes(model(example_input))


def _output_layers(tp, model: nn.Module, example_input: Tensor, label: str) -> list[str]:
    """Names of the convolutions and linear layers producing ``model``'s outputs: the first
    ones met walking back from each output of torch-pruning's graph (through upsampling,
    flattening, normalisation, sums of branches)."""
    with _cannot_prune(label):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    names = {module: module_name for module_name, module in model.named_modules()}
    found: set[str] = set()
    stack = [node for node in graph.module2node.values() if not node.outputs]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, nn.modules.conv._ConvNd | nn.Linear) and node.module in names:
            found.add(names[node.module])
        else:
            stack.extend(node.inputs)
    return sorted(found)


def _names(model: nn.Module, layers: Iterable[nn.Module | str] | None) -> list[str]:
    """Names in ``model`` of ``layers`` (modules of it, or names), checked."""
    modules = dict(model.named_modules())
    names = {module: module_name for module_name, module in modules.items()}
    found = []
    for layer in layers or ():
        if isinstance(layer, str) and layer in modules:
            found.append(layer)
        elif isinstance(layer, nn.Module) and layer in names:
            found.append(names[layer])
        else:
            shown = layer if isinstance(layer, str) else type(layer).__name__
            raise ValueError(
                f"ignored_layers names {shown!r}, which is not a layer of the "
                f"{type(model).__name__} model (give its modules or names from "
                "model.named_modules())"
            )
    return found
