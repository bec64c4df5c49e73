"""Attentive imitation: imitate the teacher where it is reliable, per training sample."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distill_zoo.data.device import IndexBatch, IndexBatchDataModule
from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.engine.collectives import all_gather_rows
from distill_zoo.losses import reliability_weighted_mse, teacher_reliability
from distill_zoo.losses.regression import check_alpha

log = logging.getLogger(__name__)


class TeacherReliability(nn.Module):
    """The frozen teacher's error ``e_i`` on every training sample and its reliability
    ``Phi_i`` (:func:`~distill_zoo.losses.teacher_reliability`), computed once before the
    first training step and kept in buffers, so a checkpoint carries them.

    ``e_i = ||t_i - y_i||^2``: the squared distance, summed over the D targets, between the
    teacher's prediction and the label of training sample ``i``, both in the task's
    standardised units (Saputra et al.'s teacher loss, Sec. 3.2). It is measured by one pass
    of the teacher (eval mode, as in training) over the training split *without
    augmentation*, each DDP process taking every ``world_size``-th sample and the errors
    gathered, so every process holds the same values.

    A run that resumes its own checkpoint keeps the restored values (``filled``); any other
    run computes them afresh, even when ``init_from`` copied them from an earlier stage whose
    teacher may have been another.

    Args:
        num_samples: Size of the training split (``context.num_train_samples``).
        method: The method's name, for error messages.
    """

    def __init__(self, num_samples: int, method: str) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(
                f"{method} keeps the teacher's error on every training sample, but "
                f"context.num_train_samples is {num_samples}: build the distiller with the "
                "run's DistillContext (build.py sets it from the data)"
            )
        self.method = method
        self.register_buffer("errors", torch.zeros(num_samples))
        self.register_buffer("phi", torch.zeros(num_samples))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        self._ready = False  # filled seen true once: no device read per step

    def replicated_buffers(self) -> list[str]:
        """All three buffers: identical on every DDP process by construction (gathered once),
        so DDP need not resend them from rank 0 before every step."""
        return ["errors", "phi", "filled"]

    def forward(self, indices: Tensor) -> Tensor:
        """``Phi`` of the training samples ``indices`` (dataset positions)."""
        if not self._ready:
            if not bool(self.filled):
                raise RuntimeError(
                    f"{self.method}: the teacher's per-sample errors are not computed yet. "
                    "DistillationModule computes them when training starts "
                    "(Distiller.before_training); outside a Trainer call set_errors(errors)"
                )
            self._ready = True
        return self.phi[indices]

    def set_errors(self, errors: Tensor) -> None:
        """Stores the teacher's errors ``[num_samples]`` and their reliabilities."""
        if errors.shape != self.errors.shape:
            raise ValueError(
                f"{self.method}: got teacher errors for {tuple(errors.shape)} samples, but the "
                f"training split has {len(self.errors)}"
            )
        self.errors.copy_(errors)
        self.phi.copy_(teacher_reliability(errors))
        self.filled.fill_(True)
        self._ready = True

    def prepare(self, trainer: Any, teacher: Callable[[Tensor], Tensor]) -> None:
        """Keeps the restored values when the run resumes a checkpoint that holds them;
        otherwise measures the teacher's errors (:meth:`fill`)."""
        if trainer.ckpt_path is not None and bool(self.filled):
            self._ready = True
            return
        self.fill(trainer, teacher)

    @torch.no_grad()
    def fill(self, trainer: Any, teacher: Callable[[Tensor], Tensor]) -> None:
        """Measures ``e`` by a pass of ``teacher`` over the un-augmented training split (this
        process's share), gathers every process's share and stores ``e`` and ``Phi``."""
        data = trainer.datamodule
        if not isinstance(data, IndexBatchDataModule):
            raise ValueError(
                f"{self.method} measures the teacher on the un-augmented training split, "
                "which it reads by index from an in-memory data module (digit_pose, "
                f"tabular_regression, ...); {type(data).__name__} serves none"
            )
        num_samples = len(self.errors)
        if data.num_train_samples != num_samples:
            raise ValueError(
                f"{self.method} was built for {num_samples} training samples, but the data "
                f"has {data.num_train_samples}"
            )
        device = trainer.strategy.root_device
        positions = torch.arange(trainer.global_rank, num_samples, trainer.world_size)
        local = [torch.zeros(0, device=device)]
        for rows in positions.split(data.batch_size):
            inputs, targets, _ = data.transfer_batch_to_device(
                IndexBatch("train", rows), device, 0
            )
            local.append(squared_errors(teacher(inputs), targets))
        indices, errors = all_gather_rows(positions.to(device), torch.cat(local))
        full = torch.full((num_samples,), torch.nan, device=device)
        full[indices] = errors
        self.set_errors(full.to(self.errors.device))
        log.info(
            "%s: teacher errors on %d training samples: mean %.4g, min %.4g, max %.4g; "
            "mean reliability %.3f, %d samples ignored (Phi = 0)",
            self.method,
            num_samples,
            float(self.errors.mean()),
            float(self.errors.min()),
            float(self.errors.max()),
            float(self.phi.mean()),
            int((self.phi == 0).sum()),
        )


def squared_errors(prediction: Tensor, targets: Tensor) -> Tensor:
    """``||p_i - y_i||^2`` per sample, summed over the targets, in float32: ``[B]``."""
    if prediction.shape != targets.shape:
        raise ValueError(
            f"the teacher predicts {tuple(prediction.shape)} for targets "
            f"{tuple(targets.shape)}: attentive imitation needs the task's regression values"
        )
    return (prediction.float() - targets.float()).square().flatten(1).sum(1)


class AttentiveImitation(Distiller):
    """Saputra, Gusmao, Almalioglu, Markham & Trigoni, "Distilling Knowledge From a Deep Pose
    Regressor Network" (ICCV 2019, Sec. 3.2), https://arxiv.org/abs/1908.00858. A regression
    teacher is not always right: the student imitates it on each sample in proportion to how
    reliable it is there, ``Phi_i = 1 - e_i / (max e - min e)`` from the teacher's error
    ``e_i`` on that training sample (:class:`TeacherReliability`, clamped at 0: see
    :func:`~distill_zoo.losses.teacher_reliability`):

    ``loss = alpha * L_task(s, y) + (1 - alpha) * mean_i Phi_i * mean_d (s_id - t_id)^2``

    which with ``task.loss=mse`` (the default) is the paper's attentive imitation loss
    (:func:`~distill_zoo.losses.attentive_imitation_loss`; squared norms divided by D).
    Another task loss (``l1``, ``smooth_l1``) replaces its supervised part. Logged terms: the
    task's (``mse``) and ``imitation``.

    Args:
        alpha: Weight of the supervised term, in ``[0, 1]``; ``1 - alpha`` weighs imitation.
        kd_weight: Weight of added plain output matching (MSE to the teacher; 0: none).
    """

    tasks = ("regression",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        alpha: float = 0.5,
        kd_weight: float = 0.0,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=alpha,
            kd_weight=kd_weight,
        )
        check_alpha(alpha)
        self.alpha = alpha
        self.reliability = TeacherReliability(
            self.context.num_train_samples, "attentive_imitation"
        )

    def before_training(self, trainer: Any, teacher: Callable[[Tensor], Tensor]) -> None:
        self.reliability.prepare(trainer, teacher)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        phi = self.reliability(out.indices)
        imitation = reliability_weighted_mse(out.student_logits, out.teacher_logits, phi)
        return {**self.logit_terms(out), "imitation": (1 - self.alpha) * imitation}
