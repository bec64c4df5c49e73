"""Losses of regression distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_zoo.losses.common import fp32


@fp32
def mse_to_teacher(student: Tensor, teacher: Tensor) -> Tensor:
    """Output matching: the mean squared difference between the student's and the teacher's
    predictions over every sample and output, ``mean((s - t)^2)``, as in the regression
    baselines of Chen et al. (NeurIPS 2017, Sec. 3.2) and Saputra et al. (ICCV 2019)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student predictions {tuple(student.shape)} and teacher predictions "
            f"{tuple(teacher.shape)} differ: do they predict the same targets?"
        )
    return F.mse_loss(student, teacher)


# --- attentive imitation (Saputra et al., ICCV 2019) ----------------------------------------


def teacher_reliability(errors: Tensor) -> Tensor:
    """The teacher's reliability on each training sample, ``Phi`` of Saputra et al.,
    "Distilling Knowledge From a Deep Pose Regressor Network" (ICCV 2019, Sec. 3.2),
    https://arxiv.org/abs/1908.00858:

    ``Phi_i = 1 - e_i / eta``, ``eta = max(e) - min(e)`` over the whole training set,

    ``e_i`` the teacher's error on sample ``i`` (its squared distance to the label). 1 where
    the teacher is exact, falling linearly with its error.

    **Clamped at 0.** ``Phi_i < 0`` wherever ``e_i > eta``, which happens as soon as
    ``min(e) > 0`` (the worst sample then always gets ``-min(e) / eta``): a negative weight on
    ``||s - t||^2`` would reward the student for moving away from the teacher, without bound,
    and swamp the supervised term. A teacher that wrong is ignored (weight 0), not fled.
    Where ``eta == 0`` (all errors equal, e.g. one sample) the formula's limit is taken:
    ``Phi = 1`` where the teacher is exact, 0 elsewhere.

    Args:
        errors: ``[N]`` teacher errors, finite and ``>= 0``.

    Returns:
        ``[N]`` float32 weights in ``[0, 1]``.
    """
    if errors.dim() != 1 or errors.numel() == 0:
        raise ValueError(
            f"teacher_reliability needs a non-empty [N] vector of errors, got "
            f"{tuple(errors.shape)}"
        )
    errors = errors.float()
    if not bool(torch.isfinite(errors).all()) or bool((errors < 0).any()):
        raise ValueError(
            "teacher_reliability needs finite errors >= 0 (squared distances to the labels); "
            "is the teacher diverged, or are the targets NaN?"
        )
    eta = errors.max() - errors.min()
    ratio = errors / eta if eta > 0 else torch.where(errors == 0, 0.0, torch.inf)
    return (1 - ratio).clamp(0, 1)


@fp32
def reliability_weighted_mse(student: Tensor, teacher: Tensor, phi: Tensor) -> Tensor:
    """``mean_i Phi_i * mean_k (s_ik - t_ik)^2``: each sample's mean squared difference over
    its elements (the D predicted values, or a feature's ``C x H x W``), weighted by the
    teacher's reliability ``Phi_i``, then averaged over the batch (divided by ``B``, not by
    ``sum Phi``, as Saputra et al.'s ``1/n sum_i``). The imitation term of attentive imitation
    and the hint loss of attentive hint training (Saputra et al., ICCV 2019, Sec. 3.2-3.3).

    Args:
        student: ``[B, ...]`` student predictions (or adapted student features).
        teacher: ``[B, ...]`` teacher predictions (or features), same shape.
        phi: ``[B]`` weights (:func:`teacher_reliability` of the batch's samples).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in "
            "shape: attentive imitation compares them element by element"
        )
    if phi.shape != student.shape[:1]:
        raise ValueError(
            f"need one reliability per sample ({student.shape[0]}), got {tuple(phi.shape)}"
        )
    per_sample = (student - teacher).square().flatten(1).mean(1)
    return (phi.to(per_sample) * per_sample).mean()


@fp32
def attentive_imitation_loss(
    student: Tensor, target: Tensor, teacher: Tensor, phi: Tensor, alpha: float
) -> Tensor:
    """Attentive imitation loss of Saputra et al., "Distilling Knowledge From a Deep Pose
    Regressor Network" (ICCV 2019, Sec. 3.2), https://arxiv.org/abs/1908.00858:

    ``L = mean_i [ alpha * ||s_i - y_i||^2 + (1 - alpha) * Phi_i * ||s_i - t_i||^2 ]``

    with each squared norm divided by the D predicted values (a constant factor 1/D on the
    paper's loss), so that ``alpha = 1`` is exactly the task's MSE to the labels and the
    terms sit on the scale of the other regression losses. ``Phi`` does not change with that
    factor (it is a ratio of errors).

    Args:
        student: ``[B, D]`` student predictions.
        target: ``[B, D]`` labels.
        teacher: ``[B, D]`` teacher predictions.
        phi: ``[B]`` the teacher's reliability on each sample (:func:`teacher_reliability`).
        alpha: Weight of the supervised term, in ``[0, 1]``; ``1 - alpha`` weighs imitation.
    """
    check_alpha(alpha)
    if student.shape != target.shape:
        raise ValueError(
            f"student predictions {tuple(student.shape)} and labels {tuple(target.shape)} "
            "differ in shape"
        )
    supervised = F.mse_loss(student, target)
    return alpha * supervised + (1 - alpha) * reliability_weighted_mse(student, teacher, phi)


def check_alpha(alpha: float) -> None:
    """Raises a ValueError unless ``0 <= alpha <= 1`` (attentive imitation's mix)."""
    if not 0 <= alpha <= 1:
        raise ValueError(
            f"attentive imitation's alpha mixes labels (alpha) and teacher (1 - alpha): it "
            f"must lie in [0, 1], got {alpha}"
        )
