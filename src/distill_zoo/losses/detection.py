"""Losses of object-detection distillation.

Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation"
(NeurIPS 2017),
https://papers.nips.cc/paper/6676-learning-efficient-object-detection-models-with-knowledge-distillation:
a class-weighted soft cross-entropy on the classification outputs (the background class,
far more frequent among proposals, weighted up) and a regression loss bounded by the
teacher's error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_zoo.losses.common import check_temperature, fp32, zero_loss


def _check_same(student: Tensor, teacher: Tensor, method: str, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{method} needs student and teacher {what} of one shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )


@fp32
def weighted_soft_ce(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    background_weight: float = 1.5,
    background_index: int = 0,
) -> Tensor:
    """The weighted soft cross-entropy of Chen et al., "Learning Efficient Object Detection
    Models with Knowledge Distillation" (NeurIPS 2017),
    https://papers.nips.cc/paper/6676-learning-efficient-object-detection-models-with-knowledge-distillation:

    ``L_soft = -1/N * sum_rows sum_c w_c * P_t,c * log P_s,c``,
    ``P_t = softmax(t / T)``, ``log P_s = log_softmax(s / T)``,

    with ``w_c = 1`` except ``w_background = 1.5`` (the paper's value, the default). No
    ``T^2`` factor, as in the paper's formula.

    Args:
        student_logits: ``[N, K]`` student class logits (one row per proposal).
        teacher_logits: ``[N, K]`` teacher class logits, same shape.
        temperature: Softmax temperature ``T > 0``.
        background_weight: Weight ``w`` of the background class.
        background_index: Column of the background class (0 in torchvision's detectors).

    Returns:
        The mean over the ``N`` rows; a zero that keeps ``student_logits`` in the graph when
        ``N == 0``.
    """
    check_temperature(temperature)
    if student_logits.dim() != 2:
        raise ValueError(
            f"weighted_soft_ce needs [N, K] logits, got {tuple(student_logits.shape)}"
        )
    _check_same(student_logits, teacher_logits, "weighted_soft_ce", "logits")
    classes = student_logits.shape[1]
    if not -classes <= background_index < classes:
        raise ValueError(f"background_index {background_index} is out of {classes} classes")
    if student_logits.shape[0] == 0:
        return zero_loss(student_logits)
    weights = torch.ones(classes, device=student_logits.device)
    weights[background_index] = background_weight
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(weights * p_t * log_p_s).sum(dim=1).mean()


@fp32
def weighted_soft_bce(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    background_weight: float = 1.5,
) -> Tensor:
    """:func:`weighted_soft_ce` for a binary objectness score given as one logit per anchor
    (a sigmoid, as torchvision's RPN): with ``p_t = sigmoid(t / T)``,

    ``loss = -mean(p_t * log sigmoid(s / T) + w * (1 - p_t) * log sigmoid(-s / T))``,

    ``w`` the background weight (1.5 in Chen et al., "Learning Efficient Object Detection
    Models with Knowledge Distillation", NeurIPS 2017,
    https://papers.nips.cc/paper/6676-learning-efficient-object-detection-models-with-knowledge-distillation).

    Args:
        student_logits: Student objectness logits, any shape (flattened).
        teacher_logits: Teacher objectness logits, same shape.
        temperature: Sigmoid temperature ``T > 0``.
        background_weight: Weight ``w`` of the background ("not an object") term.

    Returns:
        The mean over all anchors; a zero that keeps ``student_logits`` in the graph when
        there are none.
    """
    check_temperature(temperature)
    _check_same(student_logits, teacher_logits, "weighted_soft_bce", "objectness logits")
    if student_logits.numel() == 0:
        return zero_loss(student_logits)
    s = student_logits.float().flatten() / temperature
    p_t = torch.sigmoid(teacher_logits.float().flatten() / temperature)
    terms = p_t * F.logsigmoid(s) + background_weight * (1 - p_t) * F.logsigmoid(-s)
    return -terms.mean()


@fp32
def bounded_regression_loss(
    student: Tensor, teacher: Tensor, target: Tensor, margin: float = 0.0
) -> Tensor:
    """The teacher-bounded regression loss of Chen et al., "Learning Efficient Object
    Detection Models with Knowledge Distillation" (NeurIPS 2017),
    https://papers.nips.cc/paper/6676-learning-efficient-object-detection-models-with-knowledge-distillation:

    ``L_b = ||R_s - y||^2`` if ``||R_s - y||^2 + m > ||R_t - y||^2``, else ``0``,

    per row (the squared L2 norm sums over the box coordinates), averaged over the ``N``
    rows. The student is only pulled towards the target where it is not already better
    than the teacher by the margin ``m``; the teacher is an upper bound, not a target. The
    paper gives no value for ``m``: the default ``0`` is ours. Teacher and target are
    detached.

    Args:
        student: ``[N, 4]`` student box deltas.
        teacher: ``[N, 4]`` teacher box deltas.
        target: ``[N, 4]`` ground-truth box deltas.
        margin: The margin ``m``.

    Returns:
        The mean over the ``N`` rows; a zero that keeps ``student`` in the graph when
        ``N == 0``.
    """
    if student.dim() != 2:
        raise ValueError(
            f"bounded_regression_loss needs [N, 4] box deltas, got {tuple(student.shape)}"
        )
    if teacher.shape != student.shape or target.shape != student.shape:
        raise ValueError(
            "bounded_regression_loss needs student, teacher and target box deltas of one "
            f"shape, got {tuple(student.shape)}, {tuple(teacher.shape)} and "
            f"{tuple(target.shape)}"
        )
    if student.shape[0] == 0:
        return zero_loss(student)
    target = target.detach().float()
    error_s = (student.float() - target).pow(2).sum(dim=1)
    error_t = (teacher.detach().float() - target).pow(2).sum(dim=1)
    return torch.where(error_s + margin > error_t, error_s, torch.zeros_like(error_s)).mean()
