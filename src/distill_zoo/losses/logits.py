"""Losses on logits: Hinton KD, logit matching, standardization, DKD, DIST, Tf-KD, CTKD."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_zoo.losses.common import check_logits, check_targets, check_temperature, fp32


@fp32
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


@fp32
def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with the hard labels, in fp32."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Fraction of samples on which student and teacher predict the same class."""
    return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()


TF_KD_FORMULATIONS = ("official", "paper")
"""``official``: the authors' code (``loss_kd_regularization``), which the published CIFAR-100
hyper-parameters belong to; ``paper``: the formula as the Tf-KD paper writes it."""


@fp32
def standardize_logits(logits: Tensor, unbiased: bool = True, eps: float = 1e-7) -> Tensor:
    """Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024),
    https://arxiv.org/abs/2403.01427.

    The per-sample Z-score of the logits, ``(z - mean_k z) / (std_k z + eps)``, taken before the
    temperature softmax so that the student matches the teacher's logit *relations* rather
    than their range. Computed in fp32.

    The authors' code (``normalize`` in their ``mdistiller/distillers/KD.py``) uses
    ``torch.std`` (the unbiased estimate, dividing by ``K - 1``) and adds ``eps = 1e-7`` to the
    standard deviation; these are the defaults. The paper's Algorithm 1 writes the
    population standard deviation (``unbiased=False``); the two differ by the constant factor
    ``sqrt(K / (K - 1))``, which a temperature absorbs.

    Args:
        logits: ``[B, K]`` logits.
        unbiased: Divide the variance by ``K - 1`` (the authors' code) rather than ``K``.
        eps: Added to the standard deviation (guards constant rows).
    """
    z = logits.float()
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True, correction=1 if unbiased else 0)
    return (z - mean) / (std + eps)


@fp32
def logit_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Ba & Caruana, "Do Deep Nets Really Need to be Deep?" (NIPS 2014),
    https://arxiv.org/abs/1312.6184: the student regresses the teacher's raw logits.

    ``1/(2B) * sum_b sum_k (s_bk - t_bk)^2``: the paper's ``1/(2T) sum_t ||g(x_t) - z_t||_2^2``
    (Sec. 2.2), half the squared L2 distance summed over the classes and averaged over the
    ``B`` samples. ``F.mse_loss`` (mean over all ``B*K`` entries) is this times ``2/K``.

    Args:
        student_logits: ``[B, K]`` student logits.
        teacher_logits: ``[B, K]`` teacher logits.
    """
    check_logits(student_logits, teacher_logits, "logit_mse_loss")
    diff = student_logits.float() - teacher_logits.float()
    return 0.5 * diff.pow(2).sum() / diff.shape[0]


@fp32
def prob_mse_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Squared error between the softened class probabilities of student and teacher:
    ``1/(2B) * sum_b sum_k (softmax(s_b/T)_k - softmax(t_b/T)_k)^2``, reduced like
    :func:`logit_mse_loss` (Ba & Caruana's reduction; no ``T^2`` factor).

    Hinton et al. (NIPS-W 2014, https://arxiv.org/abs/1503.02531, Sec. 2.1) show that at high
    temperature KD's gradient tends to that of logit matching; matching probabilities with an
    L2 loss is the common middle ground (e.g. the "MSE" baselines of later KD studies).

    Args:
        student_logits: ``[B, K]`` student logits.
        teacher_logits: ``[B, K]`` teacher logits.
        temperature: Softmax temperature ``T > 0``.
    """
    check_temperature(temperature)
    check_logits(student_logits, teacher_logits, "prob_mse_loss")
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return 0.5 * (p_s - p_t).pow(2).sum() / p_s.shape[0]


