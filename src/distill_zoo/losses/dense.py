"""Losses of dense prediction: per-pixel distributions."""

from __future__ import annotations

from torch import Tensor

from distill_zoo.losses.common import fp32
from distill_zoo.losses.logits import kd_loss


@fp32
def pixel_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """The pixel-wise term of structured KD (Liu et al., "Structured Knowledge Distillation
    for Semantic Segmentation", CVPR 2019, https://arxiv.org/abs/1903.04197): Hinton's
    ``T^2 * KL(softmax(t/T) || softmax(s/T))`` between the class distributions of each pixel,
    averaged over all ``B*H*W`` pixels.

    Args:
        student_logits: ``[B, K, H, W]`` per-pixel student logits.
        teacher_logits: ``[B, K, H, W]`` per-pixel teacher logits, same shape.
        temperature: Softmax temperature ``T > 0``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: per-pixel KD needs the same classes and "
            "the same output size"
        )
    classes = student_logits.shape[1]
    rows = [x.permute(0, 2, 3, 1).reshape(-1, classes) for x in (student_logits, teacher_logits)]
    return kd_loss(rows[0], rows[1], temperature)
