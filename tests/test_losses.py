"""Golden values of the pure loss functions, worked out by hand from the papers' formulas."""

import math

import pytest
import torch

from distill_zoo.losses import cross_entropy, kd_loss, top1_agreement


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_kd_loss_hand_computed_t1():
    # Teacher logits [ln 3, 0] soften to p_t = [3/4, 1/4]; student logits [0, 0] to [1/2, 1/2].
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812...
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert expected == pytest.approx(0.1308121, abs=1e-6)
    assert kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_hand_computed_t2_scales_by_t_squared():
    # At T=2 the teacher's [ln 3, 0] becomes [ln sqrt(3), 0]: p_t = [sqrt3, 1] / (sqrt3 + 1).
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    r3 = math.sqrt(3.0)
    p_t = [r3 / (r3 + 1), 1 / (r3 + 1)]
    expected = 4.0 * kl(p_t, [0.5, 0.5])
    assert expected == pytest.approx(0.145363, abs=1e-6)
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_batch_mean_of_rows():
    # Row 1: as above (T=1). Row 2: three classes, teacher [0, 0, ln 2] -> [1/4, 1/4, 1/2],
    # student [ln 2, 0, 0] -> [1/2, 1/4, 1/4]; padded to equal width with a -inf-like logit.
    student = torch.tensor([[0.0, 0.0, -1e4], [math.log(2.0), 0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0, -1e4], [0.0, 0.0, math.log(2.0)]])
    row1 = kl([0.75, 0.25], [0.5, 0.5])
    row2 = kl([0.25, 0.25, 0.5], [0.5, 0.25, 0.25])  # = 1/4 ln(1/2) + 1/2 ln 2 = 1/4 ln 2
    assert row2 == pytest.approx(0.25 * math.log(2.0))
    got = kd_loss(student, teacher, temperature=1.0).item()
    assert got == pytest.approx((row1 + row2) / 2, rel=1e-5)


def test_kd_loss_zero_when_equal_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(torch.randn(8, 10), logits, 4.0).item() > 0


def test_kd_loss_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 100) * 5, torch.randn(16, 100) * 5
    reference = kd_loss(student, teacher, 4.0)
    for temperature in (1.0, 4.0, 20.0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = kd_loss(student.bfloat16(), teacher.bfloat16(), temperature)
        assert low.dtype == torch.float32
        assert torch.isfinite(low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = kd_loss(student.bfloat16(), teacher.bfloat16(), 4.0)
    assert low.item() == pytest.approx(reference.item(), rel=0.05)


def test_kd_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 3), torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match="number of classes"):
        kd_loss(torch.zeros(1, 3), torch.zeros(1, 4), 1.0)


def test_cross_entropy_and_agreement_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0]])
    assert cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(-math.log(0.75))
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert top1_agreement(student, teacher).item() == pytest.approx(0.5)
