"""Losses on relations within the batch: SP, CC, RKD, PKT, VID, DarkRank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_zoo.losses.common import check_batch, flat_fp32, fp32, zero_loss

CC_MODES = ("repdistiller", "gaussian", "bilinear")


PKT_REDUCTIONS = ("mean", "batchmean", "sum")


@fp32
def sp_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019),
    https://arxiv.org/abs/1907.09682.

    ``G = A A^T`` of the flattened activations ``A`` (``[b, C*H*W]``) of the batch, each row
    L2-normalised; ``loss = ||G_s - G_t||_F^2 / b^2`` (for one layer pair; sum the result
    over pairs). Student and teacher widths and resolutions may differ: both Gram
    matrices are ``b x b``.

    Args:
        student_features: ``[b, ...]`` student activations.
        teacher_features: ``[b, ...]`` teacher activations.
    """
    check_batch(student_features, teacher_features, "sp_loss")
    s, t = flat_fp32(student_features), flat_fp32(teacher_features)
    g_s = F.normalize(s @ s.t(), p=2, dim=1)
    g_t = F.normalize(t @ t.t(), p=2, dim=1)
    b = s.shape[0]
    return (g_s - g_t).pow(2).sum() / (b * b)


def _taylor_rbf(x: Tensor, gamma: float, order: int) -> Tensor:
    """``exp(-gamma ||x_i - x_j||^2)`` of unit vectors by its order-``P`` Taylor series:
    ``exp(-2 gamma) * sum_{p=0}^{P} (2 gamma)^p / p! * (x_i . x_j)^p``."""
    dots = x @ x.t()
    series = torch.zeros_like(dots)
    for p in range(order + 1):
        series = series + (2 * gamma) ** p / math.factorial(p) * dots.pow(p)
    return math.exp(-2 * gamma) * series


@fp32
def cc_loss(
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    mode: str = "repdistiller",
    gamma: float = 0.4,
    order: int = 2,
) -> Tensor:
    """Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019),
    https://arxiv.org/abs/1904.01802.

    Modes:
        ``"repdistiller"`` (the CRD benchmark's form, the code the authors sent to Tian et
            al.): with ``d_i = |s_i - t_i|`` (elementwise), the mean over consecutive samples
            of ``sum_k d_i[k] * d_{i+1}[k]``. Needs equal embedding widths.
        ``"gaussian"`` (the paper): rows L2-normalised, correlation matrix
            ``C_ij = exp(-2 gamma) sum_{p=0}^{P} (2 gamma)^p / p! (f_i . f_j)^p`` (the
            order-``P`` Taylor series of the Gaussian RBF ``exp(-gamma ||f_i - f_j||^2)``,
            exact in the limit for unit vectors), ``loss = ||C_s - C_t||_F^2 / b^2``.
        ``"bilinear"`` (the paper's bilinear-pooling kernel): as ``"gaussian"`` with
            ``C_ij = f_i . f_j`` of the L2-normalised rows.

    Args:
        student_embedding: ``[b, D_s]`` student embeddings.
        teacher_embedding: ``[b, D_t]`` teacher embeddings.
        mode: One of ``"repdistiller"``, ``"gaussian"``, ``"bilinear"``.
        gamma: RBF ``gamma`` (``"gaussian"`` only; the paper's 0.4).
        order: Taylor order ``P`` (``"gaussian"`` only; the paper's 2).
    """
    if mode not in CC_MODES:
        raise ValueError(f"unknown cc_loss mode {mode!r}; choose one of {CC_MODES}")
    check_batch(student_embedding, teacher_embedding, "cc_loss")
    s, t = flat_fp32(student_embedding), flat_fp32(teacher_embedding)
    b = s.shape[0]
    if mode == "repdistiller":
        if s.shape != t.shape:
            raise ValueError(
                f"cc_loss mode 'repdistiller' needs equal embedding widths, got {s.shape[1]} "
                f"(student) and {t.shape[1]} (teacher)"
            )
        if b < 2:
            return zero_loss(s)
        delta = (s - t).abs()
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()
    s, t = F.normalize(s, p=2, dim=1), F.normalize(t, p=2, dim=1)
    if mode == "gaussian":
        if order < 0:
            raise ValueError(f"the Taylor order must be >= 0, got {order}")
        c_s, c_t = _taylor_rbf(s, gamma, order), _taylor_rbf(t, gamma, order)
    else:
        c_s, c_t = s @ s.t(), t @ t.t()
    return (c_s - c_t).pow(2).sum() / (b * b)


