"""Token-level divergences for distilling causal language models.

Every function takes per-token logits ``[B, L, V]`` (batch, sequence positions, vocabulary)
and returns a scalar: the mean over the counted positions of a divergence between the
teacher's and the student's next-token distributions. The divergences are those of the
language-model distillation literature:

- ``forward_kl``: ``KL(p || q)``, Hinton et al.'s soft-target loss applied at every token
  ("Distilling the Knowledge in a Neural Network", NIPS-W 2014,
  https://arxiv.org/abs/1503.02531).
- ``reverse_kl``: ``KL(q || p)``, the token-level objective of MiniLLM (Gu et al., "MiniLLM:
  Knowledge Distillation of Large Language Models", ICLR 2024,
  https://arxiv.org/abs/2306.08543).
- ``skew_kl`` / ``skew_reverse_kl``: DistiLLM's alpha-skew KL and alpha-skew reverse KL (Ko et
  al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024,
  https://arxiv.org/abs/2402.03898).
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024,
  https://arxiv.org/abs/2306.13649).

The teacher is either given as full logits or as a :class:`TopKLogProbs` cache entry (its
``k`` most probable tokens per position plus the mass of all the others). The maths runs in
fp32 (autocast off, fp16/bf16 inputs upcast), one chunk of sequence positions at a time when
``chunk_size`` is given, so that the fp32 copy of the ``[B, L, V]`` logits, the largest
tensor of a language-model step, never exists in full (torchtune computes its cross-entropy
in chunks for the same reason).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill_zoo.losses.common import LOW_PRECISION, check_temperature

IGNORE_INDEX = -100
"""Target of a position that does not count (a prompt, padding), as Hugging Face's labels."""

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd")
"""Names accepted by :func:`token_divergence`'s ``divergence``."""

_TINY = torch.finfo(torch.float32).tiny
"""Floor of a rest mass before its logarithm is taken (``log(_TINY)`` is about -87.3)."""


