"""distiller=combo: the parts' terms are summed, CE counted once, overrides reach the parts."""

import pytest
import torch

from distill_zoo.config import compose
from distill_zoo.distillers import DistillContext, StepOutputs
from distill_zoo.distillers.combo import Combo
from distill_zoo.losses import cross_entropy, kd_loss
from distill_zoo.models import create_model


def outputs(student_logits, teacher_logits, targets):
    return StepOutputs(
        images=torch.zeros(len(targets), 3, 16, 16),
        targets=targets,
        indices=torch.arange(len(targets)),
        student_logits=student_logits,
        teacher_logits=teacher_logits,
    )


def test_combo_of_kd_counts_ce_once_and_keeps_kd_weights():
    student, teacher = create_model("resnet8", 10), create_model("resnet14", 10)
    combo = Combo(
        student,
        teacher,
        context=DistillContext(),
        parts=["kd"],
        part_overrides={"kd": {"temperature": 2.0, "kd_weight": 0.5}},
        ce_weight=0.3,
    )
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    terms = combo(outputs(s, t, y))
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(0.3 * cross_entropy(s, y).item())
    assert terms["kd"].item() == pytest.approx(0.5 * kd_loss(s, t, 2.0).item())


def test_combo_config_composes_with_parts_and_overrides():
    cfg = compose(
        ["distiller=combo", "distiller.parts=[kd]", "+distiller.part_overrides.kd.temperature=8"]
    )
    assert list(cfg.distiller.parts) == ["kd"]
    assert cfg.distiller.part_overrides.kd.temperature == 8


def test_unknown_part_and_stray_override_fail_clearly():
    student, teacher = create_model("resnet8", 10), create_model("resnet14", 10)
    with pytest.raises(ValueError, match="unknown distiller part 'nope'.*kd"):
        Combo(student, teacher, parts=["nope"])
    with pytest.raises(ValueError, match="not among parts"):
        Combo(student, teacher, parts=["kd"], part_overrides={"at": {"weight": 1}})
