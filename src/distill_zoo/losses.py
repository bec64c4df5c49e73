"""Loss functions of the distillation methods: pure, stateless, config-free.

Each takes tensors and hyper-parameters and returns a scalar. Softened-softmax maths runs in
fp32 even under mixed precision, since bf16/fp16 log-softmax at high temperature loses the
small probabilities that carry the "dark knowledge".
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (NIPS-W 2014),
    https://arxiv.org/abs/1503.02531.

    ``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch. The ``T^2`` factor
    keeps the gradient scale of the soft term independent of ``T`` (Hinton et al., Sec. 2).

    Args:
        student_logits: ``[B, K]`` student logits.
        teacher_logits: ``[B, K]`` teacher logits (or a precomputed ensemble average).
        temperature: Softmax temperature ``T > 0``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: do student and teacher have the same "
            "number of classes?"
        )
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with the hard labels, in fp32."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Fraction of samples on which student and teacher predict the same class."""
    return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()


__all__ = ["cross_entropy", "kd_loss", "top1_agreement"]
