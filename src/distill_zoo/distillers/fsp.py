"""Flow of solution procedure (FSP) matrices."""

from __future__ import annotations

from torch import Tensor, nn

from distill_zoo.distillers.base import ALL_TASKS, DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.connectors import ConvConnector, shape_mismatch
from distill_zoo.distillers.layers import LayerChoice, pair_stages, probe_maps
from distill_zoo.losses import fsp_loss
from distill_zoo.losses.common import check_formulation


class FSP(Distiller):
    """Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
    and Transfer Learning" (CVPR 2017),
    https://openaccess.thecvf.com/content_cvpr_2017/html/Yim_A_Gift_From_CVPR_2017_paper.html.
    The student copies how the teacher's features flow from one stage to the next: the Gram
    (FSP) matrices between consecutive stages.

    ``loss = ce_weight * CE + kd_weight * KD + weight * fsp_loss`` (see
    :func:`~distill_zoo.losses.fsp_loss`) over the pairs of consecutive
    selected stages ``(s_0, s_1), (s_1, s_2), ...``, each matrix
    ``G = 1/(h*w) * sum_{s,t} F1[:, i, s, t] F2[:, j, s, t]`` (the larger map of a pair
    average-pooled to the smaller's size).

    ``formulation="repdistiller"`` (default) averages ``(G_s - G_t)^2`` over batch and entries,
    as RepDistiller does; ``formulation="paper"`` is Eq. 2's squared Frobenius norm per sample,
    averaged over the batch.

    In the paper (and in RepDistiller) FSP is an initialisation stage: the student is first
    trained on the FSP loss alone, then normally. ``fsp_only=True`` returns only the ``fsp``
    term, for that first stage (a pipeline runs the two). The default is the one-stage form
    ``CE + weight * FSP`` with ``ce_weight=1``, no KD, and ``weight=1``: RepDistiller's init
    stage sums the per-pair losses unweighted, and the ``-b 50`` of its FSP benchmark script
    multiplies a term that is 0 after that stage, so 50 was never applied to FSP. Used in one
    stage, ``weight=50`` lets the quartic FSP term swamp the cross-entropy (it diverged to NaN
    in a 10-epoch ResNet-14 -> ResNet-8 run); sweep ``weight`` for your pair. RepDistiller
    pairs the stem and its stages; here the pairs are consecutive stages (all stages by
    default; with different stage counts the last ``k`` of each).

    Student and teacher FSP matrices must have the same size, so each paired stage needs the
    teacher's channel count: a mismatch fails at construction, naming the layers and shapes,
    unless ``connector=True`` puts a trainable 1x1 conv + BN (:class:`ConvConnector`) on each
    mismatched student feature, mapping it to the teacher's channels.

    Args:
        weight: Weight ``b`` of the FSP term.
        formulation: ``"repdistiller"`` or ``"paper"``.
        connector: Bridge channel mismatches with 1x1 conv connectors on the student.
        fsp_only: Return only the weighted FSP term (the paper's first stage).
        student_layers: Student layers (at least two): ``"all"``, stage indices, layer names;
            ``None`` for all stages.
        teacher_layers: Teacher layers, in the same forms.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of an added Hinton KD term (0: none).
        kd_temperature: Temperature of that KD term.
    """

    tasks = ALL_TASKS

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 1.0,
        formulation: str = "repdistiller",
        connector: bool = False,
        fsp_only: bool = False,
        student_layers: LayerChoice = None,
        teacher_layers: LayerChoice = None,
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
        check_formulation(formulation)
        self.weight = weight
        self.formulation = formulation
        self.fsp_only = fsp_only
        self.student_layers, self.teacher_layers = pair_stages(
            student, teacher, self.context, student_layers, teacher_layers, method="FSP"
        )
        if len(self.student_layers) < 2:
            raise ValueError(
                "FSP compares pairs of consecutive layers, so it needs at least two paired "
                f"layers; got student {self.student_layers} and teacher {self.teacher_layers}"
            )
        if self.context.example_input is None:
            raise ValueError(
                "FSP needs context.example_input to find the channel counts of its layers"
            )
        s_shapes = probe_maps(student, self.student_layers, self.context, "FSP")
        t_shapes = probe_maps(teacher, self.teacher_layers, self.context, "FSP")
        self.connectors = nn.ModuleList()
        for s_name, t_name in zip(self.student_layers, self.teacher_layers, strict=True):
            s_shape, t_shape = s_shapes[s_name], t_shapes[t_name]
            if s_shape[1] == t_shape[1]:
                self.connectors.append(nn.Identity())
            elif connector:
                self.connectors.append(ConvConnector(s_shape[1], t_shape[1], s_shape[2:]))
            else:
                raise ValueError(
                    "FSP needs the teacher's channel count at every paired layer: "
                    f"{shape_mismatch(s_name, s_shape, t_name, t_shape)}. Set "
                    "distiller.connector=true to add 1x1 conv connectors on the student, or "
                    "pick other layers"
                )

    def trains_only_part(self) -> bool:
        return self.fsp_only

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        student = [
            connect(out.student_features[name])
            for name, connect in zip(self.student_layers, self.connectors, strict=True)
        ]
        teacher = [out.teacher_features[name] for name in self.teacher_layers]
        term = {"fsp": self.weight * fsp_loss(student, teacher, formulation=self.formulation)}
        if self.fsp_only:
            return term
        return {**self.logit_terms(out), **term}
