"""CRD's contrastive (NCE) loss over memory banks."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def crd_logits(anchor: Tensor, memory: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """Critic logits ``<memory[indices[b, j]], anchor[b]> / T`` of CRD (Tian et al., ICLR 2020,
    https://arxiv.org/abs/1910.10699).

    Args:
        anchor: ``[B, D]`` embeddings of the batch (one network's view).
        memory: ``[N, D]`` memory bank of the other network's embeddings of all training samples.
        indices: ``[B, 1 + K]`` rows of ``memory`` to contrast each anchor with; column 0 is the
            anchor's own sample (the positive), the other ``K`` columns are its negatives.
        temperature: NCE temperature ``T > 0``.

    Returns:
        ``[B, 1 + K]`` fp32 logits. Gradients flow into ``anchor`` only when ``memory`` is a
        buffer (as in CRD, whose memory is never back-propagated into).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if indices.dim() != 2 or indices.shape[0] != anchor.shape[0]:
        raise ValueError(
            f"indices must be [batch, 1 + negatives] for {anchor.shape[0]} anchors, "
            f"got {tuple(indices.shape)}"
        )
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        # One [N, B] product, then a gather: far less memory than gathering [B, 1+K, D] rows.
        scores = memory.float() @ anchor.float().t()
    return scores.t().gather(1, indices) / temperature


def crd_normaliser(logits: Tensor, num_train_samples: int) -> Tensor:
    """The NCE normalisation constant ``Z = mean(exp(logits)) * N`` that CRD's reference code
    estimates once, from its first batch (Tian et al., ICLR 2020,
    https://arxiv.org/abs/1910.10699), so that ``exp(logit) / Z`` is about ``1 / N`` on
    average, like a density over the ``N`` training samples.

    Args:
        logits: ``[B, 1 + K]`` logits from :func:`crd_logits`.
        num_train_samples: ``N``, the size of the training set.

    Returns:
        A detached fp32 scalar.
    """
    return logits.detach().float().exp().mean() * num_train_samples


def crd_nce_loss(logits: Tensor, normaliser: Tensor | float, num_train_samples: int) -> Tensor:
    """CRD's NCE loss for one anchor side (Tian et al., ICLR 2020,
    https://arxiv.org/abs/1910.10699, Eq. 18; the reference code's ``ContrastLoss``).

    With ``P = exp(logit) / Z`` and the uniform noise density ``Pn = 1 / N``, the critic is
    ``h = P / (P + K * Pn)`` and the loss is
    ``-1/B * sum_b [ log h(positive_b) + sum_j log(1 - h(negative_bj)) ]``, i.e. the negative
    log-likelihood of telling the positive from the ``K`` negatives. Computed in log space
    (``log h = log P - logaddexp(log P, log(K/N))``), which is exact where the reference adds
    ``1e-7`` to each denominator.

    Args:
        logits: ``[B, 1 + K]`` logits from :func:`crd_logits`, column 0 the positive.
        normaliser: The constant ``Z`` (see :func:`crd_normaliser`), ``> 0``.
        num_train_samples: ``N``, the size of the training set.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must be [batch, 1 + negatives] with at least one negative, "
            f"got {tuple(logits.shape)}"
        )
    if num_train_samples <= 0:
        raise ValueError(f"num_train_samples must be > 0, got {num_train_samples}")
    num_negatives = logits.shape[1] - 1
    log_p = logits.float() - torch.as_tensor(normaliser, dtype=torch.float32).log()
    log_noise = torch.full_like(log_p, math.log(num_negatives / num_train_samples))
    log_denominator = torch.logaddexp(log_p, log_noise)
    log_h_positive = log_p[:, 0] - log_denominator[:, 0]
    log_one_minus_h_negatives = log_noise[:, 1:] - log_denominator[:, 1:]
    return -(log_h_positive.sum() + log_one_minus_h_negatives.sum()) / logits.shape[0]


def crd_loss(
    student_embed: Tensor,
    teacher_embed: Tensor,
    student_memory: Tensor,
    teacher_memory: Tensor,
    indices: Tensor,
    temperature: float,
    num_train_samples: int,
    student_normaliser: Tensor | float | None = None,
    teacher_normaliser: Tensor | float | None = None,
) -> Tensor:
    """Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020),
    https://arxiv.org/abs/1910.10699: the symmetric NCE loss of the reference's ``CRDLoss``.

    ``student term + teacher term``: the student embedding is contrasted with the teacher's
    memory bank (positive: the teacher's embedding of the same sample), and the teacher
    embedding with the student's memory bank, each by :func:`crd_nce_loss`.

    Args:
        student_embed: ``[B, D]`` L2-normalised student embeddings.
        teacher_embed: ``[B, D]`` L2-normalised teacher embeddings.
        student_memory: ``[N, D]`` memory bank of student embeddings.
        teacher_memory: ``[N, D]`` memory bank of teacher embeddings.
        indices: ``[B, 1 + K]`` memory rows per anchor, column 0 the anchor's own sample.
        temperature: NCE temperature ``T``.
        num_train_samples: ``N``, the size of the training set.
        student_normaliser: ``Z`` of the student-anchor term; ``None`` estimates it from this
            batch with :func:`crd_normaliser`, as the reference does on its first batch.
        teacher_normaliser: ``Z`` of the teacher-anchor term, likewise.
    """
    student_logits = crd_logits(student_embed, teacher_memory, indices, temperature)
    teacher_logits = crd_logits(teacher_embed, student_memory, indices, temperature)
    if student_normaliser is None:
        student_normaliser = crd_normaliser(student_logits, num_train_samples)
    if teacher_normaliser is None:
        teacher_normaliser = crd_normaliser(teacher_logits, num_train_samples)
    return crd_nce_loss(student_logits, student_normaliser, num_train_samples) + crd_nce_loss(
        teacher_logits, teacher_normaliser, num_train_samples
    )
