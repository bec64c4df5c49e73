"""Causal language modelling: predict every next token of a sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from distill_zoo.losses.language import IGNORE_INDEX, token_cross_entropy
from distill_zoo.models.language import generate, lm_logits, max_positions
from distill_zoo.tasks.base import Monitor, StepOutputs, Task, dry_forward

SAMPLES_FILE = "samples.json"


class TokenPerplexity(Metric):
    """``exp`` of the mean next-token cross-entropy over all counted positions of all batches
    (and processes). torchmetrics' ``Perplexity`` takes the log of a softmax, which underflows
    to ``inf`` for a target far below the top logit, and keeps fp32 ``[B, L, V]`` copies;
    this sums :func:`~distill_zoo.losses.language.token_cross_entropy` (log-softmax, in chunks
    of ``chunk_size`` positions) instead."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.add_state("nll", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, targets: Tensor) -> None:
        counted = (targets != IGNORE_INDEX).sum()
        mean = token_cross_entropy(logits, targets, IGNORE_INDEX, chunk_size=self.chunk_size)
        self.nll += mean.double() * counted
        self.count += counted

    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.count.clamp_min(1)).float()


class LanguageModelingTask(Task):
    """Batches ``(input ids [B, L], target ids [B, L], indices [B])``: ``targets[:, i]`` is
    the token after ``inputs[:, i]``, or ``-100`` where a position does not count. Models
    are causal LMs (:mod:`distill_zoo.models.language`) returning ``[B, L, V]`` logits.

    Loss ``ce``: the mean next-token cross-entropy over counted positions, computed in chunks
    of ``chunk_size`` positions (:func:`~distill_zoo.losses.language.token_cross_entropy`).
    Metrics: ``perplexity`` (exp of the mean cross-entropy, :class:`TokenPerplexity`)
    and ``acc`` (next-token accuracy) of student and teacher, and ``agreement``: the share of
    counted positions where student and teacher rank the same token first. A logit method
    sees one row per position (``logit_rows``).

    After a run, :meth:`write_samples` saves the greedy continuation of ``sample_prompt`` by
    the student and the teacher (``samples.json`` in the run folder).

    Args:
        num_classes: Vocabulary size (set from the data).
        chunk_size: Positions per chunk of the cross-entropy; ``None``: all at once.
        sample_prompt: The prompt of the saved sample generations.
        sample_tokens: Tokens generated after it.
    """

    name = "language_modeling"
    task_term = "ce"
    monitor = Monitor("perplexity", "min")
    summary_metrics = ("perplexity", "acc")
    teacher_metrics = ("perplexity", "acc")

    def __init__(
        self,
        num_classes: int = 0,
        chunk_size: int | None = None,
        sample_prompt: str = "The with statement is used to",
        sample_tokens: int = 64,
    ) -> None:
        super().__init__(num_classes)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"task.chunk_size must be >= 1 or null, got {chunk_size}")
        self.chunk_size = chunk_size
        self.sample_prompt = sample_prompt
        self.sample_tokens = sample_tokens
        self.block_size = 0
        self.vocabularies: dict[str, int] = {}

    def setup(self, datamodule: Any) -> None:
        super().setup(datamodule)
        self.block_size = int(getattr(datamodule, "block_size", 0))

    def check_model(self, model: nn.Module, example: Tensor, role: str) -> None:
        positions = max_positions(model)
        if positions is not None and self.block_size > positions:
            raise ValueError(
                f"the {role} reads at most {positions} positions, but data.block_size="
                f"{self.block_size}: lower data.block_size or raise {role}.max_positions"
            )
        logits = dry_forward(model, example.long(), lm_logits)
        if logits.dim() != 3 or logits.shape[:2] != example.shape[:2]:
            raise ValueError(
                f"the {role} predicts {tuple(logits.shape)} for token ids {tuple(example.shape)}"
                ": task=language_modeling needs [batch, length, vocabulary] logits; choose a "
                f"causal LM {role} (conf/{role}/lm_*)"
            )
        vocabulary = int(logits.shape[-1])
        if vocabulary < self.num_classes:
            raise ValueError(
                f"the {role} predicts {vocabulary} tokens, but the data's tokenizer has "
                f"{self.num_classes}: teacher, student and data must share a vocabulary"
            )
        self.vocabularies[role] = vocabulary
        other = self.vocabularies.get("student" if role == "teacher" else "teacher")
        if other is not None and other != vocabulary:
            raise ValueError(
                f"the student predicts {self.vocabularies['student']} tokens and the teacher "
                f"{self.vocabularies['teacher']}: teacher and student must share a vocabulary "
                "(the same tokenizer) to be distilled token by token"
            )

    def student_forward(self, model: nn.Module, inputs: Tensor, targets: Any) -> tuple[Any, dict]:
        return lm_logits(model, inputs), {}

    def predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        return lm_logits(model, inputs)

    def loss(self, out: StepOutputs, label_smoothing: float = 0.0) -> Tensor:
        if label_smoothing:
            raise ValueError("label_smoothing is not offered for task=language_modeling")
        return token_cross_entropy(
            out.student_logits, out.targets, IGNORE_INDEX, chunk_size=self.chunk_size
        )

    def logit_rows(self, logits: Tensor) -> Tensor:
        return logits.reshape(-1, logits.shape[-1])

    def row_targets(self, targets: Tensor) -> Tensor:
        return targets.reshape(-1)

    def metrics(self) -> MetricCollection:
        def accuracy() -> MulticlassAccuracy:
            # Predicted ids, not logits: nothing of size V is kept between batches.
            return MulticlassAccuracy(
                self.num_classes or 2, average="micro", ignore_index=IGNORE_INDEX
            )

        parts = {
            "perplexity": TokenPerplexity(self.chunk_size),
            "acc": accuracy(),
            "teacher_perplexity": TokenPerplexity(self.chunk_size),
            "teacher_acc": accuracy(),
            "agreement": accuracy(),
        }
        return MetricCollection(parts, compute_groups=False)

    def update(
        self, metrics: MetricCollection, student: Tensor, teacher: Tensor | None, targets: Tensor
    ) -> list[str]:
        counted = targets != IGNORE_INDEX
        flat = targets.reshape(-1)
        student_ids = self._ids(student, flat)
        metrics["perplexity"].update(student, targets)
        metrics["acc"].update(student_ids, flat)
        if teacher is None:
            return ["perplexity", "acc"]
        teacher_ids = self._ids(teacher, flat)
        metrics["teacher_perplexity"].update(teacher, targets)
        metrics["teacher_acc"].update(teacher_ids, flat)
        agreed = torch.where(counted.reshape(-1), teacher_ids, IGNORE_INDEX)
        metrics["agreement"].update(student_ids, agreed)
        return ["perplexity", "acc", "teacher_perplexity", "teacher_acc", "agreement"]

    def _ids(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Top-1 ids, those past the data's vocabulary (a model's padded embedding table)
        replaced by a valid id other than the target: they count as wrong."""
        ids = logits.argmax(-1).reshape(-1)
        wrong = (targets.clamp(min=0) + 1) % max(self.num_classes, 1)
        return torch.where(ids < self.num_classes, ids, wrong)

    def eval_loss(self, student: Tensor, targets: Tensor) -> Tensor:
        return token_cross_entropy(student, targets, IGNORE_INDEX, chunk_size=self.chunk_size)

    def write_samples(
        self, run_dir: Path, student: nn.Module, teacher: nn.Module | None, datamodule: Any
    ) -> dict:
        """The greedy continuations of ``sample_prompt`` by the student and the teacher,
        written to ``<run_dir>/samples.json`` and returned."""
        device = next(student.parameters()).device
        prompt_ids = datamodule.encode(self.sample_prompt)[-max(self.block_size - 1, 1) :]
        new_tokens = max(1, min(self.sample_tokens, self.block_size - len(prompt_ids)))
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        samples = {"prompt": self.sample_prompt, "new_tokens": new_tokens, "decoding": "greedy"}
        for role, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            ids = generate(model, prompt, new_tokens)[0, len(prompt_ids) :].tolist()
            samples[role] = datamodule.decode(ids)
        Path(run_dir, SAMPLES_FILE).write_text(json.dumps(samples, indent=2) + "\n")
        return samples
