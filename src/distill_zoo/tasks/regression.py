"""Regression: D real values per sample (a pose, a property of a tabular record)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from distill_zoo.tasks.base import Monitor, StepOutputs, Task, dry_forward

LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}


class RegressionTask(Task):
    """Batches ``(inputs, targets [B,D], indices [B])``, targets standardised by the data
    module with the training split's mean and std. Loss (``loss``): ``mse``, ``l1`` or
    ``smooth_l1`` on the standardised values.

    Metrics, in the data's original units (the standardisation undone): ``mae`` and ``rmse``
    over all D values, ``mae_<target>`` for each target, the teacher's ``teacher_mae`` /
    ``teacher_rmse``, and ``agreement``: the mean absolute difference between student and
    teacher predictions (lower is closer). ``kd`` on this task is output matching: the MSE
    between student and teacher predictions.

    Args:
        loss: The supervised loss on standardised targets.
    """

    name = "regression"
    monitor = Monitor("mae", "min")
    summary_metrics = ("mae", "rmse")
    teacher_metrics = ("mae", "rmse")

    def __init__(self, num_classes: int = 0, loss: str = "mse") -> None:
        super().__init__(num_classes)
        if loss not in LOSSES:
            raise ValueError(f"task.loss={loss!r} is not one of {sorted(LOSSES)}")
        self.loss_name = loss
        self.task_term = loss
        self.target_names: list[str] = [f"y{i}" for i in range(num_classes)]
        self.target_mean = torch.zeros(num_classes)
        self.target_std = torch.ones(num_classes)

    def setup(self, datamodule: Any) -> None:
        super().setup(datamodule)
        dim = self.num_classes
        self.target_names = list(getattr(datamodule, "target_names", None) or self.target_names)
        mean = getattr(datamodule, "target_mean", None)
        std = getattr(datamodule, "target_std", None)
        self.target_mean = torch.zeros(dim) if mean is None else torch.as_tensor(mean).float()
        self.target_std = torch.ones(dim) if std is None else torch.as_tensor(std).float()

    def check_model(self, model: nn.Module, example: Tensor, role: str) -> None:
        output = dry_forward(model, example)
        wanted = (len(example), self.num_classes)
        if not isinstance(output, Tensor) or tuple(output.shape) != wanted:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"the {role} predicts {shape}, but task=regression needs {wanted} (batch, "
                f"{self.num_classes} targets): choose a regression {role} (conf/{role}/reg_* "
                "or mlp_*)"
            )

    def loss(self, out: StepOutputs, label_smoothing: float = 0.0) -> Tensor:
        if label_smoothing:
            raise ValueError("label_smoothing has no meaning for task=regression")
        return LOSSES[self.loss_name](out.student_logits.float(), out.targets.float())

    def original_units(self, values: Tensor) -> Tensor:
        mean, std = self.target_mean.to(values.device), self.target_std.to(values.device)
        return values.float() * std + mean

    def metrics(self) -> MetricCollection:
        parts = {
            "mae": MeanAbsoluteError(),
            "rmse": MeanSquaredError(squared=False),
            "teacher_mae": MeanAbsoluteError(),
            "teacher_rmse": MeanSquaredError(squared=False),
            "agreement": MeanAbsoluteError(),
        }
        if self.num_classes > 1:
            parts.update({f"mae_{name}": MeanAbsoluteError() for name in self.target_names})
        return MetricCollection(parts, compute_groups=False)

    def update(
        self, metrics: MetricCollection, student: Tensor, teacher: Tensor | None, targets: Tensor
    ) -> list[str]:
        predicted, truth = self.original_units(student), self.original_units(targets)
        metrics["mae"].update(predicted, truth)
        metrics["rmse"].update(predicted, truth)
        names = ["mae", "rmse"]
        if self.num_classes > 1:
            for i, name in enumerate(self.target_names):
                metrics[f"mae_{name}"].update(predicted[:, i], truth[:, i])
                names.append(f"mae_{name}")
        if teacher is None:
            return names
        teacher_predicted = self.original_units(teacher)
        metrics["teacher_mae"].update(teacher_predicted, truth)
        metrics["teacher_rmse"].update(teacher_predicted, truth)
        metrics["agreement"].update(predicted, teacher_predicted)
        return [*names, "teacher_mae", "teacher_rmse", "agreement"]

    def eval_loss(self, student: Tensor, targets: Tensor) -> Tensor:
        return LOSSES[self.loss_name](student.float(), targets.float())
