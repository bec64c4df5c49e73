"""Loss functions of the distillation methods: pure, stateless, config-free.

Each takes tensors and hyper-parameters and returns a scalar. Softened-softmax maths runs in
fp32 even under mixed precision, since bf16/fp16 log-softmax at high temperature loses the
small probabilities that carry the "dark knowledge".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
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


# --- FitNets, AT, FSP, NST: feature maps ---------------------------------------------

FORMULATIONS = ("repdistiller", "paper")
"""``repdistiller``: the reference code of Tian et al. (CRD, ICLR 2020), whose CIFAR-100
benchmark the default weights belong to; ``paper``: the formula as the method's paper writes it."""


def _check_formulation(formulation: str) -> None:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")


def _as_list(features: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [features] if isinstance(features, Tensor) else list(features)


def _check_pairs(student: list[Tensor], teacher: list[Tensor], method: str) -> None:
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
    _check_formulation(formulation)
    if student_hint.shape != teacher_hint.shape:
        raise ValueError(
            f"the regressed student hint {tuple(student_hint.shape)} and the teacher hint "
            f"{tuple(teacher_hint.shape)} differ in shape"
        )
    diff = student_hint.float() - teacher_hint.float()
    if formulation == "repdistiller":
        return diff.pow(2).mean()
    return 0.5 * diff.pow(2).sum() / diff.shape[0]


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Activation-based spatial attention ``Q = mean_c |A_c|^p``, flattened to ``[B, H*W]`` and
    L2-normalised per sample (Zagoruyko & Komodakis, ICLR 2017, Sec. 3.1; the mean over
    channels differs from their sum by a constant that the normalisation removes)."""
    q = feature.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, p=2.0, dim=1)


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
    _check_formulation(formulation)
    student, teacher = _as_list(student_features), _as_list(teacher_features)
    _check_pairs(student, teacher, "at_loss")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        q_s, q_t = (attention_map(f, p) for f in match_spatial(s, t))
        diff = q_s - q_t
        if formulation == "repdistiller":
            total = total + diff.pow(2).mean()
        else:
            total = total + diff.norm(p=2, dim=1).mean()
    return total


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
    _check_formulation(formulation)
    student, teacher = _as_list(student_preacts), _as_list(teacher_preacts)
    _check_pairs(student, teacher, "ab_loss")
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


def factor(feature: Tensor, formulation: str = "repdistiller") -> Tensor:
    """A factor as one unit vector per sample (Kim et al., NeurIPS 2018, Eq. 2's
    ``F / ||F||_2``): ``paper`` flattens the whole ``[B, C, H, W]`` factor; ``repdistiller``
    first takes the mean of squares over channels (``[B, H*W]``), as RepDistiller does."""
    _check_formulation(formulation)
    f = feature.float()
    if formulation == "repdistiller":
        f = f.pow(2).mean(dim=1)
    return F.normalize(f.flatten(1), p=2.0, dim=1)


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
    _check_formulation(formulation)
    _check_pairs([student_factor], [teacher_factor], "ft_loss")
    s, t = match_spatial(student_factor, teacher_factor)
    if formulation == "paper" and s.shape != t.shape:
        raise ValueError(
            f"ft_loss (paper) compares whole factors, but the student factor {tuple(s.shape)} "
            f"and the teacher factor {tuple(t.shape)} differ in channels"
        )
    diff = (factor(s, formulation) - factor(t, formulation)).abs()
    return diff.mean() if formulation == "repdistiller" else diff.sum(dim=1).mean()


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
    _check_formulation(formulation)
    student, teacher = list(student_features), list(teacher_features)
    _check_pairs(student, teacher, "fsp_loss")
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
    student, teacher = _as_list(student_features), _as_list(teacher_features)
    _check_pairs(student, teacher, "nst_loss")
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


# --- SP, CC, RKD, PKT, VID: relations within the batch -------------------------------

CC_MODES = ("repdistiller", "gaussian", "bilinear")
PKT_REDUCTIONS = ("mean", "batchmean", "sum")


def _fp32(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Runs ``loss`` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(loss)
    def wrapper(*args, **kwargs) -> Tensor:
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return loss(*args, **kwargs)

    return wrapper


def _flat(x: Tensor) -> Tensor:
    """``[B, ...]`` -> ``[B, D]`` in fp32."""
    return x.float().reshape(x.shape[0], -1)


def _check_batch(student: Tensor, teacher: Tensor, method: str) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{method}: student batch {student.shape[0]} and teacher batch {teacher.shape[0]} "
            "differ: both must see the same images"
        )


def _zero(x: Tensor) -> Tensor:
    """A zero loss that keeps ``x`` in the graph (for batches too small to relate)."""
    return x.float().sum() * 0.0


@_fp32
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
    _check_batch(student_features, teacher_features, "sp_loss")
    s, t = _flat(student_features), _flat(teacher_features)
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


@_fp32
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
    _check_batch(student_embedding, teacher_embedding, "cc_loss")
    s, t = _flat(student_embedding), _flat(teacher_embedding)
    b = s.shape[0]
    if mode == "repdistiller":
        if s.shape != t.shape:
            raise ValueError(
                f"cc_loss mode 'repdistiller' needs equal embedding widths, got {s.shape[1]} "
                f"(student) and {t.shape[1]} (teacher)"
            )
        if b < 2:
            return _zero(s)
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


@_fp32
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
    _check_batch(student_features, teacher_features, "rkd_loss")
    s, t = _flat(student_features), _flat(teacher_features)
    if s.shape[0] < 2:
        return _zero(s)
    loss = _zero(s)
    if distance_weight:
        off_diagonal = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        d_s, d_t = _distances(s), _distances(t)
        d_s = d_s / d_s[off_diagonal].mean().clamp_min(1e-12)
        d_t = d_t / d_t[off_diagonal].mean().clamp_min(1e-12)
        loss = loss + distance_weight * F.smooth_l1_loss(d_s, d_t, beta=1.0)
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t), beta=1.0)
    return loss


@_fp32
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
    _check_batch(student_features, teacher_features, "pkt_loss")

    def conditional(x: Tensor) -> Tensor:
        x = x / (x.norm(p=2, dim=1, keepdim=True) + eps)
        similarity = (x @ x.t() + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    p_s = conditional(_flat(student_features))
    p_t = conditional(_flat(teacher_features))
    kl = p_t * torch.log((p_t + eps) / (p_s + eps))
    if reduction == "mean":
        return kl.mean()
    if reduction == "batchmean":
        return kl.sum() / kl.shape[0]
    return kl.sum()


@_fp32
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


# --- CRD: contrastive representation distillation ------------------------------------


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


# --- Logit methods: standardization, logit matching, DKD, DIST, Tf-KD -----------------

TF_KD_FORMULATIONS = ("official", "paper")
"""``official``: the authors' code (``loss_kd_regularization``), which the published CIFAR-100
hyper-parameters belong to; ``paper``: the formula as the Tf-KD paper writes it."""


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, method: str) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{method} needs [batch, classes] student and teacher logits of one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}: do student and "
            "teacher have the same number of classes?"
        )


def _check_targets(logits: Tensor, targets: Tensor, method: str) -> None:
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"{method} needs one class index per sample: targets {tuple(targets.shape)} for "
            f"logits {tuple(logits.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"{method} needs at least two classes, got {logits.shape[1]}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


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


@_fp32
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
    _check_logits(student_logits, teacher_logits, "logit_mse_loss")
    diff = student_logits.float() - teacher_logits.float()
    return 0.5 * diff.pow(2).sum() / diff.shape[0]


@_fp32
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
    _check_temperature(temperature)
    _check_logits(student_logits, teacher_logits, "prob_mse_loss")
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


@_fp32
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
    _check_temperature(temperature)
    _check_logits(student_logits, teacher_logits, "tckd_loss")
    _check_targets(student_logits, targets, "tckd_loss")
    binary_s, _ = _target_split(student_logits, targets, temperature)
    binary_t, _ = _target_split(teacher_logits, targets, temperature)
    return _reduce_kl(binary_s, binary_t, reduction) * temperature**2


@_fp32
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
    _check_temperature(temperature)
    _check_logits(student_logits, teacher_logits, "nckd_loss")
    _check_targets(student_logits, targets, "nckd_loss")
    _, others_s = _target_split(student_logits, targets, temperature)
    _, others_t = _target_split(teacher_logits, targets, temperature)
    return _reduce_kl(others_s, others_t, reduction) * temperature**2


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


def pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise Pearson correlation of two ``[N, D]`` tensors: the cosine similarity of the
    mean-centred rows, ``<a_c, b_c> / (||a_c|| * ||b_c|| + eps)`` (``eps`` as in the DIST
    authors' code; it makes a constant row correlate 0 instead of NaN). Returns ``[N]``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@_fp32
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
    _check_temperature(tau)
    _check_logits(student_logits, teacher_logits, "dist_loss")
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
    probs = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    return probs.scatter(1, targets.view(-1, 1), correct_prob)


@_fp32
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
    _check_temperature(temperature)
    if student_logits.dim() != 2:
        raise ValueError(f"tf_kd_reg_loss needs [B, K] logits, got {tuple(student_logits.shape)}")
    _check_targets(student_logits, targets, "tf_kd_reg_loss")
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


# --- OFD, CTKD: margin-clipped pre-activations; a learned, adversarial temperature -----


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
    student, teacher = _as_list(student_preacts), _as_list(teacher_preacts)
    margins = _as_list(margins)
    _check_pairs(student, teacher, "ofd_loss")
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
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1, keepdim=True)
        return (kl * t.pow(2)).sum() / batch


# --- ReviewKD, DarkRank: fused multi-level features, cross-sample rankings -------------

HCL_LEVELS = (4, 2, 1)
"""Pooled resolutions of ReviewKD's hierarchical context loss (the authors' code)."""


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
    student, teacher = _as_list(student_features), _as_list(teacher_features)
    _check_pairs(student, teacher, "hcl_loss")
    with torch.autocast(device_type=student[0].device.type, enabled=False):
        return _hcl_fp32(student, teacher, levels)


def _hcl_fp32(student: list[Tensor], teacher: list[Tensor], levels: Sequence[int]) -> Tensor:
    total = _zero(student[0])
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


DARKRANK_TRANSFERS = ("hard", "soft")
MAX_SOFT_LIST = 8
"""Longest list the soft transfer enumerates (8! = 40320 permutations per anchor)."""


@_fp32
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
    return -alpha * _distances(_flat(embeddings)).pow(beta)


def plackett_luce_log_prob(ordered_scores: Tensor) -> Tensor:
    """``log P(pi | S)`` of the Plackett-Luce (permutation) model, where ``ordered_scores``
    holds the scores in the order ``pi`` ranks them (best first) along the last dimension:
    ``P(pi | S) = prod_j exp(S_pi(j)) / sum_{k >= j} exp(S_pi(k))``.
    """
    s = ordered_scores.float()
    tail_logsumexp = s.flip(-1).logcumsumexp(dim=-1).flip(-1)  # [..., j] = lse_{k >= j} s_k
    return (s - tail_logsumexp).sum(dim=-1)


@_fp32
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


@_fp32
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
    _check_batch(student_embeddings, teacher_embeddings, "darkrank_loss")
    s, t = _flat(student_embeddings), _flat(teacher_embeddings)
    b = s.shape[0]
    length = b - 1 if list_length is None else min(list_length, b - 1)
    if transfer == "soft" and length > MAX_SOFT_LIST:
        raise ValueError(
            f"the soft transfer enumerates all L! permutations of each list, but L={length}: "
            f"set list_length <= {MAX_SOFT_LIST} or use transfer='hard'"
        )
    if b < 3:
        return _zero(s)  # fewer than two others: every ranking is certain
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
