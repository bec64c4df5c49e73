"""DarkRank: transfer of the teacher's ranking of the batch around each sample."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.layers import PENULTIMATE, layer_pairs, probe_pairs
from distill_zoo.losses import DARKRANK_TRANSFERS, MAX_SOFT_LIST, darkrank_loss


class DarkRank(Distiller):
    """Chen, Wang & Zhang, "DarkRank: Accelerating Deep Metric Learning via Cross Sample
    Similarities Transfer" (AAAI 2018), https://arxiv.org/abs/1707.01220. The student learns
    how the teacher ranks the other samples of the batch by similarity to each sample.

    For each query ``q`` of the batch the others are scored ``S = -alpha ||x_q - x_i||^beta``
    in each network's embedding space, and a ranking has the Plackett-Luce probability
    ``P(pi | S) = prod_j exp(S_pi(j)) / sum_{k >= j} exp(S_pi(k))``. ``transfer="hard"``
    (default) maximises the likelihood of the teacher's ranking under the student's scores
    (ListMLE); ``transfer="soft"`` matches the two distributions over rankings by
    ``KL(P_teacher || P_student)``, enumerating all ``L!`` permutations of each list, which
    is only feasible for short lists (``L <= 8``; with a batch of 64 the paper's full list of
    63 would need 63! terms). See :func:`~distill_zoo.losses.darkrank_loss`.

    ``loss = ce_weight * CE + kd_weight * KD + weight * sum over layer pairs of DarkRank``
    on the penultimate features (globally average-pooled if spatial; widths may differ, no
    trainable parts).

    Defaults: ``alpha=3``, ``beta=3`` and lists of each query's ``list_length=4`` nearest
    neighbours under the teacher, in the teacher's order, with the embeddings L2-normalised
    -- the ``HardDarkRank`` of the RKD authors' public code (Park et al., CVPR 2019), a widely
    used PyTorch reference (its training script's default is ``alpha=2``).
    The paper's formula ranks all ``b - 1`` other samples: ``list_length=None``. DarkRank is
    not part of the CRD/mdistiller CIFAR benchmarks, so ``weight=1`` and ``ce_weight=1``
    (no KD) are our choice, not a published setting.

    Args:
        weight: Weight of the DarkRank term.
        alpha: Score scale.
        beta: Score contrast exponent.
        transfer: ``"hard"`` (ListMLE) or ``"soft"`` (KL over permutations).
        list_length: Items ranked per query (capped at ``b - 1``); ``None``: all others
            (hard transfer only).
        normalize: L2-normalise the embeddings before scoring.
        student_layers: Student layer(s); ``None``/``"penultimate"``: the classifier's input.
            Stage choices (``"last"``, an index) and names are globally average-pooled.
        teacher_layers: The same for the teacher.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of Hinton's KD term added on top (0: none).
        kd_temperature: Temperature of that KD term.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 1.0,
        alpha: float = 3.0,
        beta: float = 3.0,
        transfer: str = "hard",
        list_length: int | None = 4,
        normalize: bool = True,
        student_layers: str | int | list | None = None,
        teacher_layers: str | int | list | None = None,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            kd_temperature=kd_temperature,
        )
        if transfer not in DARKRANK_TRANSFERS:
            raise ValueError(f"transfer must be one of {DARKRANK_TRANSFERS}, got {transfer!r}")
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"DarkRank needs alpha > 0 and beta > 0, got {alpha} and {beta}")
        if list_length is not None and list_length < 2:
            raise ValueError(f"list_length must be >= 2 (or null for all), got {list_length}")
        if transfer == "soft" and (list_length is None or list_length > MAX_SOFT_LIST):
            raise ValueError(
                f"the soft transfer enumerates all list_length! permutations: set "
                f"list_length <= {MAX_SOFT_LIST} (got {list_length}) or use transfer=hard"
            )
        self.weight = weight
        self.alpha = alpha
        self.beta = beta
        self.transfer = transfer
        self.list_length = list_length
        self.normalize = normalize
        self.student_layers, self.teacher_layers = layer_pairs(
            student, teacher, self.context, student_layers, teacher_layers, PENULTIMATE, "DarkRank"
        )
        probe_pairs(student, teacher, self.context, self.student_layers, self.teacher_layers)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        loss = sum(
            darkrank_loss(
                s,
                t,
                alpha=self.alpha,
                beta=self.beta,
                transfer=self.transfer,
                list_length=self.list_length,
                normalize=self.normalize,
            )
            for s, t in self.paired_features(out, pooled=True)
        )
        return {**self.logit_terms(out), "darkrank": self.weight * loss}
