"""Helpers shared by the distiller tests (``pythonpath`` in pyproject.toml makes them
importable as ``from helpers import ...``)."""

from __future__ import annotations

import lightning as L
import torch
from hydra.utils import get_class
from torch import nn

from distill_zoo.config import CONF_DIR, compose
from distill_zoo.distillers.base import StepOutputs
from distill_zoo.distillers.taps import FeatureTap


def distill_step(
    distiller: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    *,
    batch: int = 4,
    size: int = 32,
    epoch: int = 0,
) -> dict[str, torch.Tensor]:
    """One training step as DistillationModule runs it, on a random batch (labels
    ``0, 1, 2, ...``): teacher in eval mode without gradients, the requested layers tapped,
    the terms summed and backpropagated. Returns the terms."""
    s_layers, t_layers = distiller.layers()
    s_tap = FeatureTap(student, s_layers)
    t_tap = FeatureTap(teacher, t_layers) if teacher is not None else None
    try:
        images = torch.randn(batch, 3, size, size)
        teacher_logits = None
        if teacher is not None:
            teacher.eval()
            with torch.no_grad():
                teacher_logits = teacher(images)
        student.train()
        student.zero_grad()
        distiller.zero_grad()
        terms = distiller(
            StepOutputs(
                images=images,
                targets=torch.arange(batch) % 4,
                indices=torch.arange(batch),
                student_logits=student(images),
                teacher_logits=teacher_logits,
                student_features=s_tap.pop(),
                teacher_features=t_tap.pop() if t_tap else {},
                epoch=epoch,
            )
        )
        torch.stack(list(terms.values())).sum().backward()
        return terms
    finally:
        s_tap.remove()
        if t_tap:
            t_tap.remove()


def has_grad(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` received a non-zero gradient."""
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Lightning Trainer that writes nothing and prints nothing (no logger,
    checkpoints, progress bar, model summary or sanity validation); ``kwargs`` add or
    override arguments."""
    return L.Trainer(
        **{
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **kwargs,
        }
    )


def conv_net(width: int, classes: int = 4) -> nn.Module:
    """A tiny CNN: conv, BatchNorm, ReLU, pooling, linear head (3-channel inputs)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


DISTILLER_CONFIGS = sorted(p.stem for p in (CONF_DIR / "distiller").glob("*.yaml"))
"""Every ``conf/distiller/*.yaml`` by name."""


def declared_tasks(name: str) -> tuple[str, ...]:
    """The tasks a distiller config serves (a combo: those all its default parts serve)."""
    node = compose([f"distiller={name}"]).distiller
    served = get_class(node._target_).tasks
    for part in node.get("parts") or []:
        served = tuple(t for t in served if t in declared_tasks(part))
    return served


CLASSIFICATION_DISTILLERS = [n for n in DISTILLER_CONFIGS if "classification" in declared_tasks(n)]
"""The configs that serve classification (the dense-prediction methods serve other tasks and
are trained on those in ``test_task_training.py`` / ``test_dense_training.py``)."""
