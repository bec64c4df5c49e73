"""Losses of dense prediction: per-pixel distributions, pair-wise affinities, channel
distributions (CWD) and Pearson-correlation feature imitation (PKD)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_zoo.losses.common import check_batch, check_temperature, fp32
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


def _check_maps(student: Tensor, teacher: Tensor, method: str) -> None:
    """Both ``[B, C, H, W]`` with the same batch size."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{method} needs [B, C, H, W] feature maps, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}"
        )
    check_batch(student, teacher, method)


@fp32
def pair_affinity(features: Tensor) -> Tensor:
    """The pair-wise similarity graph of Structured KD (Liu et al., "Structured Knowledge
    Distillation for Semantic Segmentation", CVPR 2019, https://arxiv.org/abs/1903.04197):
    ``a_ij = f_i^T f_j / (||f_i|| ||f_j||)``, the cosine similarity over channels
    between spatial nodes ``i`` and ``j``.

    Each node's ``C``-vector is divided by its L2 norm plus ``1e-8`` (so an all-zero node has
    zero affinity rather than NaN); gradients flow through the norm.

    Args:
        features: ``[B, C, H, W]`` feature map; each of its ``N = H*W`` positions is a node.

    Returns:
        ``[B, N, N]`` affinities, nodes in row-major (``h * W + w``) order.
    """
    nodes = features.float().flatten(2).transpose(1, 2)  # [B, N, C]
    nodes = nodes / (nodes.norm(dim=2, keepdim=True) + 1e-8)
    return torch.bmm(nodes, nodes.transpose(1, 2))


def _node_grid(height: int, width: int, pool_scale: float) -> tuple[int, int]:
    """Node grid of a ``height x width`` map cut into ``int(side * pool_scale)`` patches."""
    kh = max(1, int(height * pool_scale))
    kw = max(1, int(width * pool_scale))
    return math.ceil(height / kh), math.ceil(width / kw)


@fp32
def pairwise_affinity_loss(
    student_features: Tensor, teacher_features: Tensor, pool_scale: float = 0.5
) -> Tensor:
    """The pair-wise term of structured KD (Liu et al., "Structured Knowledge Distillation for
    Semantic Segmentation", CVPR 2019, https://arxiv.org/abs/1903.04197; extended in
    "Structured Knowledge Distillation for Dense Prediction", TPAMI 2020):

    ``l_pa = 1/(W'H')^2 * sum_i sum_j (a^s_ij - a^t_ij)^2``, averaged over the batch,

    with ``a`` the :func:`pair_affinity` of the pooled maps. Each node is a patch: the kernel
    is ``(max(1, int(H_t * pool_scale)), max(1, int(W_t * pool_scale)))`` of the teacher's
    size, the grid ``(ceil(H_t / kh), ceil(W_t / kw))``, and both maps are max-pooled to that
    grid with ``F.adaptive_max_pool2d``, so a student of another resolution or channel count
    still yields the same ``N x N`` graph. (Where ``H_t`` is not a multiple of ``kh``,
    adaptive pooling's bins differ slightly from a strided ``ceil_mode`` max-pool.)

    Args:
        student_features: ``[B, C_s, H_s, W_s]`` student feature map.
        teacher_features: ``[B, C_t, H_t, W_t]`` teacher feature map, same batch size.
        pool_scale: Patch side as a fraction of the teacher's side, ``0 < pool_scale <= 1``
            (``0.5`` as in the authors' code).
    """
    if not 0 < pool_scale <= 1:
        raise ValueError(f"pool_scale must be in (0, 1], got {pool_scale}")
    _check_maps(student_features, teacher_features, "pairwise_affinity_loss")
    grid = _node_grid(*teacher_features.shape[-2:], pool_scale)
    a_s = pair_affinity(F.adaptive_max_pool2d(student_features.float(), grid))
    a_t = pair_affinity(F.adaptive_max_pool2d(teacher_features.float(), grid))
    nodes = grid[0] * grid[1]
    return (a_t - a_s).pow(2).sum() / nodes**2 / a_t.shape[0]


def _check_same_shape(student: Tensor, teacher: Tensor, method: str) -> None:
    _check_maps(student, teacher, method)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{method}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} have "
            "different channel counts: map the student's channels with a connector (e.g. a "
            "1x1 convolution) first"
        )


@fp32
def cwd_loss(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
    Prediction", ICCV 2021, https://arxiv.org/abs/2011.13256).

    Each channel's map becomes a distribution over its ``H*W`` positions,
    ``phi(y_c) = softmax(y_c / tau)``, and
    ``loss = tau^2 / (B*C) * sum_{b,c} KL(phi(y^t_bc) || phi(y^s_bc))``.

    Args:
        student: ``[B, C, H, W]`` student map (logits or features after a connector).
        teacher: ``[B, C, H, W]`` teacher map of the same shape.
        tau: Temperature ``> 0``.
    """
    check_temperature(tau)
    _check_same_shape(student, teacher, "cwd_loss")
    if student.shape != teacher.shape:
        raise ValueError(
            f"cwd_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "differ in spatial size: resize one of them first"
        )
    log_p_s = F.log_softmax(student.float().flatten(2) / tau, dim=2)
    log_p_t = F.log_softmax(teacher.float().flatten(2) / tau, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * tau**2 / (student.shape[0] * student.shape[1])


def _standardize_channels(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[C, B*H*W]``, each row minus its mean over ``(torch.std + 1e-6)``."""
    rows = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = rows.mean(dim=1, keepdim=True)
    return (rows - mean) / (rows.std(dim=1, keepdim=True) + 1e-6)


@fp32
def pkd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient", NeurIPS 2022, https://arxiv.org/abs/2207.02039).

    Each map is standardised per channel over all ``n = B*H*W`` values,
    ``z = (x - mean) / (std + 1e-6)`` with the unbiased ``torch.std``, and
    ``loss = mse(z_s, z_t) / 2``. Per channel, ``sum z^2 = n - 1``, so (up to the ``1e-6``)
    ``loss = (n - 1) / n * (1 - mean_c r_c)`` with ``r_c`` the Pearson correlation of channel
    ``c``: ``1 - r`` exactly with the population std, as the paper writes it.

    A student of another spatial size is resized to the teacher's bilinearly
    (``align_corners=False``) first.

    Args:
        student: ``[B, C, H_s, W_s]`` student feature map.
        teacher: ``[B, C, H_t, W_t]`` teacher feature map, same ``B`` and ``C``.
    """
    _check_same_shape(student, teacher, "pkd_loss")
    student = student.float()
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(
            student, size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    z_s = _standardize_channels(student)
    z_t = _standardize_channels(teacher.float())
    return F.mse_loss(z_s, z_t) / 2
