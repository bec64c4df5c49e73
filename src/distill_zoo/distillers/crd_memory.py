"""CRD's memory banks and negative sampler (used by :class:`distill_zoo.distillers.crd.CRD`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SAMPLINGS = ("exact", "uniform")
_BIG = 2**62  # draw integers below this, then reduce: per-row ranges without float rounding


def init_memory_bank(num_rows: int, dim: int) -> Tensor:
    """A memory bank as CRD's reference initialises it: uniform in ``[-stdv, stdv]`` with
    ``stdv = 1 / sqrt(dim / 3)``, so rows have about unit norm (not normalised), in fp32."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_rows, dim, dtype=torch.float32).mul_(2 * stdv).sub_(stdv)


class NegativeSampler(nn.Module):
    """Draws, for each anchor, its own index (the positive) and ``num_negatives`` negatives.

    ``"exact"`` (CRD's CIFAR-100 setup, the reference's ``mode='exact'``): negatives are
    training samples of other classes than the anchor's. ``"uniform"``: any training sample
    but the anchor itself. As in the reference (``np.random.choice(..., replace=k > n)``), an
    anchor's negatives are distinct where it has at least ``num_negatives`` candidates and drawn
    with replacement otherwise; ``replacement=True`` always draws with replacement (cheaper:
    ``O(B * K)`` instead of ``O(B * N)`` per step). Draws use torch's RNG on the device of the
    tables, so seeded runs repeat and resumed runs continue where they stopped.

    The class tables are non-persistent buffers, derived from the labels in ``__init__``: they
    follow the module's device and stay out of checkpoints.

    Args:
        num_train_samples: ``N``, the size of the training set.
        num_negatives: ``K``, negatives per anchor.
        sampling: ``"exact"`` or ``"uniform"``.
        train_targets: ``[N]`` integer label of each training sample (needed by ``"exact"``).
        replacement: Always sample with replacement.

    Raises:
        ValueError: an unknown mode, missing or malformed labels, or no possible negative.
    """

    def __init__(
        self,
        num_train_samples: int,
        num_negatives: int,
        sampling: str = "exact",
        train_targets: Tensor | None = None,
        replacement: bool = False,
    ) -> None:
        super().__init__()
        if sampling not in SAMPLINGS:
            raise ValueError(f"CRD sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if num_negatives < 1:
            raise ValueError(f"CRD num_negatives must be >= 1, got {num_negatives}")
        self.num_train_samples = num_train_samples
        self.num_negatives = num_negatives
        self.sampling = sampling
        self.replacement = replacement
        if sampling == "uniform":
            if num_train_samples < 2:
                raise ValueError(
                    f"CRD uniform sampling needs at least 2 training samples (a negative other "
                    f"than the positive), got {num_train_samples}"
                )
            available = torch.tensor([num_train_samples - 1])
            self.register_buffer("class_of", torch.zeros(0, dtype=torch.long), persistent=False)
        else:
            targets = _check_targets(train_targets, num_train_samples)
            classes, class_of = torch.unique(targets, return_inverse=True)
            if len(classes) < 2:
                raise ValueError(
                    "CRD exact sampling draws negatives from other classes, but the training "
                    f"set has a single class ({classes.tolist()}): use distiller.sampling=uniform"
                )
            counts = torch.bincount(class_of, minlength=len(classes))
            available = num_train_samples - counts
            self.register_buffer("class_of", class_of, persistent=False)
            self.register_buffer("order", torch.argsort(class_of, stable=True), persistent=False)
            self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
            self.register_buffer("class_count", counts, persistent=False)
        self.register_buffer("available", available, persistent=False)
        # Decided once from the labels, so no step needs a device-to-host read.
        self._all_short = replacement or num_negatives > int(available.max())
        self._some_short = self._all_short or num_negatives > int(available.min())

    def forward(self, indices: Tensor) -> Tensor:
        """``[B, 1 + K]`` training-set indices: column 0 is ``indices``, the rest negatives."""
        indices = indices.to(self.available.device, torch.long)
        if self._all_short:
            negatives = self._with_replacement(indices)
        else:
            negatives = self._without_replacement(indices)
            if self._some_short:  # anchors of classes with fewer than K others draw with it
                short = self._available(indices) < self.num_negatives
                negatives = torch.where(
                    short.unsqueeze(1), self._with_replacement(indices), negatives
                )
        return torch.cat([indices.unsqueeze(1), negatives], dim=1)

    def _available(self, indices: Tensor) -> Tensor:
        if self.sampling == "uniform":
            return self.available.expand(len(indices))
        return self.available[self.class_of[indices]]

    def _excluded(self, indices: Tensor) -> Tensor:
        """``[B, N]``: True where a training sample may not be a negative of the anchor."""
        if self.sampling == "uniform":
            columns = torch.arange(self.num_train_samples, device=indices.device)
            return columns.unsqueeze(0) == indices.unsqueeze(1)
        return self.class_of.unsqueeze(0) == self.class_of[indices].unsqueeze(1)

    def _without_replacement(self, indices: Tensor) -> Tensor:
        # The K smallest of uniform keys over the allowed samples: a uniform K-subset.
        keys = torch.rand(  # fp32 even under bf16-true: bf16 ties would bias the choice
            len(indices), self.num_train_samples, device=indices.device, dtype=torch.float32
        )
        keys = keys.masked_fill(self._excluded(indices), 2.0)
        return keys.topk(self.num_negatives, dim=1, largest=False).indices

    def _with_replacement(self, indices: Tensor) -> Tensor:
        # A uniform rank among the anchor's allowed samples, then skip the excluded block.
        draws = torch.randint(_BIG, (len(indices), self.num_negatives), device=indices.device)
        rank = draws % self._available(indices).unsqueeze(1)
        if self.sampling == "uniform":
            return rank + (rank >= indices.unsqueeze(1)).long()
        own = self.class_of[indices].unsqueeze(1)
        start, count = self.class_start[own], self.class_count[own]
        return self.order[rank + (rank >= start).long() * count]

    def extra_repr(self) -> str:
        return (
            f"num_train_samples={self.num_train_samples}, num_negatives={self.num_negatives}, "
            f"sampling={self.sampling!r}, replacement={self.replacement}"
        )


def _check_targets(train_targets: Tensor | None, num_train_samples: int) -> Tensor:
    if train_targets is None:
        raise ValueError(
            "CRD exact sampling draws negatives from other classes and needs "
            "context.train_targets (the label of each training sample by index; train.run "
            "takes it from the DataModule's train_targets): provide it, or use "
            "distiller.sampling=uniform"
        )
    if not isinstance(train_targets, Tensor):
        raise ValueError(
            f"context.train_targets must be a LongTensor, got {type(train_targets).__name__}"
        )
    if train_targets.is_floating_point() or train_targets.is_complex():
        raise ValueError(
            f"context.train_targets must hold integer labels, got dtype {train_targets.dtype}"
        )
    if tuple(train_targets.shape) != (num_train_samples,):
        raise ValueError(
            f"context.train_targets must have one label per training sample, shape "
            f"({num_train_samples},), got {tuple(train_targets.shape)}"
        )
    return train_targets.detach().cpu().long()