def _distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``[b, b]`` Euclidean distances, exactly 0 on the diagonal, safe to differentiate."""
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=2)
    distances = squared.clamp_min(eps).sqrt()
    return distances * (1 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype))


def _angles(x: Tensor) -> Tensor:
    """``[b, b, b]`` cosines ``<e(x_j - x_i), e(x_k - x_i)>`` of the angle at vertex ``i``
    (``e`` normalises to unit length; degenerate triplets give 0)."""
    directions = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # [i, j] = x_j - x_i
    return directions @ directions.transpose(1, 2)


@fp32
def rkd_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """Park et al., "Relational Knowledge Distillation" (CVPR 2019),
    https://arxiv.org/abs/1904.05068.

    Distance-wise potential: pairwise distances, each divided by the mean distance over the
    pairs of distinct samples of its own network; angle-wise potential: the cosines of the
    angles of all triplets. Each is compared with the Huber loss (``delta = 1``, i.e.
    smooth-L1) averaged over all ``b^2`` pairs / ``b^3`` triplets, degenerate ones (repeated
    samples) contributing 0, as in the authors' code whose averaging the default weights 25
    (distance) and 50 (angle) belong to.

    Args:
        student_features: ``[b, ...]`` student embeddings (flattened).
        teacher_features: ``[b, ...]`` teacher embeddings (flattened); widths may differ.
        distance_weight: Weight of the distance-wise term.
        angle_weight: Weight of the angle-wise term.
    """
    check_batch(student_features, teacher_features, "rkd_loss")
    s, t = flat_fp32(student_features), flat_fp32(teacher_features)
    if s.shape[0] < 2:
        return zero_loss(s)
    loss = zero_loss(s)
    if distance_weight:
        off_diagonal = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        d_s, d_t = _distances(s), _distances(t)
        d_s = d_s / d_s[off_diagonal].mean().clamp_min(1e-12)
        d_t = d_t / d_t[off_diagonal].mean().clamp_min(1e-12)
        loss = loss + distance_weight * F.smooth_l1_loss(d_s, d_t, beta=1.0)
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t), beta=1.0)
    return loss


@fp32
def pkt_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    reduction: str = "mean",
    eps: float = 1e-7,
) -> Tensor:
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
    Transfer" (ECCV 2018), https://arxiv.org/abs/1803.10837.

    Cosine-similarity kernel of the L2-normalised features, shifted to ``[0, 1]`` as
    ``(cos + 1) / 2``, each row normalised to a conditional distribution ``p(j | i)`` (the
    self-similarity included, as in the authors' code); the loss is
    ``KL(teacher || student) = sum_ij t_ij log((t_ij + eps) / (s_ij + eps))``.

    Args:
        student_features: ``[b, ...]`` student features (flattened).
        teacher_features: ``[b, ...]`` teacher features (flattened); widths may differ.
        reduction: ``"mean"``: over all ``b^2`` entries (the authors' and RepDistiller's
            code, which the benchmark weight 30000 belongs to); ``"batchmean"``: the mean over
            anchors ``i`` of each row's KL; ``"sum"``: the double sum of the paper's formula.
        eps: Guards the norms and the logarithm.
    """
    if reduction not in PKT_REDUCTIONS:
        raise ValueError(f"unknown pkt_loss reduction {reduction!r}; one of {PKT_REDUCTIONS}")
    check_batch(student_features, teacher_features, "pkt_loss")

    def conditional(x: Tensor) -> Tensor:
        x = x / (x.norm(p=2, dim=1, keepdim=True) + eps)
        similarity = (x @ x.t() + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    p_s = conditional(flat_fp32(student_features))
    p_t = conditional(flat_fp32(teacher_features))
    kl = p_t * torch.log((p_t + eps) / (p_s + eps))
    if reduction == "mean":
        return kl.mean()
    if reduction == "batchmean":
        return kl.sum() / kl.shape[0]
    return kl.sum()


@fp32
def vid_loss(predicted_mean: Tensor, teacher_features: Tensor, variance: Tensor) -> Tensor:
    """Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019),
    https://arxiv.org/abs/1904.05835.

    The negative log-likelihood, up to constants, of the teacher feature ``t`` under a
    Gaussian with the regressed mean ``mu(s)`` and a per-channel variance ``sigma^2``:
    ``mean over elements of 0.5 * (log sigma^2 + (t - mu)^2 / sigma^2)``.

    Args:
        predicted_mean: ``[b, C, ...]`` the regressor's prediction from the student feature.
        teacher_features: ``[b, C, ...]`` teacher features of the same shape.
        variance: ``[C]`` positive per-channel variances.
    """
    if predicted_mean.shape != teacher_features.shape:
        raise ValueError(
            f"vid_loss: predicted mean {tuple(predicted_mean.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} differ"
        )
    channels = teacher_features.shape[1]
    if variance.shape != (channels,):
        raise ValueError(f"vid_loss: variance must have shape ({channels},), got {variance.shape}")
    var = variance.float().view(1, channels, *([1] * (teacher_features.dim() - 2)))
    squared_error = (teacher_features.float() - predicted_mean.float()).pow(2)
    return (0.5 * (torch.log(var) + squared_error / var)).mean()


DARKRANK_TRANSFERS = ("hard", "soft")


MAX_SOFT_LIST = 8
"""Longest list the soft transfer enumerates (8! = 40320 permutations per anchor)."""


@fp32
def darkrank_scores(embeddings: Tensor, alpha: float = 3.0, beta: float = 3.0) -> Tensor:
    """DarkRank's similarity scores ``S_ij = -alpha * ||x_i - x_j||_2^beta`` of every pair in
    the batch (Chen, Wang & Zhang, AAAI 2018, https://arxiv.org/abs/1707.01220):
    ``alpha`` scales, ``beta`` sharpens the contrast between near and far samples.

    Args:
        embeddings: ``[b, ...]`` embeddings (flattened).
        alpha: The scaling factor, ``> 0``.
        beta: The contrast exponent, ``> 0``.

    Returns:
        ``[b, b]`` scores, 0 on the diagonal.
    """
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"DarkRank needs alpha > 0 and beta > 0, got {alpha} and {beta}")
    return -alpha * _distances(flat_fp32(embeddings)).pow(beta)