def _target_split(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probabilities at temperature ``T`` of the binary split ``[p_t, 1 - p_t]``
    (``[B, 2]``) and of the softmax over the non-target classes only (``[B, K - 1]``)."""
    z = logits.float() / temperature
    batch, classes = z.shape
    target_mask = F.one_hot(targets, classes).bool()
    z_target = z[target_mask].view(batch, 1)
    z_others = z[~target_mask].view(batch, classes - 1)  # row order kept
    log_all = torch.logsumexp(z, dim=1, keepdim=True)
    log_others = torch.logsumexp(z_others, dim=1, keepdim=True)
    binary = torch.cat([z_target - log_all, log_others - log_all], dim=1)
    return binary, z_others - log_others


def _reduce_kl(log_student: Tensor, log_teacher: Tensor, reduction: str) -> Tensor:
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=1)
    if reduction == "batchmean":
        return kl.mean()
    if reduction == "none":
        return kl
    raise ValueError(f"reduction must be 'batchmean' or 'none', got {reduction!r}")


@fp32
def tckd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float,
    reduction: str = "batchmean",
) -> Tensor:
    """Target-class KD of Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022),
    https://arxiv.org/abs/2203.08679, Eq. 2-4.

    ``T^2 * KL(b^T || b^S)`` with the binary distributions ``b = [p_t, 1 - p_t]`` of each
    network's target-class probability at temperature ``T``. Computed in log space
    (``log(1 - p_t) = logsumexp(non-target z/T) - logsumexp(z/T)``).

    Args:
        student_logits: ``[B, K]`` student logits.
        teacher_logits: ``[B, K]`` teacher logits.
        targets: ``[B]`` class indices.
        temperature: Softmax temperature ``T > 0``.
        reduction: ``"batchmean"`` (mean over the batch) or ``"none"`` (``[B]``).
    """
    check_temperature(temperature)
    check_logits(student_logits, teacher_logits, "tckd_loss")
    check_targets(student_logits, targets, "tckd_loss")
    binary_s, _ = _target_split(student_logits, targets, temperature)
    binary_t, _ = _target_split(teacher_logits, targets, temperature)
    return _reduce_kl(binary_s, binary_t, reduction) * temperature**2


@fp32
def nckd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float,
    reduction: str = "batchmean",
) -> Tensor:
    """Non-target-class KD of Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022),
    https://arxiv.org/abs/2203.08679, Eq. 5.

    ``T^2 * KL(p_hat^T || p_hat^S)`` with ``p_hat`` the softmax at temperature ``T`` over the
    ``K - 1`` non-target classes only (the reference subtracts 1000 from the target logit;
    here the target column is removed, which is exact).

    Args:
        student_logits: ``[B, K]`` student logits.
        teacher_logits: ``[B, K]`` teacher logits.
        targets: ``[B]`` class indices.
        temperature: Softmax temperature ``T > 0``.
        reduction: ``"batchmean"`` (mean over the batch) or ``"none"`` (``[B]``).
    """
    check_temperature(temperature)
    check_logits(student_logits, teacher_logits, "nckd_loss")
    check_targets(student_logits, targets, "nckd_loss")
    _, others_s = _target_split(student_logits, targets, temperature)
    _, others_t = _target_split(teacher_logits, targets, temperature)
    return _reduce_kl(others_s, others_t, reduction) * temperature**2


@fp32
def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022),
    https://arxiv.org/abs/2203.08679, Eq. 7.

    ``alpha * TCKD + beta * NCKD`` (:func:`tckd_loss`, :func:`nckd_loss`; both include
    ``T^2`` and average over the batch, as mdistiller's ``dkd_loss``). Classical KD is the
    special case ``KD = TCKD + (1 - p_t^T) * NCKD`` per sample (Eq. 4), ``p_t^T`` the
    teacher's target-class probability: DKD decouples the two weights.

    Args:
        student_logits: ``[B, K]`` student logits.
        teacher_logits: ``[B, K]`` teacher logits.
        targets: ``[B]`` class indices.
        alpha: Weight of TCKD.
        beta: Weight of NCKD.
        temperature: Softmax temperature ``T > 0``.
    """
    tckd = tckd_loss(student_logits, teacher_logits, targets, temperature)
    nckd = nckd_loss(student_logits, teacher_logits, targets, temperature)
    return alpha * tckd + beta * nckd


