"""Choosing and pairing the layers that feature and relational methods read.

Portable choices (stage index, "last", "all", "penultimate") resolve against a model's
``feature_layers``; pairs are checked to exist, and their shapes found by a dry forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill_zoo.distillers.context import DistillContext
from distill_zoo.distillers.taps import INPUT_SUFFIX, check_layers, probe_shapes, select_layers

LayerChoice = str | int | list | None


def as_choice(choice: LayerChoice | Sequence) -> LayerChoice:
    """A layer choice with Hydra's ``ListConfig`` turned into a plain list."""
    if choice is None or isinstance(choice, (str, int)):
        return choice
    return list(choice)


def pair_layers(
    context: DistillContext,
    student_layers: LayerChoice | Sequence,
    teacher_layers: LayerChoice | Sequence,
    default: str | int,
    method: str,
) -> tuple[list[str], list[str]]:
    """Student and teacher layer names paired one to one, from the portable choices.

    Each side is picked with :func:`select_layers`. Where both sides are "all stages"
    (``"all"`` or the default) and the counts differ (e.g. 3 stages against 4), the last
    ``k = min(n_s, n_t)`` of each are paired, in order; where one side is chosen and the
    other left at its default, the default side gives its last layers, as many as chosen.
    Two explicit choices must have equal counts: nothing is dropped silently.

    Raises:
        ValueError: choices of unequal length, an index outside the stages, or a
            portable choice on a model without ``feature_layers``.
    """
    s_choice, t_choice = as_choice(student_layers), as_choice(teacher_layers)
    s = select_layers(context.student_stages, s_choice, default)
    t = select_layers(context.teacher_stages, t_choice, default)
    if len(s) == len(t):
        return s, t
    s_auto, t_auto = s_choice in (None, "all"), t_choice in (None, "all")
    if s_auto and t_auto:
        k = min(len(s), len(t))
        return s[len(s) - k :], t[len(t) - k :]
    # One side chosen, the other left to its default: the default side's deepest layers.
    if s_choice is None and len(s) > len(t):
        return s[len(s) - len(t) :], t
    if t_choice is None and len(t) > len(s):
        return s, t[len(t) - len(s) :]
    raise ValueError(
        f"{method} pairs student and teacher layers one to one, but got {len(s)} student "
        f"layers {s} and {len(t)} teacher layers {t}: set student_layers/teacher_layers "
        "to lists of equal length"
    )


def pair_stages(
    student: nn.Module,
    teacher: nn.Module,
    context: DistillContext,
    student_layers: LayerChoice,
    teacher_layers: LayerChoice,
    default: str | int = "all",
    method: str = "this method",
) -> tuple[list[str], list[str]]:
    """:func:`pair_layers`, checked to exist in the models.

    Raises:
        ValueError: as :func:`pair_layers`, or an unknown layer name (listing valid ones).
    """
    s, t = pair_layers(context, student_layers, teacher_layers, default, method)
    check_layers(student, s, role="student")
    check_layers(teacher, t, role="teacher")
    return s, t


def probe_maps(
    model: nn.Module, names: list[str], context: DistillContext, method: str
) -> dict[str, tuple[int, ...]]:
    """Output shapes of ``names`` on the context's example batch, each checked to be a
    ``[B, C, H, W]`` feature map; ``{}`` when the context has no example batch."""
    if context.example_input is None:
        return {}
    shapes = probe_shapes(model, names, context.example_input)
    for name, shape in shapes.items():
        if len(shape) != 4:
            raise ValueError(
                f"{method} needs [B, C, H, W] feature maps, but layer '{name}' gives "
                f"{tuple(shape)}: choose convolutional stages"
            )
    return shapes


PENULTIMATE = "penultimate"
"""Layer choice meaning "the module whose output the classifier reads"."""

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def penultimate_layer(model: nn.Module, example_input: Tensor, role: str = "model") -> str:
    """Name of the module whose output (flattened) is the input of ``model``'s classifier.

    The classifier is the last ``nn.Linear`` called in the forward pass (for an MLP head, its
    last layer). One dry forward pass in eval mode records every module's output; the answer
    is the last module, called once and not a dropout, that finished before the classifier
    and whose output, flattened, equals the classifier's input (``avgpool`` in the CIFAR
    ResNets, WRNs, MobileNetV2, ShuffleNets and torchvision ResNets/EfficientNets, ``pool4``
    in the VGGs).

    Raises:
        ValueError: no ``nn.Linear`` is called, or no module's output is the classifier's
            input (e.g. it is computed functionally): name the layer explicitly then.
    """
    calls: list[tuple[str, object]] = []
    head: list[tuple[str, Tensor, int]] = []
    handles = []
    for name, module in model.named_modules():
        # Dropout is the identity only in eval mode: never tap it.
        if not name or isinstance(module, _DROPOUT):
            continue
        handles.append(
            module.register_forward_hook(
                lambda _m, _i, output, name=name: calls.append((name, output))
            )
        )
        if isinstance(module, nn.Linear):
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, name=name: head.append((name, args[0], len(calls)))
                )
            )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not head:
        raise ValueError(
            f"the {role} ({type(model).__name__}) calls no nn.Linear classifier, so its "
            "penultimate layer cannot be found: name the layer explicitly"
        )
    head_name, head_input, finished = head[-1]
    batch = head_input.shape[0]
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    for name, output in reversed(calls[:finished]):
        if (
            counts[name] == 1
            and isinstance(output, Tensor)
            and output.shape[:1] == head_input.shape[:1]
            and output.numel() == head_input.numel()
            and torch.equal(output.reshape(batch, -1), head_input.reshape(batch, -1))
        ):
            return name
    raise ValueError(
        f"no module of the {role} ({type(model).__name__}) outputs the input of its classifier "
        f"'{head_name}': name the penultimate layer explicitly (e.g. student_layers=avgpool)"
    )


