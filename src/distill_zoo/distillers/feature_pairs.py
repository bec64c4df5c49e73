"""Paired feature maps with a connector where the student's shape differs: what CWD and PKD
compare level by level (FPN levels of a detector, a segmenter's stages)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, StepOutputs
from distill_zoo.distillers.connectors import bridge
from distill_zoo.distillers.layers import LayerChoice, pair_stages, probe_maps


class FeaturePairs(nn.Module):
    """Student and teacher layers paired one to one (``pair_stages``: "all" stages by
    default, i.e. every FPN level a detector config names), each student map brought to the
    teacher's by a connector trained with the student: by default a 1x1 conv + BN where the
    ``[C, H, W]`` differ and the identity where they match
    (:func:`~distill_zoo.distillers.connectors.bridge`).

    Args:
        student: The student (read for shapes).
        teacher: The teacher (read for shapes).
        context: The run's context (stages, example batch).
        student_layers: Portable layer choice for the student.
        teacher_layers: Portable layer choice for the teacher.
        method: The method's name, for error messages.
        connector: Builds the connector of one pair from the ``(B, C, H, W)`` shapes of the
            student's and the teacher's map; a ``ValueError`` it raises is re-raised naming
            the two layers.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        context: DistillContext,
        student_layers: LayerChoice,
        teacher_layers: LayerChoice,
        method: str,
        connector: Callable[[tuple[int, ...], tuple[int, ...]], nn.Module] = bridge,
    ) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = pair_stages(
            student, teacher, context, student_layers, teacher_layers, "all", method
        )
        s_shapes = probe_maps(student, self.student_layers, context, method)
        t_shapes = probe_maps(teacher, self.teacher_layers, context, method)
        if not s_shapes:
            raise ValueError(f"{method} needs context.example_input to build its connectors")
        self.connectors = nn.ModuleList()
        for s, t in zip(self.student_layers, self.teacher_layers, strict=True):
            try:
                self.connectors.append(connector(s_shapes[s], t_shapes[t]))
            except ValueError as error:
                raise ValueError(
                    f"{method}: student layer '{s}' and teacher layer '{t}': {error}"
                ) from None

    def forward(self, out: StepOutputs) -> list[tuple[Tensor, Tensor]]:
        """``(connected student map, teacher map)`` of each pair, in order."""
        return [
            (connect(out.student_features[s]), out.teacher_features[t])
            for s, t, connect in zip(
                self.student_layers, self.teacher_layers, self.connectors, strict=True
            )
        ]
