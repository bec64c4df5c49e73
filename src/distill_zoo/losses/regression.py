"""Losses of regression distillation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill_zoo.losses.common import fp32


@fp32
def mse_to_teacher(student: Tensor, teacher: Tensor) -> Tensor:
    """Output matching: the mean squared difference between the student's and the teacher's
    predictions over every sample and output, ``mean((s - t)^2)``, as in the regression
    baselines of Chen et al. (NeurIPS 2017, Sec. 3.2) and Saputra et al. (ICCV 2019)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student predictions {tuple(student.shape)} and teacher predictions "
            f"{tuple(teacher.shape)} differ: do they predict the same targets?"
        )
    return F.mse_loss(student, teacher)
