"""What a distiller may know about the run when it is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class DistillContext:
    """What a distiller may need to know about the run when it is built.

    Attributes:
        student_stages: The student's stage layers in forward order (zoo ``feature_layers``).
        teacher_stages: The teacher's stage layers, empty when there is no teacher.
        example_input: One small batch of real inputs, for dry forward passes that find
            feature shapes (so trainable parts are built in ``__init__``).
        num_classes: Classes of the data set.
        num_train_samples: Size of the training split (memory banks are indexed by it).
        train_targets: Label of each training sample by its index (``[num_train_samples]``),
            for methods that sample by class (CRD's negatives).
        task: The run's task (``classification``, ``segmentation``, ``detection``,
            ``regression``).
    """

    student_stages: list[str] = field(default_factory=list)
    teacher_stages: list[str] = field(default_factory=list)
    example_input: Tensor | None = None
    num_classes: int = 0
    num_train_samples: int = 0
    train_targets: Tensor | None = None
    task: str = "classification"