@fp32
def plackett_luce_log_prob(ordered_scores: Tensor) -> Tensor:
    """``log P(pi | S)`` of the Plackett-Luce (permutation) model, where ``ordered_scores``
    holds the scores in the order ``pi`` ranks them (best first) along the last dimension:
    ``P(pi | S) = prod_j exp(S_pi(j)) / sum_{k >= j} exp(S_pi(k))``.
    """
    s = ordered_scores.float()
    tail_logsumexp = s.flip(-1).logcumsumexp(dim=-1).flip(-1)  # [..., j] = lse_{k >= j} s_k
    return (s - tail_logsumexp).sum(dim=-1)


@fp32
def listmle_loss(scores: Tensor, ranking: Tensor) -> Tensor:
    """ListMLE (Xia et al., ICML 2008): ``-log P(ranking | scores)`` under the Plackett-Luce
    model (:func:`plackett_luce_log_prob`), averaged over the rows.

    Args:
        scores: ``[b, n]`` scores of ``n`` items for each of ``b`` queries.
        ranking: ``[b, L]`` item indices in ranked order (best first), ``L <= n``; the
            probability is that of this list of ``L`` items alone.
    """
    if ranking.dim() != 2 or ranking.shape[0] != scores.shape[0]:
        raise ValueError(
            f"listmle_loss: ranking {tuple(ranking.shape)} must be [b, L] for scores "
            f"{tuple(scores.shape)}"
        )
    return -plackett_luce_log_prob(scores.float().gather(1, ranking)).mean()


