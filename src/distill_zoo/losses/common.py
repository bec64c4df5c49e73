"""Shared checks and helpers of the loss functions (formulation names, fp32 wrapping)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

FORMULATIONS = ("repdistiller", "paper")
"""``repdistiller``: the reference code of Tian et al. (CRD, ICLR 2020), whose CIFAR-100
benchmark the default weights belong to; ``paper``: the formula as the method's paper writes it."""


def check_formulation(formulation: str) -> None:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")


def as_list(features: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [features] if isinstance(features, Tensor) else list(features)


def check_pairs(student: list[Tensor], teacher: list[Tensor], method: str) -> None:
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"{method} needs as many student as teacher features (at least one), got "
            f"{len(student)} and {len(teacher)}"
        )
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"{method} needs [B, C, H, W] feature maps with the same batch size; pair {i} "
                f"has student {tuple(s.shape)} and teacher {tuple(t.shape)}"
            )


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pools the larger of two ``[B, C, H, W]`` maps to the smaller's ``H x W``.

    Each spatial dimension shrinks to the smaller of the two (adaptive average pooling), as
    RepDistiller does where student and teacher resolutions differ.
    """
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Floating dtypes that :func:`fp32` upcasts (float64 inputs are left as they are)."""


def _upcast(value):
    """``value`` with its fp16/bf16 tensors (also inside a list or tuple) as fp32."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in LOW_PRECISION else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):  # not namedtuples
        return type(value)(_upcast(v) for v in value)
    return value


def _first_tensor(values) -> Tensor | None:
    for value in values:
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (list, tuple)):
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def fp32(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Runs ``loss`` in fp32 under mixed precision (``torch.autocast``).

    Two things are needed, and this does both: every fp16/bf16 tensor argument (positional
    or keyword, also inside a list or tuple) is upcast to fp32, since disabling autocast alone
    leaves tensors that a bf16 layer produced in bf16; and autocast is disabled on the device
    of the first tensor argument, since under it even fp32 inputs of a matrix product
    (Gram, FSP and kernel matrices) are computed in bf16/fp16. Softened softmaxes at high
    temperature and small relational differences need fp32 to keep their small terms.
    Gradients flow back to the low-precision inputs unchanged (``.float()`` is
    differentiable).
    """

    @functools.wraps(loss)
    def wrapper(*args, **kwargs) -> Tensor:
        args = tuple(_upcast(a) for a in args)
        kwargs = {name: _upcast(value) for name, value in kwargs.items()}
        tensor = _first_tensor((*args, *kwargs.values()))
        if tensor is None or not torch.amp.is_autocast_available(tensor.device.type):
            return loss(*args, **kwargs)
        with torch.autocast(device_type=tensor.device.type, enabled=False):
            return loss(*args, **kwargs)

    return wrapper


def flat_fp32(x: Tensor) -> Tensor:
    """``[B, ...]`` -> ``[B, D]`` in fp32."""
    return x.float().reshape(x.shape[0], -1)


def check_batch(student: Tensor, teacher: Tensor, method: str) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{method}: student batch {student.shape[0]} and teacher batch {teacher.shape[0]} "
            "differ: both must see the same images"
        )


def zero_loss(x: Tensor) -> Tensor:
    """A zero loss that keeps ``x`` in the graph (for batches too small to relate)."""
    return x.float().sum() * 0.0


def check_logits(student_logits: Tensor, teacher_logits: Tensor, method: str) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{method} needs [batch, classes] student and teacher logits of one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}: do student and "
            "teacher have the same number of classes?"
        )


def check_targets(logits: Tensor, targets: Tensor, method: str) -> None:
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"{method} needs one class index per sample: targets {tuple(targets.shape)} for "
            f"logits {tuple(logits.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"{method} needs at least two classes, got {logits.shape[1]}")


def check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
