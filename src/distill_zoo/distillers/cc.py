"""Correlation congruence knowledge distillation (CC)."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import ALL_TASKS, DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.connectors import shape_mismatch
from distill_zoo.distillers.layers import PENULTIMATE, embedding, layer_pairs, probe_pairs
from distill_zoo.losses import CC_MODES, cc_loss


class CC(Distiller):
    """Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019),
    https://arxiv.org/abs/1904.01802. Besides instances, transfer the correlation between
    instances: match the student's batch correlation matrix to the teacher's.

    ``loss = ce_weight * CE + kd_weight * KD + weight * sum over layer pairs of
    cc_loss(e_s, e_t)``, where ``e = Linear(penultimate features)`` are trainable embeddings
    of width ``embed_dim`` on both sides (RepDistiller's ``LinearEmbed``; both train with the
    student). ``mode`` picks the correlation (see ``cc_loss``):

    - ``"repdistiller"`` (default): the form the CRD benchmark ran, the code the CC authors
      sent to Tian et al.: with ``d_i = |e_s,i - e_t,i|``, the mean over consecutive samples of
      ``d_i . d_{i+1}``. It is not the paper's correlation matrix.
    - ``"gaussian"``: the paper's, ``||C_s - C_t||_F^2 / b^2`` with ``C`` the order-``order``
      Taylor series of the Gaussian RBF ``exp(-gamma ||f_i - f_j||^2)`` of L2-normalised
      features (the paper's ``gamma=0.4``, ``P=2``). The paper correlates the features
      themselves: set ``embed_dim=null`` for that (the ``b x b`` matrices match anyway).
    - ``"bilinear"``: the paper's bilinear-pooling kernel, ``C_ij = f_i . f_j`` of
      L2-normalised features.

    Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR 2020; RepDistiller):
    ``mode="repdistiller"``, ``embed_dim=128``, ``weight=0.02`` (tuned for that form; the
    paper's modes have other scales), ``ce_weight=1``, ``kd_weight=0``.

    Args:
        weight: Weight of the CC term.
        mode: ``"repdistiller"``, ``"gaussian"`` or ``"bilinear"``.
        embed_dim: Width of the linear embeddings, or ``None`` to use the features directly
            (``"repdistiller"`` then needs equal student and teacher widths).
        gamma: RBF ``gamma`` of ``"gaussian"``.
        order: Taylor order ``P`` of ``"gaussian"``.
        student_layers: Student layer(s); ``None``/``"penultimate"``: the classifier's input
            (found by a dry forward pass; ``avgpool`` in the zoo). Stage choices (``"last"``,
            an index) and names are globally average-pooled if spatial.
        teacher_layers: The same for the teacher.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of Hinton's KD term added on top (0: none).
        kd_temperature: Temperature of that KD term.
    """

    tasks = ALL_TASKS

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 0.02,
        mode: str = "repdistiller",
        embed_dim: int | None = 128,
        gamma: float = 0.4,
        order: int = 2,
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
        if mode not in CC_MODES:
            raise ValueError(f"unknown CC mode {mode!r}; choose one of {CC_MODES}")
        if order < 0:
            raise ValueError(f"the Taylor order must be >= 0, got {order}")
        self.weight = weight
        self.mode = mode
        self.gamma = gamma
        self.order = order
        self.student_layers, self.teacher_layers = layer_pairs(
            student, teacher, self.context, student_layers, teacher_layers, PENULTIMATE, "CC"
        )
        s_shapes, t_shapes = probe_pairs(
            student, teacher, self.context, self.student_layers, self.teacher_layers
        )
        self.student_embeds = nn.ModuleList()
        self.teacher_embeds = nn.ModuleList()
        for s, t in zip(self.student_layers, self.teacher_layers, strict=True):
            s_dim, t_dim = _width(s_shapes[s]), _width(t_shapes[t])
            if embed_dim is None:
                if mode == "repdistiller" and s_dim != t_dim:
                    raise ValueError(
                        "CC mode 'repdistiller' without embeddings (embed_dim=null) needs equal "
                        f"widths, but {shape_mismatch(s, s_shapes[s], t, t_shapes[t])}: set "
                        "embed_dim (e.g. 128)"
                    )
                self.student_embeds.append(nn.Identity())
                self.teacher_embeds.append(nn.Identity())
            else:
                self.student_embeds.append(nn.Linear(s_dim, embed_dim))
                self.teacher_embeds.append(nn.Linear(t_dim, embed_dim))

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        loss = sum(
            cc_loss(
                embed_s(embedding(out.student_features[s])),
                embed_t(embedding(out.teacher_features[t])),
                mode=self.mode,
                gamma=self.gamma,
                order=self.order,
            )
            for s, t, embed_s, embed_t in zip(
                self.student_layers,
                self.teacher_layers,
                self.student_embeds,
                self.teacher_embeds,
                strict=True,
            )
        )
        return {**self.logit_terms(out), "cc": self.weight * loss}


def _width(shape: tuple[int, ...]) -> int:
    """Width of :func:`embedding` of a feature of ``shape`` (channels if spatial)."""
    if len(shape) == 4:
        return shape[1]
    width = 1
    for size in shape[1:]:
        width *= size
    return width
