"""A cache of the teacher's k most probable tokens per position of every training sequence,
so that later epochs skip the teacher (what large-vocabulary LM distillation does to afford a
big teacher: store sparse teacher distributions once, train many epochs on them).

The entry of a sequence is what :func:`~distill_zoo.losses.language.teacher_topk` keeps: the
log-probabilities of the k most probable tokens at the distiller's temperature and their ids;
the losses treat the rest of the vocabulary as one bucket holding the remaining mass
(:func:`~distill_zoo.losses.language.token_divergence`). Text is not augmented, so a
sequence's entry is valid for every epoch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_zoo.engine.collectives import all_gather_rows
from distill_zoo.losses.language import TopKLogProbs


class TopKCache(nn.Module):
    """Top-k teacher log-probabilities of ``num_samples`` sequences of ``length`` positions.

    Storage: ``num_samples * length * k`` float32 log-probabilities and int32 ids (the
    embedded corpus, k=8: 3,300 blocks x 128 positions, 27 MB). Not saved in checkpoints (a
    resumed run refills it in its first epoch). Under DDP every process keeps what any
    process computed (:meth:`store_all`), so a sequence met on another rank next epoch hits.

    Args:
        num_samples: Sequences of the training split (indices are positions in it).
        length: Positions per sequence.
        k: Tokens kept per position.
        temperature: The temperature of the cached log-probabilities.
    """

    def __init__(self, num_samples: int, length: int, k: int, temperature: float) -> None:
        super().__init__()
        if num_samples < 1 or length < 1 or k < 1:
            raise ValueError(
                f"the top-k cache needs positive sizes, got num_samples={num_samples}, "
                f"length={length}, k={k}"
            )
        self.k = k
        self.temperature = temperature
        self.register_buffer("logprobs", torch.zeros(num_samples, length, k), persistent=False)
        self.register_buffer(
            "token_ids", torch.zeros(num_samples, length, k, dtype=torch.int32), persistent=False
        )
        self.register_buffer(
            "filled", torch.zeros(num_samples, dtype=torch.bool), persistent=False
        )
        self.lookups = 0
        self.hits = 0

    def replicated_buffers(self) -> list[str]:
        """All buffers: every process stores what all processes computed, so DDP need not
        resend them from rank 0 before every step."""
        return ["logprobs", "token_ids", "filled"]

    def lookup(self, indices: Tensor) -> TopKLogProbs | None:
        """The entries of the sequences ``indices`` when all are cached, else ``None``."""
        self.lookups += len(indices)
        if not bool(self.filled[indices].all()):
            return None
        self.hits += len(indices)
        return TopKLogProbs(
            self.logprobs[indices], self.token_ids[indices].long(), self.temperature
        )

    def store_all(self, indices: Tensor, entry: TopKLogProbs | None = None) -> None:
        """Stores ``entry`` for ``indices``, and what every other process stores this step.
        Every process calls it at every step (a collective), with nothing (``indices`` empty,
        ``entry`` ``None``) where it has nothing new."""
        if entry is None:
            empty = self.logprobs.new_zeros(0, *self.logprobs.shape[1:])
            entry = TopKLogProbs(empty, empty.long(), self.temperature)
        indices, logprobs, token_ids = all_gather_rows(
            indices, entry.logprobs.float(), entry.indices.int()
        )
        self.logprobs[indices] = logprobs
        self.token_ids[indices] = token_ids
        self.filled[indices] = True

    def hit_rate(self) -> Tensor:
        """Share of the sequences looked up since the last call that were cached."""
        rate = torch.tensor(self.hits / max(self.lookups, 1))
        self.lookups = self.hits = 0
        return rate
