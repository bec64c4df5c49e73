"""Distillers work with torchvision models too: a torchvision ResNet-18 teaching a zoo student."""

import pytest
import torch
from helpers import CLASSIFICATION_DISTILLERS

from distill_zoo.build import build_model
from distill_zoo.config import compose
from distill_zoo.distillers import DistillContext, StepOutputs
from distill_zoo.distillers.taps import FeatureTap

METHODS = CLASSIFICATION_DISTILLERS
SMALL = {
    "crd": ["distiller.num_negatives=4"],
    "crd_kd": ["distiller.num_negatives=4"],
    "fsp": ["distiller.connector=true"],  # resnet18's widths are not resnet8's
}


@pytest.mark.parametrize("method", METHODS)
def test_torchvision_teacher_and_zoo_student(method):
    from hydra.utils import instantiate

    extra = SMALL.get(method, [])
    cfg = compose([f"distiller={method}", "teacher=torchvision", "student=resnet8", *extra])
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, num_classes=10, in_channels=3).eval()
    student = build_model(cfg.student, num_classes=10, in_channels=3)
    context = DistillContext(
        student_stages=list(cfg.student.feature_layers),
        teacher_stages=list(cfg.teacher.feature_layers),
        example_input=torch.zeros(2, 3, 32, 32),
        num_classes=10,
        num_train_samples=8,
        train_targets=torch.arange(8) % 4,
    )
    distiller = instantiate(cfg.distiller, student=student, teacher=teacher, context=context)
    s_layers, t_layers = distiller.layers()
    s_tap, t_tap = FeatureTap(student, s_layers), FeatureTap(teacher, t_layers)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        teacher_logits = teacher(images)
    out = StepOutputs(
        images=images,
        targets=torch.tensor([0, 1, 2, 3]),
        indices=torch.tensor([0, 1, 2, 3]),
        student_logits=student(images),
        teacher_logits=teacher_logits,
        student_features=s_tap.pop(),
        teacher_features=t_tap.pop(),
    )
    loss = torch.stack(list(distiller(out).values())).sum()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
