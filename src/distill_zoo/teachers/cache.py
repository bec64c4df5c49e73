"""A cache of the frozen teacher's logits per (sample, augmentation), so that later epochs skip
the teacher's forward pass (the idea of FKD: Shen & Xing, "A Fast Knowledge Distillation
Framework for Visual Recognition", ECCV 2022, https://arxiv.org/abs/2112.01528).

The cache is exact, not an approximation: an entry is used only for the same sample index
*and* the same augmentation parameters (crop offsets and flip, encoded as one integer
``aug_key`` by the on-device data path). With ``data.augment_rounds=K`` every sample is seen
under K fixed augmentations, one per round, and from epoch K on every lookup hits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

EMPTY = -1
"""Key of a slot that holds nothing yet (real augmentation keys are >= 0)."""


class TeacherOutputCache(nn.Module):
    """Teacher logits for ``num_samples`` samples x ``rounds`` augmentations each.

    Storage is ``num_samples * rounds * num_classes`` floats (CIFAR-100, 4 rounds: 80 MB in
    fp32). The buffers are not saved in checkpoints (they can always be recomputed, and would
    make every checkpoint that much larger); a resumed run refills them.

    Args:
        num_samples: Size of the training split (indices are positions in it).
        rounds: Augmentations kept per sample (``data.augment_rounds``).
        num_classes: Width of the teacher's logits.
        dtype: Storage type; fp32 keeps cached logits identical to recomputed ones.
    """

    def __init__(
        self, num_samples: int, rounds: int, num_classes: int, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if num_samples < 1 or rounds < 1 or num_classes < 1:
            raise ValueError(
                f"the teacher cache needs positive sizes, got num_samples={num_samples}, "
                f"rounds={rounds}, num_classes={num_classes}"
            )
        self.rounds = rounds
        self.register_buffer(
            "keys", torch.full((num_samples, rounds), EMPTY, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "logits", torch.zeros(num_samples, rounds, num_classes, dtype=dtype), persistent=False
        )
        self.hits = 0
        self.lookups = 0

    def lookup(self, indices: Tensor, aug_keys: Tensor) -> tuple[Tensor, Tensor]:
        """Which samples of the batch are cached (``[B]`` bool), and their logits (rows of
        samples that are not cached hold garbage)."""
        match = self.keys[indices] == aug_keys.unsqueeze(1)  # [B, rounds]
        found = match.any(1)
        self.lookups += len(indices)
        self.hits += int(found.sum())
        slot = match.long().argmax(1)
        return found, self.logits[indices, slot].float()

    def store(self, indices: Tensor, aug_keys: Tensor, logits: Tensor, round_: int) -> None:
        """Keeps ``logits`` of the batch in slot ``round_ % rounds`` of each sample."""
        if (aug_keys < 0).any():
            raise ValueError("augmentation keys must be >= 0 (-1 marks an empty slot)")
        slot = round_ % self.rounds
        self.keys[indices, slot] = aug_keys
        self.logits[indices, slot] = logits.detach().to(self.logits.dtype)

    def hit_rate(self, reset: bool = True) -> float:
        """Share of looked-up samples served from the cache since the last reset."""
        rate = self.hits / self.lookups if self.lookups else 0.0
        if reset:
            self.hits = self.lookups = 0
        return rate
