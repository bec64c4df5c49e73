"""Pruned-structure records: the sizes a structurally pruned network has, to rebuild it.

Structured pruning (``distill_zoo.shipping.prune``) removes channels, so a pruned network no
longer fits the model its config builds: its convolutions have fewer filters, its BatchNorms
fewer features, its parameters smaller shapes. :func:`record` writes those sizes down as plain
JSON data, which checkpoints carry under :data:`STRUCTURE_KEY`; :func:`restore` resizes a freshly
built model of the same architecture to them, after which ``load_state_dict`` loads the pruned
weights as usual. Only ``torch`` is needed here: loading a pruned checkpoint works without the
``prune`` extra (torch-pruning).

A record holds, keyed by the names of ``model.named_modules()``, ``named_parameters()`` and
``named_buffers()``:

- ``modules``: each module's class name and its size attributes that pruning may change
  (``Conv*`` ``in_channels``/``out_channels``/``groups``, ``BatchNorm*``/``InstanceNorm*``
  ``num_features``, ``Linear`` ``in_features``/``out_features``, ``GroupNorm``
  ``num_groups``/``num_channels``, ``LayerNorm`` ``normalized_shape``, ...);
- ``parameters`` and ``buffers``: every tensor's shape.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

STRUCTURE_KEY = "pruned_structure"
"""The key under which checkpoints carry a record."""

FORMAT = 1
"""Version of the record's layout, stored in it as ``"format"``."""

SIZE_ATTRIBUTES: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.modules.batchnorm._BatchNorm, ("num_features",)),
    (nn.modules.instancenorm._InstanceNorm, ("num_features",)),
    (nn.Linear, ("in_features", "out_features")),
    (nn.Bilinear, ("in1_features", "in2_features", "out_features")),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.Embedding, ("num_embeddings", "embedding_dim")),
    (nn.PReLU, ("num_parameters",)),
    (nn.RNNBase, ("input_size", "hidden_size", "proj_size")),
    (nn.MultiheadAttention, ("embed_dim", "kdim", "vdim", "num_heads", "head_dim")),
)
"""Module types and the attributes of theirs that structured pruning may change."""


def _size_attributes(module: nn.Module) -> dict[str, Any]:
    """The recorded size attributes of ``module`` (tuples as lists, for JSON)."""
    sizes: dict[str, Any] = {}
    for kind, names in SIZE_ATTRIBUTES:
        if isinstance(module, kind):
            for name in names:
                value = getattr(module, name, None)
                if isinstance(value, int):
                    sizes[name] = value
                elif isinstance(value, tuple | list) and all(isinstance(v, int) for v in value):
                    sizes[name] = list(value)
    return sizes


def record(model: nn.Module) -> dict:
    """A JSON-able description of ``model``'s sizes: what :func:`restore` needs to rebuild it.

    Args:
        model: Any network, pruned or not.

    Returns:
        ``{"format": 1, "modules": {name: {"type": class name, <size attribute>: value}},
        "parameters": {name: shape}, "buffers": {name: shape}}``, names as in
        ``named_modules()``, ``named_parameters()`` and ``named_buffers()`` (every module is
        listed, with its class name, so another architecture is recognised; shapes are lists).
    """
    return {
        "format": FORMAT,
        "modules": {
            name: {"type": type(module).__name__, **_size_attributes(module)}
            for name, module in model.named_modules()
        },
        "parameters": {
            name: list(p.shape) for name, p in model.named_parameters(remove_duplicate=False)
        },
        "buffers": {
            name: list(b.shape) for name, b in model.named_buffers(remove_duplicate=False)
        },
    }


def _check_record(structure: dict) -> None:
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        raise ValueError(
            "Not a pruned-structure record of format "
            f"{FORMAT} (expected a dict from distill_zoo.models.pruned_structure.record, "
            f"got {type(structure).__name__} with format "
            f"{structure.get('format') if isinstance(structure, dict) else None!r})"
        )


