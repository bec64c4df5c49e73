"""Reading checkpoints safely: any common layout, ``weights_only=True``, strict fit checks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from distill_zoo.models import pruned_structure

log = logging.getLogger(__name__)

RANGE_BUFFERS = ("act_min", "act_max")
"""Buffers a quantized layer adds to its state dict (the observed input range)."""


def is_range_key(key: str) -> bool:
    """Whether a state-dict key is a quantized layer's input range (absent in float models)."""
    return key.rsplit(".", 1)[-1] in RANGE_BUFFERS


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model weights inside a loaded checkpoint, whatever its common layout.

    Understands this project's Lightning checkpoints (the ``student.`` weights of the run),
    other Lightning checkpoints (``state_dict``), plain state dicts, and the ``{"model": ...}``
    / ``{"net": ...}`` files that published KD code bases ship. A ``module.`` prefix left by
    ``DataParallel``/DDP is removed.
    """
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, Tensor) for v in obj.values())
    ):
        raise ValueError(
            f"{source} holds no state dict: expected a Lightning checkpoint, a plain state dict, "
            "or a dict with a 'model', 'net' or 'state_dict' entry"
        )
    if any(k.startswith("student.") for k in obj):
        obj = {k.removeprefix("student."): v for k, v in obj.items() if k.startswith("student.")}
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def read_checkpoint(
    path: str | os.PathLike, role: str = "teacher", config_key: str | None = None
) -> dict:
    """The object in the checkpoint file at ``path``, read with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names ``config_key``).
        RuntimeError: the file cannot be read (corrupt, truncated, not a torch file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        key = config_key or f"{role}.ckpt"
        hint = f", or {key}=null to train the {role} on demand" if role == "teacher" else ""
        raise FileNotFoundError(
            f"{role} checkpoint {path} does not exist: pass {key}=<path to a .ckpt/.pt file>{hint}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"cannot read {role} checkpoint {path}: the file is corrupt, truncated or not a "
            f"PyTorch checkpoint of tensors ({type(err).__name__}: {err})"
        ) from err


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    role: str = "teacher",
    config_key: str | None = None,
    loaded: object | None = None,
) -> nn.Module:
    """Loads the checkpoint at ``path`` into ``model`` (``weights_only=True``), strictly.

    ``loaded`` is the file's content when the caller has already read it
    (:func:`read_checkpoint`); ``path`` then only names it in errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the file cannot be read (corrupt, truncated, not a torch file).
        ValueError: the weights do not fit ``model`` (other architecture or class count).
    """
    path = Path(path).expanduser()
    obj = read_checkpoint(path, role, config_key) if loaded is None else loaded
    structure = obj.get(pruned_structure.STRUCTURE_KEY) if isinstance(obj, dict) else None
    if structure and pruned_structure.is_pruned(model, structure):
        # A pruned network's checkpoint: the freshly built architecture takes its sizes first.
        pruned_structure.restore(model, structure)
        log.info("%s checkpoint %s holds a pruned network: its structure restored", role, path)
    state = extract_state_dict(obj, source=f"{role} checkpoint {path}")
    own = model.state_dict()
    # A quantized student's input ranges are absent from float checkpoints and vice versa.
    missing = sorted(k for k in set(own) - set(state) if not is_range_key(k))
    unexpected = sorted(k for k in set(state) - set(own) if not is_range_key(k))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", wrong_shape),
            )
            if items
        )
        raise ValueError(
            f"{role} checkpoint {path} does not fit {type(model).__name__}: {details}. "
            f"Check that {role.split()[0]}=<arch> names the architecture the checkpoint was "
            "trained as, and that the data set has the same number of classes"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model