@fp32
def pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise Pearson correlation of two ``[N, D]`` tensors: the cosine similarity of the
    mean-centred rows, ``<a_c, b_c> / (||a_c|| * ||b_c|| + eps)`` (``eps`` as in the DIST
    authors' code; it makes a constant row correlate 0 instead of NaN). Returns ``[N]``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@fp32
def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
) -> Tensor:
    """Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022),
    https://arxiv.org/abs/2205.10536, Eq. 5-9.

    With ``Y = softmax(z / tau)`` row-wise (``[B, K]``):

    - inter-class relation ``1 - 1/B sum_i rho(Y^s_i, Y^t_i)`` (each sample's prediction row),
    - intra-class relation ``1 - 1/K sum_j rho(Y^s_:j, Y^t_:j)`` (each class's column over the
      batch),

    ``rho`` the Pearson correlation (:func:`pearson_correlation`);
    ``loss = tau^2 * (beta * inter + gamma * intra)``, as the authors' code
    (``image_classification_sota``'s ``DIST``) multiplies both terms by ``tau^2``.

    Args:
        student_logits: ``[B, K]`` student logits.
        teacher_logits: ``[B, K]`` teacher logits.
        beta: Weight of the inter-class relation.
        gamma: Weight of the intra-class relation.
        tau: Softmax temperature ``> 0``.
    """
    check_temperature(tau)
    check_logits(student_logits, teacher_logits, "dist_loss")
    y_s = F.softmax(student_logits.float() / tau, dim=1)
    y_t = F.softmax(teacher_logits.float() / tau, dim=1)
    inter = 1 - pearson_correlation(y_s, y_t).mean()
    intra = 1 - pearson_correlation(y_s.t(), y_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


def virtual_teacher(targets: Tensor, num_classes: int, correct_prob: float) -> Tensor:
    """The hand-designed teacher of Tf-KD_reg (Yuan et al., CVPR 2020, Eq. 9): probability
    ``a`` on the correct class and ``(1 - a) / (K - 1)`` on each other class.

    Args:
        targets: ``[B]`` class indices.
        num_classes: ``K >= 2``.
        correct_prob: ``a``, in ``(0, 1)``.

    Returns:
        ``[B, K]`` fp32 probabilities.
    """
    if num_classes < 2:
        raise ValueError(f"the virtual teacher needs at least two classes, got {num_classes}")
    if not 0 < correct_prob < 1:
        raise ValueError(f"the correct-class probability must be in (0, 1), got {correct_prob}")
    off = (1 - correct_prob) / (num_classes - 1)
    shape = (targets.shape[0], num_classes)  # fp32 even where the default dtype is not
    probs = torch.full(shape, off, dtype=torch.float32, device=targets.device)
    return probs.scatter(1, targets.view(-1, 1), correct_prob)


@fp32
def tf_kd_reg_loss(
    student_logits: Tensor,
    targets: Tensor,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
    formulation: str = "official",
) -> Tensor:
    """Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization"
    (CVPR 2020), https://arxiv.org/abs/1909.11723: the soft term of Tf-KD_reg, the student
    distilled from the :func:`virtual_teacher` ``p^d`` (no trained teacher).

    - ``official`` (default; the authors' ``loss_kd_regularization``, to which the published
      CIFAR-100 hyper-parameters belong): the teacher is ``softmax(p^d / T)``, the temperature
      applied to the *probabilities* as if they were logits, which makes it nearly uniform
      for large ``T``; the student is ``log_softmax(s)`` at temperature 1; the KL divergence is
      averaged over all ``B*K`` entries (``nn.KLDivLoss()``'s default ``"mean"``).
    - ``paper`` (Eq. 10, ``D_KL(p^d_tau, p^tau)``): both sides softened at ``T``: the teacher as
      ``softmax(log p^d / T)`` (i.e. ``p^d``'s log-probabilities taken as its logits, so
      ``p^d_tau ∝ (p^d)^(1/T)``), the student as ``softmax(s / T)``; the KL divergence summed
      over classes and averaged over the batch. No ``T^2`` factor (the paper writes none).

    Args:
        student_logits: ``[B, K]`` student logits.
        targets: ``[B]`` class indices.
        correct_prob: ``a``, the virtual teacher's correct-class probability (the authors' code
            fixes 0.99; the paper asks for ``a >= 0.9``).
        temperature: ``T > 0``.
        formulation: ``"official"`` or ``"paper"``.
    """
    if formulation not in TF_KD_FORMULATIONS:
        raise ValueError(f"formulation must be one of {TF_KD_FORMULATIONS}, got {formulation!r}")
    check_temperature(temperature)
    if student_logits.dim() != 2:
        raise ValueError(f"tf_kd_reg_loss needs [B, K] logits, got {tuple(student_logits.shape)}")
    check_targets(student_logits, targets, "tf_kd_reg_loss")
    p_d = virtual_teacher(targets, student_logits.shape[1], correct_prob)
    s = student_logits.float()
    if formulation == "official":
        log_teacher = F.log_softmax(p_d / temperature, dim=1)
        log_student = F.log_softmax(s, dim=1)
        kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True)
        return kl.mean()
    log_teacher = F.log_softmax(p_d.log() / temperature, dim=1)
    log_student = F.log_softmax(s / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def ctkd_lambda(
    epoch: int, warmup_epochs: int, lambda_max: float = 1.0, lambda_min: float = 0.0
) -> float:
    """CTKD's curriculum of the gradient-reversal strength (Li et al., "Curriculum Temperature
    for Knowledge Distillation", AAAI 2023, https://arxiv.org/abs/2211.16231)::

        lambda_n = lambda_min + (lambda_max - lambda_min) * (1 + cos((1 + min(n, N) / N) pi)) / 2

    a cosine ramp from ``lambda_min`` at ``n = 0`` to ``lambda_max`` at ``n = N`` and after.
    (The official code writes it as ``-CosineDecay(max=0, min=-1, loops=N)``, the same values.)

    Args:
        epoch: ``n``, the epoch count (the official loop counts epochs from 1).
        warmup_epochs: ``N`` (10 in the official CIFAR script), ``> 0``.
        lambda_max: The final strength (1).
        lambda_min: The starting strength (0).
    """
    if warmup_epochs <= 0:
        raise ValueError(f"warmup_epochs must be > 0, got {warmup_epochs}")
    n = min(max(epoch, 0), warmup_epochs)
    ramp = (1 + math.cos((1 + n / warmup_epochs) * math.pi)) / 2
    return lambda_min + (lambda_max - lambda_min) * ramp


@fp32
def ctkd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor) -> Tensor:
    """Hinton's KD term with a learnable temperature (Li et al., "Curriculum Temperature for
    Knowledge Distillation", AAAI 2023, https://arxiv.org/abs/2211.16231):
    ``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch, differentiable
    in ``T`` as well as in the student logits.

    Args:
        student_logits: ``[B, K]`` student logits.
        teacher_logits: ``[B, K]`` teacher logits.
        temperature: A scalar (or one-element) tensor ``T > 0`` for the whole batch, or
            ``[B]``/``[B, 1]`` for one temperature per sample.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: do student and teacher have the same "
            "number of classes?"
        )
    batch = student_logits.shape[0]
    t = temperature.float()
    if t.numel() == 1:
        t = t.reshape(1, 1)
    elif t.numel() == batch:
        t = t.reshape(batch, 1)
    else:
        raise ValueError(
            f"ctkd_loss needs one temperature or one per sample ({batch}), got shape "
            f"{tuple(temperature.shape)}"
        )
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1, keepdim=True)
    return (kl * t.pow(2)).sum() / batch