def leaf_calls(model: nn.Module, example_input: Tensor) -> list[tuple[str, nn.Module]]:
    """Every call of a leaf module of ``model`` in execution order (a module called twice
    appears twice), from one dry forward pass in eval mode without gradients."""
    calls: list[tuple[str, nn.Module]] = []
    handles = [
        module.register_forward_hook(lambda m, _i, _o, n=name: calls.append((n, m)))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return calls


def preactivation(model: nn.Module, name: str, example_input: Tensor) -> str:
    """The tap name of layer ``name``'s output before its final ReLU.

    One dry forward pass (:func:`leaf_calls`) shows which leaf modules run inside ``name``:
    if the last one is an ``nn.ReLU`` (a CIFAR ResNet block's ``relu2``, a VGG block's ReLU),
    the answer is that ReLU's input (``layer3.2.relu2:input``); otherwise the layer's output
    already is un-rectified (pre-activation WRN groups, MobileNetV2's linear bottlenecks) and
    ``name`` itself is returned.
    """
    check_layers(model, [name])
    inside = [
        (call, module)
        for call, module in leaf_calls(model, example_input)
        if call == name or call.startswith(f"{name}.")
    ]
    if inside and isinstance(inside[-1][1], nn.ReLU):
        return f"{inside[-1][0]}{INPUT_SUFFIX}"
    return name


def layer_pairs(
    student: nn.Module,
    teacher: nn.Module,
    context: DistillContext,
    student_layers: str | int | Sequence | None,
    teacher_layers: str | int | Sequence | None,
    default: str | int,
    method: str,
) -> tuple[list[str], list[str]]:
    """Student and teacher layers, paired in order, from the portable choices.

    Paired by :func:`pair_layers`; besides :func:`select_layers`' forms, ``"penultimate"``
    names the classifier's input (:func:`penultimate_layer`). A segmenter or detector has no
    per-image classifier: there it names the model's last ``feature_layers`` entry (a
    segmenter's head features, a detector's finest FPN level), pooled per image by the
    relational methods.

    Raises:
        ValueError: no example input in ``context``, unequal numbers of layers, an index
            outside the stages, or a portable choice on a model without ``feature_layers``.
    """
    if context.example_input is None:
        raise ValueError(
            f"{method} needs context.example_input (a batch of the data's shape) to find the "
            "feature shapes of its layers"
        )
    s, t = pair_layers(context, student_layers, teacher_layers, default, method)

    def resolve(model: nn.Module, names: list[str], role: str) -> list[str]:
        stages = context.student_stages if role == "student" else context.teacher_stages
        if context.task in ("segmentation", "detection") and PENULTIMATE in names:
            if not stages:
                raise ValueError(
                    f"{method}: on task={context.task} the 'penultimate' layer is the "
                    f"{role}'s last feature_layers entry, but its config names none: name "
                    f"the layer ({role}_layers=<name>)"
                )
            return [stages[-1] if n == PENULTIMATE else n for n in names]
        return [
            penultimate_layer(model, context.example_input, role) if n == PENULTIMATE else n
            for n in names
        ]

    return resolve(student, s, "student"), resolve(teacher, t, "teacher")


def probe_pairs(
    student: nn.Module,
    teacher: nn.Module,
    context: DistillContext,
    student_layers: list[str],
    teacher_layers: list[str],
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Output shapes of the paired layers, found by one dry forward pass of each model.

    Raises:
        ValueError: an unknown layer name (the message lists the valid ones), or a layer
            whose output is not a ``[B, ...]`` tensor.
    """
    check_layers(student, student_layers, "student")
    check_layers(teacher, teacher_layers, "teacher")
    s_shapes = probe_shapes(student, student_layers, context.example_input)
    t_shapes = probe_shapes(teacher, teacher_layers, context.example_input)
    for name, shape in [*s_shapes.items(), *t_shapes.items()]:
        if len(shape) < 2:
            raise ValueError(f"layer '{name}' gives a tensor of shape {shape}, not [B, ...]")
    return s_shapes, t_shapes


def embedding(x: Tensor) -> Tensor:
    """A feature as one vector per sample: ``[B, C, H, W]`` is globally average-pooled (what
    a classifier head sees), anything else flattened to ``[B, D]``."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    return x.reshape(x.shape[0], -1)