@fp32
def darkrank_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    alpha: float = 3.0,
    beta: float = 3.0,
    transfer: str = "hard",
    list_length: int | None = 4,
    normalize: bool = True,
) -> Tensor:
    """Chen, Wang & Zhang, "DarkRank: Accelerating Deep Metric Learning via Cross Sample
    Similarities Transfer" (AAAI 2018), https://arxiv.org/abs/1707.01220.

    Each sample of the batch is a query; the others are ranked by their scores
    ``S = -alpha ||x_q - x_i||^beta`` (:func:`darkrank_scores`), and a ranking ``pi`` has the
    Plackett-Luce probability ``P(pi | S) = prod_j exp(S_pi(j)) / sum_{k >= j} exp(S_pi(k))``.
    The list of each query is the teacher's ``list_length`` nearest other samples (all
    ``b - 1`` others when ``None``), in the teacher's order.

    Transfers:
        ``"hard"``: ListMLE, ``-log P(pi_t | S_student)`` of the teacher's ranking
            ``pi_t`` (the most probable one under the teacher's scores).
        ``"soft"``: ``KL(P(. | S_teacher) || P(. | S_student))`` over all ``L!``
            permutations of the list, exactly (so ``L <= 8``).

    Averaged over queries.

    Args:
        student_embeddings: ``[b, ...]`` student embeddings (flattened).
        teacher_embeddings: ``[b, ...]`` teacher embeddings; widths may differ.
        alpha: Score scale.
        beta: Score contrast exponent.
        transfer: ``"hard"`` or ``"soft"``.
        list_length: Items ranked per query, ``>= 2`` (capped at ``b - 1``); ``None``: all.
        normalize: L2-normalise the embeddings first (distances then lie in ``[0, 2]``).
    """
    if transfer not in DARKRANK_TRANSFERS:
        raise ValueError(f"transfer must be one of {DARKRANK_TRANSFERS}, got {transfer!r}")
    if list_length is not None and list_length < 2:
        raise ValueError(f"list_length must be >= 2 (or None for all), got {list_length}")
    check_batch(student_embeddings, teacher_embeddings, "darkrank_loss")
    s, t = flat_fp32(student_embeddings), flat_fp32(teacher_embeddings)
    b = s.shape[0]
    length = b - 1 if list_length is None else min(list_length, b - 1)
    if transfer == "soft" and length > MAX_SOFT_LIST:
        raise ValueError(
            f"the soft transfer enumerates all L! permutations of each list, but L={length}: "
            f"set list_length <= {MAX_SOFT_LIST} or use transfer='hard'"
        )
    if b < 3:
        return zero_loss(s)  # fewer than two others: every ranking is certain
    if normalize:
        s, t = F.normalize(s, p=2, dim=1), F.normalize(t, p=2, dim=1)
    score_s = darkrank_scores(s, alpha, beta)
    score_t = darkrank_scores(t, alpha, beta).detach()
    self_mask = torch.eye(b, dtype=torch.bool, device=s.device)
    ranking = score_t.masked_fill(self_mask, float("-inf")).argsort(dim=1, descending=True)
    ranking = ranking[:, :length]  # the query itself sorts last and is never in the list
    if transfer == "hard":
        return listmle_loss(score_s, ranking)
    from itertools import permutations  # only the soft transfer needs it

    perms = torch.tensor(list(permutations(range(length))), dtype=torch.long, device=s.device)
    listed_s, listed_t = score_s.gather(1, ranking), score_t.gather(1, ranking)  # [b, L]
    log_p_s = plackett_luce_log_prob(listed_s[:, perms])  # [b, P]
    log_p_t = plackett_luce_log_prob(listed_t[:, perms])
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
