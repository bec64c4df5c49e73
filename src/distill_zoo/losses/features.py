"""Losses on feature maps: FitNets, AT, AB, FT, FSP, NST, OFD, ReviewKD's HCL."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_zoo.losses.common import (
    as_list,
    check_formulation,
    check_pairs,
    fp32,
    match_spatial,
    zero_loss,
)


@fp32
def hint_loss(
    student_hint: Tensor, teacher_hint: Tensor, formulation: str = "repdistiller"
) -> Tensor:
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015),
    https://arxiv.org/abs/1412.6550.

    L2 distance between the regressed student guided layer ``r(v_g)`` and the teacher hint
    ``u_h``, which must have the same shape.

    - ``repdistiller`` (default): mean squared error over all elements (``nn.MSELoss``).
    - ``paper``: ``1/2 * ||u_h - r(v_g)||^2`` per sample (Eq. 3), averaged over the batch.

    Args:
        student_hint: Regressed student features, any shape ``[B, ...]``.
        teacher_hint: Teacher hint features, same shape.
        formulation: ``"repdistiller"`` or ``"paper"``.
    """
    check_formulation(formulation)
    if student_hint.shape != teacher_hint.shape:
        raise ValueError(
            f"the regressed student hint {tuple(student_hint.shape)} and the teacher hint "
            f"{tuple(teacher_hint.shape)} differ in shape"
        )
    diff = student_hint.float() - teacher_hint.float()
    if formulation == "repdistiller":
        return diff.pow(2).mean()
    return 0.5 * diff.pow(2).sum() / diff.shape[0]