@dataclass(frozen=True, eq=False)
class TopKLogProbs:
    """The teacher's ``k`` most probable tokens per position at temperature ``T`` (a cache
    entry of a teacher-logit cache).

    Keeping only the ``k`` largest probabilities (and, implicitly, the mass ``1 - sum`` of
    all other tokens) shrinks a cached ``[..., V]`` distribution to ``[..., k]``;
    :func:`token_divergence` then compares teacher and student on ``k + 1`` buckets.

    Attributes:
        logprobs: ``[..., k]`` float32 log-probabilities of ``softmax(logits / T)``, in
            descending order.
        indices: ``[..., k]`` int64 token ids of those probabilities.
        temperature: The temperature ``T`` the log-probabilities were computed at.
    """

    logprobs: Tensor
    indices: Tensor
    temperature: float

    def __post_init__(self) -> None:
        if self.logprobs.dim() < 1 or self.logprobs.shape != self.indices.shape:
            raise ValueError(
                "TopKLogProbs needs logprobs and indices of one shape [..., k], got "
                f"{tuple(self.logprobs.shape)} and {tuple(self.indices.shape)}"
            )
        if self.indices.dtype.is_floating_point or self.indices.dtype == torch.bool:
            raise ValueError(
                f"TopKLogProbs indices must be integer token ids, got {self.indices.dtype}"
            )
        check_temperature(self.temperature)

    @property
    def k(self) -> int:
        """The number of tokens kept per position."""
        return self.logprobs.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The shape of the positions (``logprobs.shape`` without the last ``k``)."""
        return self.logprobs.shape[:-1]

    def rest_prob(self) -> Tensor:
        """``[...]`` the probability of all tokens outside the top ``k``,
        ``1 - sum exp(logprobs)``, computed as ``-expm1(logsumexp(logprobs))`` and clamped at 0
        (rounding may make the kept mass exceed 1 by an ulp)."""
        kept = torch.logsumexp(_upcast(self.logprobs), dim=-1).clamp(max=0.0)
        return -torch.expm1(kept)

    def rest_logprob(self) -> Tensor:
        """``[...]`` ``log(1 - sum exp(logprobs))``, with the mass floored at the smallest normal
        float32 so a rest of exactly 0 gives about -87.3, never ``-inf``."""
        return self.rest_prob().clamp_min(_TINY).log()

    def index(self, rows) -> TopKLogProbs:
        """The entry for ``rows`` of the leading dimensions (any index a tensor accepts)."""
        return TopKLogProbs(self.logprobs[rows], self.indices[rows], self.temperature)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TopKLogProbs:
        """The entry on ``device``."""
        return TopKLogProbs(
            self.logprobs.to(device, non_blocking=non_blocking),
            self.indices.to(device, non_blocking=non_blocking),
            self.temperature,
        )


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TopKLogProbs:
    """The ``k`` largest probabilities of ``softmax(teacher_logits / T)`` and their token ids.

    Args:
        teacher_logits: ``[..., V]`` teacher logits (any float dtype; maths in fp32).
        k: How many tokens to keep per position, ``1 <= k <= V``.
        temperature: The temperature ``T > 0`` the divergence will be computed at.

    Returns:
        A :class:`TopKLogProbs` with ``[..., k]`` float32 log-probabilities in descending
        order and int64 ids.
    """
    check_temperature(temperature)
    vocab = teacher_logits.shape[-1] if teacher_logits.dim() else 0
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V] = [1, {vocab}], got {k}")
    with _no_autocast(teacher_logits.device):
        logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        values, indices = logprobs.topk(k, dim=-1, largest=True, sorted=True)
    return TopKLogProbs(values, indices.long(), float(temperature))


def token_divergence(
    student_logits: Tensor,
    teacher: Tensor | TopKLogProbs,
    mask: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean over counted token positions of a divergence between teacher and student
    next-token distributions, times ``T^2``.

    Per position, with ``p = softmax(t / T)`` (teacher) and ``q = softmax(s / T)`` (student):

    - ``forward_kl``: ``KL(p || q)`` (Hinton et al., NIPS-W 2014,
      https://arxiv.org/abs/1503.02531, applied at every token).
    - ``reverse_kl``: ``KL(q || p)`` (MiniLLM, Gu et al., ICLR 2024,
      https://arxiv.org/abs/2306.08543, token-level objective).
    - ``skew_kl``: ``KL(p || alpha p + (1 - alpha) q)`` and
    - ``skew_reverse_kl``: ``KL(q || (1 - alpha) p + alpha q)``, DistiLLM's alpha-skew KL and
      alpha-skew reverse KL (Ko et al., ICML 2024, https://arxiv.org/abs/2402.03898, Eq. 4-5;
      the paper uses ``alpha = 0.1``). ``alpha = 0`` gives the forward / reverse KL,
      ``alpha = 1`` gives 0. DistiLLM's official ``skewed_forward_kl`` computes the
      cross-entropy form ``-sum p log m`` (it drops the entropy term of the first argument,
      the teacher's); here the true KL is computed: the same gradient, a value ``>= 0`` that
      is 0 when ``p == q``. (The official ``skewed_reverse_kl`` keeps the student's entropy
      term, since it depends on the student, and so is the true KL computed here too.)
    - ``jsd``: GKD's generalized Jensen-Shannon divergence (Agarwal et al., ICLR 2024,
      https://arxiv.org/abs/2306.13649): ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
      ``m = beta p + (1 - beta) q``; ``beta = 0.5`` is the classic JSD. The formula is
      identically 0 at ``beta = 0`` and ``beta = 1``, so, as the paper's text and TRL's
      ``generalized_jsd_loss`` do, ``beta == 0`` means ``KL(p || q)`` and ``beta == 1``
      means ``KL(q || p)`` exactly. The mixture is formed in log space
      (``logaddexp(log p + log beta, log q + log(1 - beta))``).

    Result: ``T^2 * sum_{counted} D / #counted`` (Hinton's ``T^2`` keeps the gradient scale
    independent of ``T``). A mask with no counted position gives a zero that is still
    connected to ``student_logits``' graph (its gradient is 0), never NaN.

    **Top-k teacher.** When ``teacher`` is a :class:`TopKLogProbs`, both distributions are
    collapsed onto ``k + 1`` buckets: the ``k`` cached token ids and "every other token". The
    teacher's buckets are ``exp(logprobs)`` and ``1 - sum``; the student's are ``q`` at the
    ``k`` ids and its rest mass, ``logsumexp`` of the other logits minus ``logsumexp`` of
    all. The divergence is then computed on these distributions. A rest mass is floored at
    the smallest normal float32 inside logarithms (so it is never ``log 0``); a teacher rest
    of exactly 0 contributes exactly 0 where it is the first argument of a KL. With
    ``k = V`` there is no rest bucket and the result equals the full computation.

    **Chunking.** With ``chunk_size``, the sequence dimension is split into chunks of that
    many positions; the per-position divergences are summed chunk by chunk. When autograd
    records and ``student_logits`` requires grad, each chunk runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: autograd then keeps only
    the chunk inputs (views of the logits) and the fp32 intermediates of one chunk exist at
    a time, in forward and in backward (recomputed there), at the price of computing each
    chunk's forward twice.

    Args:
        student_logits: ``[B, L, V]`` student logits, any float dtype (maths in fp32).
        teacher: ``[B, L, V]`` teacher logits, or a :class:`TopKLogProbs` of shape
            ``[B, L, k]`` made at ``temperature``.
        mask: ``[B, L]`` bool (or 0/1 integer), True where a position counts; None counts
            all.
        divergence: One of :data:`DIVERGENCES`.
        temperature: Softmax temperature ``T > 0``.
        alpha: Skew of ``skew_kl`` / ``skew_reverse_kl``, in ``[0, 1]``.
        beta: Weight of the generalized JSD, in ``[0, 1]``.
        chunk_size: Sequence positions per chunk (``>= 1``); None computes all at once.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On an unknown divergence, ``T <= 0``, ``alpha`` or ``beta`` outside
            ``[0, 1]``, student and teacher shapes that differ, a mask that is not ``[B, L]``,
            a top-k ``k`` outside ``[1, V]`` or ids ``>= V``, a cache made at another
            temperature, or a bad ``chunk_size``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    check_temperature(temperature)
    _check_unit("alpha", alpha)
    _check_unit("beta", beta)
    _check_chunk_size(chunk_size)
    if student_logits.dim() != 3:
        raise ValueError(
            "token_divergence needs [B, L, V] student logits, got shape "
            f"{tuple(student_logits.shape)}"
        )
    batch, length, vocab = student_logits.shape
    options = {"divergence": divergence, "temperature": temperature, "alpha": alpha, "beta": beta}
    if isinstance(teacher, TopKLogProbs):
        _check_topk(student_logits, teacher, temperature)
        fn = functools.partial(_topk_chunk, **options)
        tensors = (student_logits, teacher.logprobs, teacher.indices)
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher.shape)} differ: do student and teacher share a vocabulary?"
            )
        fn = functools.partial(_full_chunk, **options)
        tensors = (student_logits, teacher)
    mask = _check_mask(mask, batch, length)
    total = _chunked_sum(fn, tensors, mask, chunk_size)
    return total * temperature**2 / _count(mask, batch * length)


def token_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean next-token cross-entropy over the positions whose target is not ``ignore_index``.

    ``targets[b, i]`` is the token position ``i`` must predict: the caller aligns them (for a
    causal LM, ``logits[:, :-1]`` with ``labels[:, 1:]``); nothing is shifted here. The
    maths runs in fp32, chunked over the sequence as in :func:`token_divergence` (with
    checkpointing when a gradient is needed). If no target counts, the result is a zero
    connected to the graph of ``logits`` (gradient 0).

    Args:
        logits: ``[B, L, V]`` logits, any float dtype.
        targets: ``[B, L]`` integer token ids, ``ignore_index`` where a position does not count.
        ignore_index: The target value of positions to skip.
        chunk_size: Sequence positions per chunk (``>= 1``); None computes all at once.

    Returns:
        A float32 scalar.
    """
    _check_chunk_size(chunk_size)
    if logits.dim() != 3:
        raise ValueError(
            f"token_cross_entropy needs [B, L, V] logits, got shape {tuple(logits.shape)}"
        )
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"token_cross_entropy needs [B, L] = {tuple(logits.shape[:2])} targets, got "
            f"{tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    fn = functools.partial(_cross_entropy_chunk, ignore_index=ignore_index)
    total = _chunked_sum(fn, (logits, targets), None, chunk_size)
    return total / (targets != ignore_index).sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Chunk computations (each returns the fp32 sum of its positions' values).


def _full_chunk(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    *,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
) -> Tensor:
    with _no_autocast(student.device):
        log_q = F.log_softmax(_upcast(student) / temperature, dim=-1)
        log_p = F.log_softmax(_upcast(teacher) / temperature, dim=-1)
        per_position = _divergence(
            divergence, log_p.exp(), log_p, log_q.exp(), log_q, alpha=alpha, beta=beta
        )
        return _masked_sum(per_position, mask)


def _topk_chunk(
    student: Tensor,
    logprobs: Tensor,
    indices: Tensor,
    mask: Tensor | None,
    *,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
) -> Tensor:
    with _no_autocast(student.device):
        z = _upcast(student) / temperature
        indices = indices.long()
        log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
        log_q = z.gather(-1, indices) - log_norm
        log_p = _upcast(logprobs)
        p, q = log_p.exp(), log_q.exp()
        if indices.shape[-1] < z.shape[-1]:  # k < V: add the "every other token" bucket
            others = z.scatter(-1, indices, float("-inf"))
            log_q_rest = torch.logsumexp(others, dim=-1, keepdim=True) - log_norm
            kept = torch.logsumexp(log_p, dim=-1, keepdim=True).clamp(max=0.0)
            p_rest = -torch.expm1(kept)
            log_p_rest = p_rest.clamp_min(_TINY).log()
            p = torch.cat([p, p_rest], dim=-1)
            log_p = torch.cat([log_p, log_p_rest], dim=-1)
            q = torch.cat([q, log_q_rest.exp()], dim=-1)
            log_q = torch.cat([log_q, log_q_rest], dim=-1)
        per_position = _divergence(divergence, p, log_p, q, log_q, alpha=alpha, beta=beta)
        return _masked_sum(per_position, mask)


def _cross_entropy_chunk(
    logits: Tensor, targets: Tensor, mask: Tensor | None, *, ignore_index: int
) -> Tensor:
    del mask  # the targets carry it
    with _no_autocast(logits.device):
        z = _upcast(logits)
        return F.cross_entropy(
            z.reshape(-1, z.shape[-1]),
            targets.reshape(-1),
            ignore_index=ignore_index,
            reduction="sum",
        )


def _divergence(
    divergence: str,
    p: Tensor,
    log_p: Tensor,
    q: Tensor,
    log_q: Tensor,
    *,
    alpha: float,
    beta: float,
) -> Tensor:
    """Per-position divergence (summed over the last dimension) of teacher ``p`` and student
    ``q``, each given as probabilities and log-probabilities (the probabilities may hold an
    exact 0 where the logarithm was floored)."""
    if divergence == "forward_kl":
        return _kl(p, log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(q, log_q, log_p)
    if divergence == "skew_kl":
        if alpha == 0.0:
            return _kl(p, log_p, log_q)
        if alpha == 1.0:
            return (q * 0.0).sum(dim=-1)
        return _kl(p, log_p, _log_mixture(log_p, alpha, log_q))
    if divergence == "skew_reverse_kl":
        if alpha == 0.0:
            return _kl(q, log_q, log_p)
        if alpha == 1.0:
            return (q * 0.0).sum(dim=-1)
        return _kl(q, log_q, _log_mixture(log_p, 1.0 - alpha, log_q))
    # jsd
    if beta == 0.0:
        return _kl(p, log_p, log_q)
    if beta == 1.0:
        return _kl(q, log_q, log_p)
    log_m = _log_mixture(log_p, beta, log_q)
    return beta * _kl(p, log_p, log_m) + (1.0 - beta) * _kl(q, log_q, log_m)


def _kl(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """``sum a (log a - log b)`` over the last dimension (a term with ``a = 0`` is 0)."""
    return (a * (log_a - log_b)).sum(dim=-1)


def _log_mixture(log_a: Tensor, weight: float, log_b: Tensor) -> Tensor:
    """``log(weight a + (1 - weight) b)`` for ``0 < weight < 1``, in log space."""
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _masked_sum(per_position: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_position.sum()
    # where, not a product: a masked position's inf/huge value must not leak into the sum.
    return torch.where(mask, per_position, 0.0).sum()


# ---------------------------------------------------------------------------------------------
# Shared machinery.


def _chunked_sum(
    fn: Callable[..., Tensor],
    tensors: tuple[Tensor, ...],
    mask: Tensor | None,
    chunk_size: int | None,
) -> Tensor:
    """``fn(*tensors, mask)``, or the sum of ``fn`` over chunks of ``chunk_size`` positions
    of dimension 1, each checkpointed when the first tensor needs a gradient."""
    length = tensors[0].shape[1]
    if chunk_size is None or length <= chunk_size:
        return fn(*tensors, mask)
    recompute = torch.is_grad_enabled() and tensors[0].requires_grad
    total: Tensor | None = None
    for start in range(0, length, chunk_size):
        window = slice(start, start + chunk_size)
        parts = [t[:, window] for t in tensors]
        part_mask = None if mask is None else mask[:, window]
        if recompute:
            value = checkpoint(
                fn, *parts, part_mask, use_reentrant=False, preserve_rng_state=False
            )
        else:
            value = fn(*parts, part_mask)
        total = value if total is None else total + value
    assert total is not None
    return total


def _count(mask: Tensor | None, positions: int) -> Tensor | int:
    if mask is None:
        return max(positions, 1)
    return mask.sum().clamp_min(1)


def _check_mask(mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"mask must be [B, L] = {(batch, length)} like the logits' first two dimensions, "
            f"got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(
            f"mask must be bool (True = the position counts) or 0/1 integers, got {mask.dtype}"
        )
    return mask != 0


def _check_topk(student_logits: Tensor, teacher: TopKLogProbs, temperature: float) -> None:
    vocab = student_logits.shape[-1]
    if teacher.temperature != temperature:
        raise ValueError(
            f"the top-k teacher cache was made at temperature {teacher.temperature}, the loss "
            f"runs at {temperature}: rebuild the cache at {temperature} or use its temperature"
        )
    if teacher.logprobs.dim() != 3 or teacher.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and top-k teacher "
            f"{tuple(teacher.logprobs.shape)} differ in [B, L]: do student and teacher share "
            "a vocabulary and a tokenization?"
        )
    if not 1 <= teacher.k <= vocab:
        raise ValueError(f"top-k teacher has k = {teacher.k}, it must be in [1, V] = [1, {vocab}]")
    if teacher.indices.numel() and int(teacher.indices.max()) >= vocab:
        raise ValueError(
            f"top-k teacher holds token id {int(teacher.indices.max())} but the student "
            f"logits {tuple(student_logits.shape)} have V = {vocab}: do student and teacher "
            "share a vocabulary?"
        )


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(
            f"chunk_size must be a positive number of positions or None, got {chunk_size}"
        )


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in LOW_PRECISION else x


def _no_autocast(device: torch.device):
    """Autocast off on ``device`` (under it even fp32 inputs may be computed in bf16)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
