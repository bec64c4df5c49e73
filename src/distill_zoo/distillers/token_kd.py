"""Token-level distillation of causal language models: a divergence between the teacher's
and the student's next-token distributions at every position, on the data or on sequences
the student generates (on-policy)."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.losses.language import (
    DIVERGENCES,
    IGNORE_INDEX,
    teacher_topk,
    token_divergence,
)
from distill_zoo.models.language import generate, lm_logits
from distill_zoo.teachers.topk_cache import TopKCache


def sequence_length(context: DistillContext) -> int:
    """Tokens per training sequence (the run's ``data.block_size``), from the example input."""
    example = context.example_input
    return int(example.shape[-1]) if example is not None else 0


def prompt_tokens(prompt_length: int | None, length: int, check: bool = True) -> int:
    """The prompt kept from sequences of ``length`` tokens before a model writes the rest
    (on-policy samples, Seq-KD's teacher text); ``None``: half of it."""
    prompt = prompt_length if prompt_length is not None else max(length // 2, 1)
    if check and not 1 <= prompt < max(length, 2):
        raise ValueError(
            f"prompt_length={prompt} must leave room to generate in sequences of {length} "
            f"tokens: choose 1 <= prompt_length < {length}"
        )
    return prompt


class TokenKD(Distiller):
    """Token-level KD for causal LMs with the divergences of the LLM-distillation literature
    (:func:`~distill_zoo.losses.language.token_divergence`, all ``T^2``-scaled means over the
    positions that count):

    - ``forward_kl``: KL(p_T || q_S), Hinton et al. (NIPS-W 2014,
      https://arxiv.org/abs/1503.02531) applied at every position (``distiller=token_kd``);
    - ``reverse_kl``: KL(q_S || p_T), the divergence MiniLLM minimises (Gu et al., ICLR 2024,
      https://arxiv.org/abs/2306.08543; ``distiller=reverse_kl``), here per token on the data
      (MiniLLM optimises it by policy gradient on the student's own samples: ``lmbda=1`` puts
      every step on them, without the policy gradient);
    - ``skew_kl`` / ``skew_reverse_kl``: KL(p || a p + (1-a) q) and KL(q || (1-a) p + a q) of
      DistiLLM (Ko et al., ICML 2024, https://arxiv.org/abs/2402.03898), skew ``alpha``
      (``distiller=skew_kl``, ``distiller=skew_rkl``);
    - ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024,
      https://arxiv.org/abs/2306.13649) with ``beta`` (0: forward KL, 1: reverse KL).

    On-policy data (GKD): with probability ``lmbda`` a step's KD term is computed on sequences
    the student samples itself (at ``sampling_temperature``) from the first ``prompt_length``
    tokens of each sequence of the batch: the teacher scores the student's own tokens and the
    divergence counts only the generated positions. The hard-label ``ce`` term stays on the
    batch's real text (an extra student pass on on-policy steps; ``ce_weight=0`` skips it, as
    GKD's pure objective). Which steps are on-policy follows the run's seed and the step count
    (the same on every DDP process, and again after a resume).

    Memory for real vocabularies: ``chunk_size`` computes the divergence over that many
    positions at a time (the fp32 ``[B, L, V]`` upcast never exists at once), and ``topk``
    caches the teacher's ``topk`` most probable tokens per position (plus the mass of the
    rest) in the first epoch, so later epochs skip the teacher (:class:`TopKCache`).

    ``loss = ce_weight * CE(s, y) + kd_weight * D(p_T, q_S)``.

    Args:
        divergence: One of ``forward_kl``, ``reverse_kl``, ``skew_kl``, ``skew_reverse_kl``,
            ``jsd``.
        temperature: Softmax temperature ``T`` of both distributions.
        alpha: DistiLLM's skew (``skew_kl``, ``skew_reverse_kl`` only); ``None``: their 0.1.
        beta: GKD's JSD interpolation (``jsd`` only); ``None``: 0.5.
        kd_weight: Weight of the divergence.
        ce_weight: Weight of the next-token cross-entropy with the data.
        lmbda: Share of steps on student-generated sequences (GKD's lambda; 0: off-policy).
        sampling_temperature: Temperature of the student's sampling on on-policy steps
            (``lmbda > 0`` only); ``None``: 1.
        prompt_length: Tokens of each sequence kept as the prompt of on-policy generation;
            ``None``: half the sequence.
        chunk_size: Positions per chunk of the divergence; ``None``: all at once.
        topk: Cache the teacher's top-k tokens per position (``None``: no cache, the exact
            divergence). Off-policy steps only; the divergence is then the top-k approximation
            in every epoch.
    """

    tasks = ("language_modeling",)
    teacher_after_student = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        alpha: float | None = None,
        beta: float | None = None,
        kd_weight: float = 0.5,
        ce_weight: float = 0.5,
        lmbda: float = 0.0,
        sampling_temperature: float | None = None,
        prompt_length: int | None = None,
        chunk_size: int | None = None,
        topk: int | None = None,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            kd_temperature=temperature,
        )
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r} is not one of {DIVERGENCES}")
        # A knob the run would not read is an error, not a silent no-op.
        unread = [
            name
            for name, value, read in (
                ("alpha", alpha, divergence.startswith("skew")),
                ("beta", beta, divergence == "jsd"),
                ("prompt_length", prompt_length, lmbda > 0),
                ("sampling_temperature", sampling_temperature, lmbda > 0),
            )
            if value is not None and not read
        ]
        if unread:
            raise ValueError(
                f"distiller.{', distiller.'.join(unread)} would be ignored with "
                f"divergence={divergence}, lmbda={lmbda} (alpha: skew_* only; beta: jsd only; "
                "prompt_length, sampling_temperature: on-policy steps, lmbda > 0): leave it null"
            )
        alpha = 0.1 if alpha is None else alpha
        beta = 0.5 if beta is None else beta
        sampling_temperature = 1.0 if sampling_temperature is None else sampling_temperature
        for name, value in (("alpha", alpha), ("beta", beta), ("lmbda", lmbda)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if sampling_temperature <= 0:
            raise ValueError(f"sampling_temperature must be > 0, got {sampling_temperature}")
        length = sequence_length(self.context)
        self.prompt_length = prompt_tokens(prompt_length, length, check=lmbda > 0)
        if topk is not None and lmbda == 1:
            raise ValueError(
                "distiller.topk caches the teacher on the data, but lmbda=1 makes every step "
                "on-policy (the teacher scores the student's samples): set topk=null or lmbda < 1"
            )
        vocabulary = self.context.num_classes
        if topk is not None and vocabulary and topk > vocabulary:
            raise ValueError(f"topk={topk} exceeds the vocabulary of {vocabulary} tokens")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or null, got {chunk_size}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or null, got {topk}")
        self.divergence = divergence
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.lmbda = lmbda
        self.sampling_temperature = sampling_temperature
        self.chunk_size = chunk_size
        self.cache = (
            TopKCache(self.context.num_train_samples, length, topk, temperature)
            if topk is not None
            else None
        )
        # Steps taken, saved with the run: which steps are on-policy is drawn from it.
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.seed = torch.initial_seed()

    @property
    def topk(self) -> int | None:
        """Tokens per position the teacher's cache keeps (``None``: no cache)."""
        return None if self.cache is None else self.cache.k

    def runs_alone_because(self) -> str | None:
        if self.lmbda:
            return "its on-policy steps train on the student's samples, not on the batch"
        if self.cache is not None:
            return "its top-k cache skips the teacher, whose features other parts would read"
        return None

    def _on_policy_now(self) -> bool:
        if not self.lmbda:
            return False
        draw = random.Random(f"{self.seed}-{int(self.steps)}").random()
        return draw < self.lmbda

    def student_forward(
        self,
        task: Any,
        student: nn.Module,
        images: Tensor,
        targets: Any,
        *,
        indices: Tensor | None = None,
        teacher: nn.Module | None = None,
    ):
        on_policy = self._on_policy_now()
        if self.training:
            self.steps += 1
        if not on_policy:
            return task.student_forward(student, images, targets)
        # GKD: the student samples continuations of the batch's prompts; the KD term is
        # computed on its own tokens (no gradient through the sampling).
        new_tokens = images.shape[1] - self.prompt_length
        sequences = generate(
            student,
            images[:, : self.prompt_length],
            new_tokens,
            temperature=self.sampling_temperature,
        )
        generated_logits = lm_logits(student, sequences)
        mask = torch.zeros_like(sequences, dtype=torch.bool)
        mask[:, self.prompt_length - 1 : -1] = True  # positions that predict generated tokens
        prediction = task.student_forward(student, images, targets)[0] if self.ce_weight else None
        outputs = {"sequences": sequences, "logits": generated_logits, "mask": mask}
        return prediction, outputs

    def teacher_pass(self, teacher: nn.Module, out: StepOutputs) -> dict[str, Any]:
        sequences = out.student_outputs.get("sequences")
        if sequences is not None:
            if self.cache is not None:  # the other processes may store: take part
                self.cache.store_all(out.indices[:0])
            return {"teacher": lm_logits(teacher, sequences)}
        if self.cache is None:
            return {"teacher": lm_logits(teacher, out.images)}
        entry = self.cache.lookup(out.indices)
        if entry is not None:
            self.cache.store_all(out.indices[:0])
            return {"teacher": entry}
        entry = teacher_topk(lm_logits(teacher, out.images), self.cache.k, self.temperature)
        self.cache.store_all(out.indices, entry)
        return {"teacher": entry}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out) if out.student_logits is not None else {}
        if "logits" in out.student_outputs:
            student, mask = out.student_outputs["logits"], out.student_outputs["mask"]
        else:
            student, mask = out.student_logits, out.targets != IGNORE_INDEX
        divergence = token_divergence(
            student,
            out.teacher_outputs["teacher"],
            mask,
            divergence=self.divergence,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            chunk_size=self.chunk_size,
        )
        terms["kd"] = self.kd_weight * divergence
        return terms

    def monitored(self) -> dict[str, Tensor]:
        return {} if self.cache is None else {"teacher_cache_hit_rate": self.cache.hit_rate()}