@fp32
def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Activation-based spatial attention ``Q = mean_c |A_c|^p``, flattened to ``[B, H*W]`` and
    L2-normalised per sample (Zagoruyko & Komodakis, ICLR 2017, Sec. 3.1; the mean over
    channels differs from their sum by a constant that the normalisation removes)."""
    q = feature.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, p=2.0, dim=1)


@fp32
def at_loss(
    student_features: Tensor | Sequence[Tensor],
    teacher_features: Tensor | Sequence[Tensor],
    p: float = 2.0,
    formulation: str = "repdistiller",
) -> Tensor:
    """Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer" (ICLR 2017),
    https://arxiv.org/abs/1612.03928.

    Summed over the matched layer pairs ``j``, with ``q = Q / ||Q||_2`` from
    :func:`attention_map` (the larger feature map is first average-pooled to the smaller's
    spatial size, as in RepDistiller):

    - ``repdistiller`` (default; also the authors' code): ``mean_{b, position} (q_s - q_t)^2``.
    - ``paper``: ``mean_b ||q_s - q_t||_2`` (Eq. 2 without its ``beta/2``, which is the
      distiller's weight).

    Args:
        student_features: One ``[B, C_s, H, W]`` map or a sequence of them.
        teacher_features: The matching teacher map(s); channels may differ.
        p: Exponent of the attention map.
        formulation: ``"repdistiller"`` or ``"paper"``.
    """
    check_formulation(formulation)
    student, teacher = as_list(student_features), as_list(teacher_features)
    check_pairs(student, teacher, "at_loss")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        q_s, q_t = (attention_map(f, p) for f in match_spatial(s, t))
        diff = q_s - q_t
        if formulation == "repdistiller":
            total = total + diff.pow(2).mean()
        else:
            total = total + diff.norm(p=2, dim=1).mean()
    return total


@fp32
def ab_loss(
    student_preacts: Tensor | Sequence[Tensor],
    teacher_preacts: Tensor | Sequence[Tensor],
    margin: float = 1.0,
    formulation: str = "repdistiller",
) -> Tensor:
    """Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons" (AAAI 2019), https://arxiv.org/abs/1811.03233.

    The alternative loss of Eq. 6: a student neuron whose teacher neuron is active
    (``t > 0``) is pushed above ``+margin``, one whose teacher neuron is off below
    ``-margin``, each with a squared hinge. Per layer pair, summed over every neuron and
    averaged over the batch::

        l = mean_b sum_{c,h,w} [ (t > 0) * relu(margin - s)^2 + (t <= 0) * relu(margin + s)^2 ]

    - ``paper``: ``sum_j l_j`` over the layer pairs.
    - ``repdistiller`` (default): ``sum_j 2^(j - n + 1) * l_j * 3 / 1000``, RepDistiller's
      weighting (the deepest pair weighs 1, each earlier one half the next) and scale.

    Args:
        student_preacts: The student's pre-activations brought to the teacher's shape by the
            connector, one ``[B, C, H, W]`` map or a sequence of them.
        teacher_preacts: The teacher's pre-activations (only their sign is used).
        margin: The margin ``mu`` (1 in the paper and in RepDistiller).
        formulation: ``"repdistiller"`` or ``"paper"``.
    """
    check_formulation(formulation)
    student, teacher = as_list(student_preacts), as_list(teacher_preacts)
    check_pairs(student, teacher, "ab_loss")
    total = student[0].new_zeros((), dtype=torch.float32)
    n = len(student)
    for j, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.shape != t.shape:
            raise ValueError(
                f"ab_loss pair {j}: the connected student map {tuple(s.shape)} and the teacher "
                f"map {tuple(t.shape)} differ in shape"
            )
        s, active = s.float(), t > 0
        hinge = torch.where(active, F.relu(margin - s), F.relu(margin + s)).pow(2)
        layer = hinge.sum() / s.shape[0]
        if formulation == "repdistiller":
            layer = layer * 2.0 ** (j - n + 1) * 3 / 1000
        total = total + layer
    return total


@fp32
def factor(feature: Tensor, formulation: str = "repdistiller") -> Tensor:
    """A factor as one unit vector per sample (Kim et al., NeurIPS 2018, Eq. 2's
    ``F / ||F||_2``): ``paper`` flattens the whole ``[B, C, H, W]`` factor; ``repdistiller``
    first takes the mean of squares over channels (``[B, H*W]``), as RepDistiller does."""
    check_formulation(formulation)
    f = feature.float()
    if formulation == "repdistiller":
        f = f.pow(2).mean(dim=1)
    return F.normalize(f.flatten(1), p=2.0, dim=1)


@fp32
def ft_loss(
    student_factor: Tensor, teacher_factor: Tensor, formulation: str = "repdistiller"
) -> Tensor:
    """Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer"
    (NeurIPS 2018), https://arxiv.org/abs/1802.04977.

    The L1 distance between the normalised factors of :func:`factor` (Eq. 2, ``p = 1``); the
    larger map is first average-pooled to the smaller's resolution.

    - ``paper``: ``mean_b || F_T/||F_T|| - F_S/||F_S|| ||_1`` with the whole factor.
    - ``repdistiller`` (default, the CRD benchmark's weight 200 belongs to it): the mean over
      batch and positions of ``|q_T - q_S|`` with channel-averaged squared factors.

    Args:
        student_factor: The translator's output ``[B, C, H, W]``.
        teacher_factor: The paraphraser's encoding of the teacher feature, same channels.
        formulation: ``"repdistiller"`` or ``"paper"``.
    """
    check_formulation(formulation)
    check_pairs([student_factor], [teacher_factor], "ft_loss")
    s, t = match_spatial(student_factor, teacher_factor)
    if formulation == "paper" and s.shape != t.shape:
        raise ValueError(
            f"ft_loss (paper) compares whole factors, but the student factor {tuple(s.shape)} "
            f"and the teacher factor {tuple(t.shape)} differ in channels"
        )
    diff = (factor(s, formulation) - factor(t, formulation)).abs()
    return diff.mean() if formulation == "repdistiller" else diff.sum(dim=1).mean()


@fp32
def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """Flow of solution procedure (FSP) matrix of two layers of one network (Yim et al.,
    CVPR 2017, Eq. 1): ``G[b, i, j] = 1/(h*w) * sum_{s,t} F1[b, i, s, t] * F2[b, j, s, t]``.

    The larger map is average-pooled to the smaller's spatial size first.

    Returns:
        ``[B, C1, C2]`` in fp32.
    """
    first, second = match_spatial(first.float(), second.float())
    positions = first.shape[-2] * first.shape[-1]
    return torch.bmm(first.flatten(2), second.flatten(2).transpose(1, 2)) / positions


@fp32
def fsp_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    formulation: str = "repdistiller",
) -> Tensor:
    """Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
    and Transfer Learning" (CVPR 2017),
    https://openaccess.thecvf.com/content_cvpr_2017/html/Yim_A_Gift_From_CVPR_2017_paper.html.

    FSP matrices (:func:`fsp_matrix`) of each pair of consecutive features, ``(f_0, f_1),
    (f_1, f_2), ...``, compared between student and teacher and summed over the pairs (the
    paper's ``lambda_i`` are all equal):

    - ``repdistiller`` (default): mean of ``(G_s - G_t)^2`` over batch and matrix entries.
    - ``paper``: squared Frobenius norm ``||G_t - G_s||_2^2`` per sample (Eq. 2), averaged
      over the batch.

    Args:
        student_features: At least two ``[B, C_i, H_i, W_i]`` student maps, in forward order.
        teacher_features: As many teacher maps; pair ``i`` must have the student's channels.
        formulation: ``"repdistiller"`` or ``"paper"``.
    """
    check_formulation(formulation)
    student, teacher = list(student_features), list(teacher_features)
    check_pairs(student, teacher, "fsp_loss")
    if len(student) < 2:
        raise ValueError("fsp_loss needs at least two features per network (one layer pair)")
    total = student[0].new_zeros((), dtype=torch.float32)
    for i in range(len(student) - 1):
        g_s = fsp_matrix(student[i], student[i + 1])
        g_t = fsp_matrix(teacher[i], teacher[i + 1])
        if g_s.shape != g_t.shape:
            raise ValueError(
                f"FSP matrices of pair {i} differ: student {tuple(g_s.shape)[1:]}, teacher "
                f"{tuple(g_t.shape)[1:]} (the channel counts of both layers must match)"
            )
        squared = (g_s - g_t).pow(2)
        if formulation == "repdistiller":
            total = total + squared.mean()
        else:
            total = total + squared.sum(dim=(1, 2)).mean()
    return total


def _poly_kernel_mean(a: Tensor, b: Tensor, degree: int, c: float) -> Tensor:
    """``mean_{i, j} (a_i^T b_j + c)^degree`` per sample, for ``a: [B, N, D], b: [B, M, D]``."""
    return (torch.bmm(a, b.transpose(1, 2)) + c).pow(degree).mean(dim=(1, 2))


@fp32
def nst_loss(
    student_features: Tensor | Sequence[Tensor],
    teacher_features: Tensor | Sequence[Tensor],
    degree: int = 2,
    c: float = 0.0,
) -> Tensor:
    """Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
    (arXiv 2017), https://arxiv.org/abs/1707.01219.

    Each channel's spatial map, flattened and L2-normalised over positions, is one sample of a
    network's distribution; the loss is the squared maximum mean discrepancy (Eq. 4) between
    the student's ``C_s`` and the teacher's ``C_t`` samples with the polynomial kernel
    ``k(x, y) = (x^T y + c)^d``,

        ``MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(s_j, t_i)``,

    per image, averaged over the batch and summed over the layer pairs. The paper's
    ``lambda/2`` is the distiller's weight. The larger map is average-pooled to the smaller's
    spatial size first; channel counts may differ. ``degree=1, c=0`` is the linear kernel.

    Args:
        student_features: One ``[B, C_s, H, W]`` map or a sequence of them.
        teacher_features: The matching teacher map(s).
        degree: Polynomial degree ``d`` (an integer, so negative dot products stay real).
        c: Kernel offset ``c``.
    """
    student, teacher = as_list(student_features), as_list(teacher_features)
    check_pairs(student, teacher, "nst_loss")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        s, t = match_spatial(s.float(), t.float())
        s = F.normalize(s.flatten(2), p=2.0, dim=2)
        t = F.normalize(t.flatten(2), p=2.0, dim=2)
        mmd = (
            _poly_kernel_mean(t, t, degree, c)
            + _poly_kernel_mean(s, s, degree, c)
            - 2 * _poly_kernel_mean(s, t, degree, c)
        )
        total = total + mmd.mean()
    return total


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor | None = None, min_mass: float = 1e-3) -> Tensor:
    """Per-channel margin of OFD's margin ReLU (Heo et al., "A Comprehensive Overhaul of
    Feature Distillation", ICCV 2019, https://arxiv.org/abs/1904.01866): the
    expectation of the teacher's negative responses, ``m_c = E[x | x < 0]``.

    A BatchNorm in eval mode outputs, per channel, about ``x ~ N(mu, s^2)`` with
    ``mu = bias`` and ``s = |weight|``, and for that Gaussian (a truncated-normal mean)::

        E[x | x < 0] = mu - s * phi(mu / s) / Phi(-mu / s)

    with ``phi``/``Phi`` the standard normal density/distribution. Where
    ``Phi(-mu / s) <= min_mass`` (almost no negative responses, the quotient is unstable) the
    official code's fallback ``-3 s`` is used; ``s = 0`` with ``mu <= 0`` gives ``mu``
    (every response equals ``mu``) and ``s = 0`` with ``mu > 0`` the fallback, 0. Computed in
    float64 and returned in the weight's dtype.

    Args:
        bn_weight: ``[C]`` scale ``gamma`` of the BatchNorm feeding the pre-activation.
        bn_bias: ``[C]`` shift ``beta``; ``None`` (a BatchNorm without affine parameters, whose
            output is standard normal) means 0.
        min_mass: The closed form is used where ``Phi(-mu / s) > min_mass`` (0.001 in the
            official code).
    """
    s = bn_weight.detach().double().abs()
    mu = torch.zeros_like(s) if bn_bias is None else bn_bias.detach().double()
    if s.shape != mu.shape or s.dim() != 1:
        raise ValueError(
            f"ofd_margin needs [C] BatchNorm weight and bias, got {tuple(s.shape)} and "
            f"{tuple(mu.shape)}"
        )
    z = mu / s  # +-inf or nan where s = 0: those fall to the branches below
    mass = torch.special.ndtr(-z)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    closed_form = mu - s * density / mass
    margin = torch.where(mass > min_mass, closed_form, -3 * s)
    margin = torch.where((s == 0) & (mu <= 0), mu, margin)
    return margin.to(bn_weight.dtype)


@fp32
def ofd_loss(
    student_preacts: Tensor | Sequence[Tensor],
    teacher_preacts: Tensor | Sequence[Tensor],
    margins: Tensor | Sequence[Tensor],
) -> Tensor:
    """Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019),
    https://arxiv.org/abs/1904.01866: the partial L2 distance between the student's
    connected pre-activations ``s`` and the margin-ReLU'd teacher pre-activations
    ``t' = max(t, m)`` (the margin ReLU, ``m`` per channel from :func:`ofd_margin`)::

        l_j = 1/B * sum_{b,c,h,w} (s - t')^2 * [ (s > t') or (t' > 0) ]

    i.e. where the teacher responds negatively (``t' <= 0``) a student below it is not
    penalised. Over the ``n`` layer pairs the official CIFAR code
    (https://github.com/clovaai/overhaul-distillation, ``CIFAR-100/distiller.py``;
    mdistiller's ``OFD`` is the same) halves the weight of each earlier pair,
    ``sum_j l_j / 2^(n - 1 - j)``; its extra ``1/1000`` (``loss_distill.sum() / batch_size /
    1000``) is left to the caller's weight.

    Args:
        student_preacts: The student's pre-activations through the connectors, one
            ``[B, C, H, W]`` map per pair, each the shape of its teacher map.
        teacher_preacts: The teacher's pre-activations.
        margins: One ``[C]`` margin per pair (negative numbers).
    """
    student, teacher = as_list(student_preacts), as_list(teacher_preacts)
    margins = as_list(margins)
    check_pairs(student, teacher, "ofd_loss")
    if len(margins) != len(teacher):
        raise ValueError(f"ofd_loss needs one margin per pair: {len(margins)} for {len(teacher)}")
    total = student[0].new_zeros((), dtype=torch.float32)
    n = len(student)
    for j, (s, t, m) in enumerate(zip(student, teacher, margins, strict=True)):
        if s.shape != t.shape:
            raise ValueError(
                f"ofd_loss pair {j}: the connected student map {tuple(s.shape)} and the "
                f"teacher map {tuple(t.shape)} differ in shape"
            )
        if m.shape != (t.shape[1],):
            raise ValueError(
                f"ofd_loss pair {j}: the margin has shape {tuple(m.shape)}, expected "
                f"({t.shape[1]},): one per teacher channel"
            )
        s, t = s.float(), t.float()
        target = torch.maximum(t, m.float().view(1, -1, 1, 1))
        counted = (s > target) | (target > 0)
        layer = ((s - target).pow(2) * counted).sum() / s.shape[0]
        total = total + layer / 2.0 ** (n - 1 - j)
    return total


HCL_LEVELS = (4, 2, 1)
"""Pooled resolutions of ReviewKD's hierarchical context loss (the authors' code)."""


@fp32
def hcl_loss(
    student_features: Tensor | Sequence[Tensor],
    teacher_features: Tensor | Sequence[Tensor],
    levels: Sequence[int] = HCL_LEVELS,
) -> Tensor:
    """The hierarchical context loss of Chen et al., "Distilling Knowledge via Knowledge
    Review" (CVPR 2021), https://arxiv.org/abs/2104.09044.

    For each pair of equally shaped ``[B, C, H, W]`` maps ``(s, t)``: the mean squared error
    at full resolution (weight 1), plus the mean squared error after adaptive average pooling
    both to ``l x l`` for each ``l`` in ``levels`` smaller than ``min(H, W)`` (coarser levels
    of the spatial pyramid), the ``k``-th level used weighing ``2^-k`` (1/2, 1/4, 1/8 when all
    of 4, 2, 1 apply: a level the map is too small for is skipped, not given weight 0, as in
    the authors' code). Each pair's weighted sum is divided by the sum of its weights; the
    result is summed over pairs. A ``1 x 1`` pair (a pooled embedding) is plain MSE.

    Args:
        student_features: The student's (fused) maps, one per level, or a single map.
        teacher_features: The teacher's maps, of the same shapes.
        levels: The pooled sizes, in the order they are weighted (default ``(4, 2, 1)``).
    """
    student, teacher = as_list(student_features), as_list(teacher_features)
    check_pairs(student, teacher, "hcl_loss")
    total = zero_loss(student[0])
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.shape != t.shape:
            raise ValueError(
                f"hcl_loss: pair {i} differs in shape: student {tuple(s.shape)}, teacher "
                f"{tuple(t.shape)} (ReviewKD's fusion modules must map to the teacher's shape)"
            )
        s, t = s.float(), t.float()
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for level in levels:
            if level >= min(s.shape[-2:]):
                continue
            weight /= 2
            pooled = F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
            loss = loss + weight * pooled
            weights += weight
        total = total + loss / weights
    return total
