"""Sequence-level knowledge distillation: the student learns the teacher's own output."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.token_kd import prompt_tokens, sequence_length
from distill_zoo.engine.fsdp import is_sharded
from distill_zoo.losses.language import IGNORE_INDEX, token_cross_entropy
from distill_zoo.models.language import generate, lm_logits

GENERATION_BATCH = 256
"""Prompts per batch when the teacher writes the cache."""


class SequenceKD(Distiller):
    """Kim & Rush, "Sequence-Level Knowledge Distillation" (EMNLP 2016),
    https://arxiv.org/abs/1606.07947. The teacher's most likely continuation replaces the
    data as the student's target: from the first ``prompt_length`` tokens of each training
    sequence the teacher writes the rest (greedy, or beam search with ``num_beams``, as their
    beam-searched Seq-KD), and the student is trained by next-token cross-entropy on the
    teacher's tokens (the prompt positions do not count).

    ``cache=true`` (their recipe: translate the training set once) generates the continuation
    of every training sequence when training starts (on every DDP process; again after a
    resume, identically since decoding is deterministic) and keeps them in memory
    (``N x (L + 1)`` token ids); ``cache=false`` generates each batch's on the fly (no start-up
    cost, a teacher decode every step).

    ``loss = ce_weight * CE(s, y) + kd_weight * CE(s, teacher's tokens)``: ``ce`` on the data
    (an extra student pass; ``ce_weight=0``: Seq-KD alone, as the paper's Seq-KD), ``kd`` on
    the teacher's text (Kim & Rush's Seq-KD + data interpolation keeps both).

    Args:
        prompt_length: Tokens of each sequence the teacher continues; ``None``: half.
        cache: Generate the training set's continuations once (else per batch).
        num_beams: Beams of the teacher's decoding (1: greedy).
        kd_weight: Weight of the cross-entropy on the teacher's continuation.
        ce_weight: Weight of the cross-entropy on the data.
    """

    tasks = ("language_modeling",)
    # The teacher's logits are never read: the module's own teacher pass is skipped.
    teacher_after_student = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        prompt_length: int | None = None,
        cache: bool = True,
        num_beams: int = 1,
        kd_weight: float = 0.5,
        ce_weight: float = 0.5,
    ) -> None:
        super().__init__(
            student, teacher, context=context, ce_weight=ce_weight, kd_weight=kd_weight
        )
        length = sequence_length(self.context)
        self.prompt_length = prompt_tokens(prompt_length, length)
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        self.length = length
        self.use_cache = cache
        self.num_beams = num_beams
        size = (self.context.num_train_samples if cache else 0, length + 1)
        self.register_buffer("sequences", torch.zeros(size, dtype=torch.int64), persistent=False)
        self.cached = False

    def replicated_buffers(self) -> list[str]:
        """The cache: every process writes the same continuations."""
        return ["sequences"]

    def runs_alone_because(self) -> str | None:
        return "the student learns from the teacher's text, not from the batch"

    def _continue(self, teacher: nn.Module, prompts: Tensor) -> Tensor:
        new_tokens = self.length + 1 - self.prompt_length
        return generate(teacher, prompts, new_tokens, num_beams=self.num_beams)

    def before_training(self, trainer: Any, teacher: Any) -> None:
        if not self.use_cache:
            return
        if is_sharded(trainer):
            raise ValueError(
                "distiller.cache=true has the teacher write before training, outside the steps "
                "in which FSDP gathers its shards: set distiller.cache=false under trainer=fsdp"
            )
        module, datamodule = trainer.lightning_module, trainer.datamodule
        splits = getattr(datamodule, "splits", None)
        if not splits or "blocks" not in splits.get("train", {}):
            raise ValueError(
                "distiller.cache=true generates the continuations of the in-memory text data "
                f"(data=pydoc_topics, data=text_files), not of {type(datamodule).__name__}: set "
                "distiller.cache=false"
            )
        blocks = splits["train"]["blocks"]
        with torch.no_grad():
            for start in range(0, len(blocks), GENERATION_BATCH):
                prompts = blocks[start : start + GENERATION_BATCH, : self.prompt_length]
                written = self._continue(module.teacher, prompts.to(module.device))
                self.sequences[start : start + len(prompts)] = written
        self.cached = True

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
        if self.use_cache:
            if not self.cached:
                raise RuntimeError("the Seq-KD cache is empty: before_training did not run")
            sequences = self.sequences[indices]
        else:
            with torch.no_grad():
                sequences = self._continue(teacher, images[:, : self.prompt_length])
        inputs, teacher_targets = sequences[:, :-1], sequences[:, 1:].clone()
        teacher_targets[:, : self.prompt_length - 1] = IGNORE_INDEX  # the prompt is the data's
        outputs = {"logits": lm_logits(student, inputs), "targets": teacher_targets}
        prediction = task.student_forward(student, images, targets)[0] if self.ce_weight else None
        return prediction, outputs

    def teacher_pass(self, teacher: nn.Module, out: StepOutputs) -> dict[str, Any]:
        return {}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out) if out.student_logits is not None else {}
        logits, targets = out.student_outputs["logits"], out.student_outputs["targets"]
        chunk_size = getattr(out.task, "chunk_size", None)  # the task's, for its own CE too
        terms["kd"] = self.kd_weight * token_cross_entropy(
            logits, targets, IGNORE_INDEX, chunk_size
        )
        return terms