def _module(model: nn.Module, name: str, what: str) -> nn.Module:
    """The submodule ``name`` of ``model``, or a clear error naming the architecture."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"The pruned-structure record names {what} {name!r}, which the "
            f"{type(model).__name__} model does not have: the record comes from another "
            "architecture (build the model the pruned checkpoint was trained as)"
        ) from None


def _changes(model: nn.Module, structure: dict) -> tuple[list, list]:
    """What :func:`restore` would change: ``(module, attribute, value)`` triples and
    ``(module, tensor name, shape, kind)`` for every tensor whose shape differs."""
    _check_record(structure)
    attributes = []
    modules = structure["modules"]
    for kind, names, recorded_names in (
        ("module", [n for n, _ in model.named_modules()], modules),
        ("parameter", [n for n, _ in model.named_parameters()], structure["parameters"]),
    ):
        extra = [n for n in names if n not in recorded_names]
        if extra:
            raise ValueError(
                f"The {type(model).__name__} model has {len(extra)} {kind}(s) that the "
                f"pruned-structure record lacks ({', '.join(map(repr, extra[:5]))}): the record "
                "comes from another architecture (build the model the pruned checkpoint was "
                "trained as)"
            )
    for name, sizes in modules.items():
        module = _module(model, name, "module")
        current = _size_attributes(module)
        recorded = set(sizes) - {"type"}
        # A quantization-aware twin (QuantConv2d for Conv2d) has the same size attributes.
        if type(module).__name__ != sizes.get("type") and set(current) != recorded:
            raise ValueError(
                f"The pruned-structure record has a {sizes.get('type')} at {name!r} where the "
                f"{type(model).__name__} model has a {type(module).__name__}: the record "
                "comes from another architecture"
            )
        for attribute, value in sizes.items():
            if attribute != "type" and current.get(attribute) != value:
                if isinstance(value, list):
                    value = tuple(value)
                attributes.append((module, attribute, value))
    tensors = []
    for kind, named in (
        ("parameter", dict(model.named_parameters(remove_duplicate=False))),
        ("buffer", dict(model.named_buffers(remove_duplicate=False))),
    ):
        for name, shape in structure[f"{kind}s"].items():
            if name not in named and kind == "buffer" and name.rpartition(".")[0] in modules:
                continue  # a buffer of one variant only (a quantized layer's input range)
            if name not in named:
                raise ValueError(
                    f"The pruned-structure record names the {kind} {name!r}, which the "
                    f"{type(model).__name__} model does not have: the record comes from "
                    "another architecture"
                )
            if list(named[name].shape) != list(shape):
                owner, _, attribute = name.rpartition(".")
                tensors.append((_module(model, owner, "module"), attribute, shape, kind))
    return attributes, tensors


def restore(model: nn.Module, structure: dict) -> nn.Module:
    """Resizes a freshly built model of the recorded architecture, in place, to the record.

    Size attributes are set, and every parameter and buffer whose shape differs is replaced by
    a zero tensor of the recorded shape (same dtype, device and ``requires_grad``; tensors
    shared by several modules stay shared). A record of a quantization-aware twin of the
    architecture fits too (``QuantConv2d`` where the model has ``Conv2d``: a module of another
    class with the same size attributes; recorded buffers the model lacks, such as the
    quantized layers' input ranges, are skipped). Load the pruned weights afterwards with
    ``model.load_state_dict(pruned_state_dict)``.

    Args:
        model: The unpruned network, as its config builds it.
        structure: A :func:`record` (e.g. ``checkpoint[STRUCTURE_KEY]``), possibly through JSON.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: When ``structure`` is not a record, or does not describe ``model``'s
            architecture: a module or parameter of one that the other lacks, a recorded
            buffer of a module ``model`` lacks, or a module of another kind.
    """
    attributes, tensors = _changes(model, structure)
    for module, attribute, value in attributes:
        setattr(module, attribute, value)
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old): (old, new)
    for module, attribute, shape, kind in tensors:
        old = getattr(module, attribute)
        if id(old) not in replaced:
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            if kind == "parameter":
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            replaced[id(old)] = (old, new)
        setattr(module, attribute, replaced[id(old)][1])
    return model


def is_pruned(model: nn.Module, structure: dict) -> bool:
    """Whether :func:`restore` would change ``model`` (its sizes differ from the record's).

    Raises:
        ValueError: As :func:`restore`, for a record of another architecture.
    """
    attributes, tensors = _changes(model, structure)
    return bool(attributes or tensors)


def digest(model: nn.Module) -> str:
    """A fingerprint of ``model``'s :func:`record`: equal exactly where two networks have the
    same sizes (DDP processes compare theirs after each pruned its own copy)."""
    return hashlib.sha256(json.dumps(record(model), sort_keys=True).encode()).hexdigest()
