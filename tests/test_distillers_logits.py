"""Logit methods: DKD, DIST, logit standardization, logit matching (KD's MSE options) and
teacher-free KD. Golden values are worked out by hand (arithmetic in the comments) or by
explicit loops over the papers' formulas in plain Python; then each distiller runs one step
on a zoo pair."""

import math

import pytest
import torch
from helpers import distill_step as step
from helpers import has_grad

from distill_zoo import train
from distill_zoo.distillers.base import StepOutputs
from distill_zoo.distillers.dist import DIST
from distill_zoo.distillers.dkd import DKD
from distill_zoo.distillers.kd import KD
from distill_zoo.distillers.tf_kd import TfKD
from distill_zoo.losses import (
    dist_loss,
    dkd_loss,
    kd_loss,
    logit_mse_loss,
    nckd_loss,
    prob_mse_loss,
    standardize_logits,
    tckd_loss,
    tf_kd_reg_loss,
    virtual_teacher,
)
from distill_zoo.models import create_model

LN2, LN3 = math.log(2.0), math.log(3.0)


# ---------------------------------------------------------------- plain-Python references


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def pearson(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    return cov / math.sqrt(var_a * var_b)


# ---------------------------------------------------------------- logit standardization


def test_standardize_logits_by_hand():
    # [1, 2, 3]: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1].
    # [0, 0, 4, 4]: mean 2, deviations +-2, unbiased variance 16/3, std 2.3094 -> +-0.8660.
    got = standardize_logits(torch.tensor([[1.0, 2.0, 3.0]]))
    assert got[0].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    got = standardize_logits(torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    r = 2 / math.sqrt(16 / 3)
    assert got[0].tolist() == pytest.approx([-r, -r, r, r], abs=1e-6)
    # Population std (the paper's Algorithm 1): sqrt(2/3) for [1, 2, 3] -> +-sqrt(3/2).
    got = standardize_logits(torch.tensor([[1.0, 2.0, 3.0]]), unbiased=False)
    assert got[0].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], abs=1e-6)
    # A constant row becomes zeros (eps guards the division), not NaN.
    assert standardize_logits(torch.full((1, 5), 3.0)).tolist() == [[0.0] * 5]


def test_standardize_logits_is_per_row_and_ignores_shift_and_scale():
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    z = standardize_logits(logits)
    assert z.mean(dim=1).abs().max() < 1e-6
    assert z.std(dim=1).sub(1).abs().max() < 1e-5
    scaled = logits * torch.tensor([[2.0], [0.5], [3.0], [1.0]]) + 7.0
    assert torch.allclose(standardize_logits(scaled), z, atol=1e-5)


# ---------------------------------------------------------------- logit matching (MSE)


def test_logit_mse_loss_by_hand():
    # Rows: (1-0)^2 + (2-0)^2 = 5 and (0-0)^2 + (0-3)^2 = 9; 1/(2B) * 14 = 14/4 = 3.5.
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert logit_mse_loss(student, teacher).item() == pytest.approx(3.5)
    # F.mse_loss (mean over B*K = 4 entries) is 14/4 = 3.5 too here: 2/K = 1 for K = 2.
    assert logit_mse_loss(student[:1], teacher[:1]).item() == pytest.approx(2.5)


def test_prob_mse_loss_by_hand():
    # T=1: student [0, 0] -> [1/2, 1/2]; teacher [ln 3, 0] -> [3/4, 1/4]; differences +-1/4,
    # 1/2 * (1/16 + 1/16) = 1/16.
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])
    assert prob_mse_loss(student, teacher, 1.0).item() == pytest.approx(1 / 16)
    # T=2: teacher [ln sqrt3, 0] -> [sqrt3, 1] / (sqrt3 + 1) = [0.63397, 0.36603];
    # differences +-0.13397, 1/2 * 2 * 0.13397^2 = 0.017949.
    d = math.sqrt(3) / (math.sqrt(3) + 1) - 0.5
    assert d * d == pytest.approx(0.017949, abs=1e-6)
    assert prob_mse_loss(student, teacher, 2.0).item() == pytest.approx(d * d, rel=1e-5)


# ---------------------------------------------------------------- DKD


def test_dkd_parts_by_hand():
    # K=3, target 0, T=1. Teacher [ln 2, 0, 0] -> [1/2, 1/4, 1/4];
    # student [0, 0, ln 2] -> [1/4, 1/4, 1/2].
    # TCKD: b_t = [1/2, 1/2], b_s = [1/4, 3/4]: 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841.
    # NCKD: among classes {1, 2} teacher [1/2, 1/2], student [1/3, 2/3]:
    #       1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8) = 0.058892.
    # KD:   1/2 ln 2 + 1/4 ln 1 + 1/4 ln(1/2) = 1/4 ln 2 = 0.173287
    #     = TCKD + (1 - 1/2) * NCKD = 0.143841 + 0.029446.
    teacher = torch.tensor([[LN2, 0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, LN2]])
    target = torch.tensor([0])
    tckd = 0.5 * math.log(4 / 3)
    nckd = 0.5 * math.log(9 / 8)
    assert tckd == pytest.approx(0.143841, abs=1e-6) and nckd == pytest.approx(0.058892, abs=1e-6)
    assert tckd + 0.5 * nckd == pytest.approx(0.25 * LN2)
    assert tckd_loss(student, teacher, target, 1.0).item() == pytest.approx(tckd, rel=1e-5)
    assert nckd_loss(student, teacher, target, 1.0).item() == pytest.approx(nckd, rel=1e-5)
    # DKD with alpha=1, beta=8: 0.143841 + 8 * 0.058892 = 0.614978.
    got = dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=1.0).item()
    assert got == pytest.approx(tckd + 8 * nckd, rel=1e-5)
    assert got == pytest.approx(0.614978, abs=1e-5)


def test_dkd_parts_match_an_explicit_loop_and_scale_by_t_squared():
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 6) * 3, torch.randn(5, 6) * 3
    targets = torch.tensor([0, 5, 2, 2, 3])
    temperature = 4.0
    tckd = tckd_loss(student, teacher, targets, temperature, reduction="none")
    nckd = nckd_loss(student, teacher, targets, temperature, reduction="none")
    for b in range(5):
        y = int(targets[b])
        p_s = softmax(student[b].tolist(), temperature)
        p_t = softmax(teacher[b].tolist(), temperature)
        binary = kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        others_t = [p / (1 - p_t[y]) for k, p in enumerate(p_t) if k != y]
        others_s = [p / (1 - p_s[y]) for k, p in enumerate(p_s) if k != y]
        assert tckd[b].item() == pytest.approx(temperature**2 * binary, rel=1e-4)
        assert nckd[b].item() == pytest.approx(temperature**2 * kl(others_t, others_s), rel=1e-4)
    batch = tckd_loss(student, teacher, targets, temperature).item()
    assert batch == pytest.approx(tckd.mean().item(), rel=1e-6)


def test_kd_is_tckd_plus_weighted_nckd_per_sample():
    # The paper's Eq. 4: KD = TCKD + (1 - p_t^T) * NCKD, p_t^T the teacher's target probability.
    torch.manual_seed(2)
    for temperature in (1.0, 4.0):
        student, teacher = torch.randn(8, 10) * 4, torch.randn(8, 10) * 4
        targets = torch.randint(0, 10, (8,))
        tckd = tckd_loss(student, teacher, targets, temperature, reduction="none")
        nckd = nckd_loss(student, teacher, targets, temperature, reduction="none")
        for b in range(8):
            p_s = softmax(student[b].tolist(), temperature)
            p_t = softmax(teacher[b].tolist(), temperature)
            kd = temperature**2 * kl(p_t, p_s)
            p_target = p_t[int(targets[b])]
            assert (tckd[b] + (1 - p_target) * nckd[b]).item() == pytest.approx(kd, rel=1e-4)


def test_dkd_loss_rejects_bad_input():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one class index per sample"):
        dkd_loss(logits, logits, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(logits, logits, torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="number of classes"):
        dkd_loss(logits, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- DIST


def test_dist_loss_by_hand():
    # tau=1: student rows [3/4, 1/4], [1/4, 3/4]; teacher rows [1/4, 3/4], [3/4, 1/4].
    # Every row pair and every column pair is perfectly anti-correlated (rho = -1), so
    # inter = intra = 1 - (-1) = 2 and the loss is 1^2 * (1 * 2 + 1 * 2) = 4.
    student = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    teacher = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    assert dist_loss(student, teacher, beta=1.0, gamma=1.0, tau=1.0).item() == pytest.approx(4.0)
    # beta and gamma weight the two relations; tau^2 multiplies both (tau=2 flips nothing:
    # the softened rows stay anti-correlated): 4 * (3 * 2 + 0.5 * 2) = 28.
    assert dist_loss(student, teacher, beta=3.0, gamma=0.5, tau=2.0).item() == pytest.approx(28.0)
    # Identical predictions correlate perfectly: 0 (up to fp32 rounding and the 1e-8 guard,
    # magnified by tau^2 * (beta + gamma) = 64 on these nearly flat tau=4 rows).
    assert dist_loss(student, student.clone(), 2.0, 2.0, 4.0).item() == pytest.approx(0, abs=1e-3)


def test_dist_loss_matches_an_explicit_pearson_loop():
    torch.manual_seed(3)
    student, teacher = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    beta, gamma, tau = 2.0, 0.5, 4.0
    y_s = [softmax(row, tau) for row in student.tolist()]
    y_t = [softmax(row, tau) for row in teacher.tolist()]
    inter = 1 - sum(pearson(a, b) for a, b in zip(y_s, y_t, strict=True)) / 6
    columns_s = [[row[k] for row in y_s] for k in range(5)]
    columns_t = [[row[k] for row in y_t] for k in range(5)]
    intra = 1 - sum(pearson(a, b) for a, b in zip(columns_s, columns_t, strict=True)) / 5
    expected = tau**2 * (beta * inter + gamma * intra)
    got = dist_loss(student, teacher, beta, gamma, tau).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_dist_loss_ignores_affine_changes_of_the_teacher_probabilities():
    # Pearson correlation is invariant to y -> a*y + c per row: a teacher whose every row is
    # an affine image of the student's row has inter-class relation 0.
    student = torch.tensor([[LN2, 0.0, 0.0]])  # [1/2, 1/4, 1/4]
    teacher = torch.tensor([[math.log(4 / 3), 0.0, 0.0]])  # [0.4, 0.3, 0.3]
    inter_only = dist_loss(student, teacher, beta=1.0, gamma=0.0, tau=1.0)
    assert inter_only.item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- Tf-KD


def test_virtual_teacher_by_hand():
    # K=4, a=0.7: 0.7 on the label, (1 - 0.7) / 3 = 0.1 elsewhere.
    got = virtual_teacher(torch.tensor([2, 0]), 4, 0.7)
    assert got.flatten().tolist() == pytest.approx([0.1, 0.1, 0.7, 0.1, 0.7, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        virtual_teacher(torch.tensor([0]), 4, 1.0)


def test_tf_kd_official_by_hand():
    # K=2, label 0, a=0.75, T=0.5: p_d / T = [1.5, 0.5] -> softmax [e, 1] / (e + 1)
    # = [0.731059, 0.268941]; the student [0, 0] at T=1 is [1/2, 1/2].
    # KL = 0.731059 ln(1.462117) + 0.268941 ln(0.537883) = 0.110944; mean over B*K = 2: 0.055472.
    q = [math.e / (math.e + 1), 1 / (math.e + 1)]
    expected = kl(q, [0.5, 0.5]) / 2
    assert expected == pytest.approx(0.055472, abs=1e-6)
    got = tf_kd_reg_loss(torch.zeros(1, 2), torch.tensor([0]), 0.75, 0.5, "official")
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_tf_kd_paper_by_hand():
    # K=2, label 0, a=0.8, T=2: p_d^(1/2) ∝ [sqrt 0.8, sqrt 0.2] = 2:1 -> [2/3, 1/3];
    # the student [0, 0] at T=2 is [1/2, 1/2]: KL = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.056633.
    expected = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert expected == pytest.approx(0.056633, abs=1e-6)
    got = tf_kd_reg_loss(torch.zeros(1, 2), torch.tensor([0]), 0.8, 2.0, "paper")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # A student at [2 ln 2, 0] softens to [2/3, 1/3] at T=2: it matches, KL = 0.
    student = torch.tensor([[2 * LN2, 0.0]])
    assert tf_kd_reg_loss(student, torch.tensor([0]), 0.8, 2.0, "paper").item() == (
        pytest.approx(0.0, abs=1e-6)
    )


def test_tf_kd_rejects_unknown_formulation():
    with pytest.raises(ValueError, match="formulation"):
        tf_kd_reg_loss(torch.zeros(1, 2), torch.tensor([0]), formulation="repdistiller")


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize(
    "loss",
    [
        lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0),
        lambda s, t, y: tckd_loss(s, t, y, 20.0),
        lambda s, t, y: nckd_loss(s, t, y, 20.0),
        lambda s, t, y: dist_loss(s, t, 2.0, 2.0, 4.0),
        lambda s, t, y: prob_mse_loss(s, t, 4.0),
        lambda s, t, y: logit_mse_loss(s, t),
        lambda s, t, y: tf_kd_reg_loss(s, y, 0.99, 20.0, "official"),
        lambda s, t, y: tf_kd_reg_loss(s, y, 0.9, 4.0, "paper"),
    ],
    ids=["dkd", "tckd", "nckd", "dist", "mse_probs", "mse_logits", "tf_kd", "tf_kd_paper"],
)
def test_logit_losses_run_in_fp32_under_bf16_autocast(loss):
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 100) * 5, torch.randn(16, 100) * 5
    targets = torch.randint(0, 100, (16,))
    reference = loss(student, teacher, targets)
    low_s, low_t = student.bfloat16(), teacher.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(low_s, low_t, targets)
        standardized = standardize_logits(low_s)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert standardized.dtype == torch.float32
    # Only the rounding of the inputs to bf16 differs from the fp32 run.
    assert low.item() == pytest.approx(loss(low_s.float(), low_t.float(), targets).item(), 1e-5)
    assert low.item() == pytest.approx(reference.item(), rel=0.05)


# ---------------------------------------------------------------- distillers on a zoo pair


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return create_model("resnet8", 10), create_model("resnet14", 10).eval()


@pytest.mark.parametrize(
    ("cls", "kwargs", "names"),
    [
        (DKD, {}, {"ce", "dkd"}),
        (DKD, {"logit_standardize": True, "kd_weight": 1.0}, {"ce", "kd", "dkd"}),
        (DIST, {}, {"ce", "dist"}),
        (DIST, {"logit_standardize": True}, {"ce", "dist"}),
        (KD, {}, {"ce", "kd"}),
        (KD, {"soft_loss": "mse_logits"}, {"ce", "kd"}),
        (KD, {"soft_loss": "mse_probs", "logit_standardize": True}, {"ce", "kd"}),
        (TfKD, {}, {"ce", "tf_kd"}),
        (TfKD, {"formulation": "paper"}, {"ce", "tf_kd"}),
    ],
)
def test_distiller_step_trains_the_student_only(pair, cls, kwargs, names):
    student, teacher = pair
    before = [p.clone() for p in teacher.parameters()]
    distiller = cls(student, teacher, **kwargs)
    terms = step(distiller, student, teacher, epoch=5)
    assert set(terms) == names
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    assert has_grad(student)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


def test_kd_kl_default_is_unchanged_and_options_use_their_losses(pair):
    student, teacher = pair
    torch.manual_seed(4)
    s, t = torch.randn(4, 10) * 3, torch.randn(4, 10) * 3
    out = StepOutputs(
        images=torch.zeros(4, 3, 32, 32),
        targets=torch.tensor([1, 3, 0, 2]),
        indices=torch.arange(4),
        student_logits=s,
        teacher_logits=t,
    )
    terms = KD(student, teacher)(out)
    assert terms["kd"].item() == pytest.approx(0.9 * kd_loss(s, t, 4.0).item())
    terms = KD(student, teacher, soft_loss="mse_logits", kd_weight=0.5)(out)
    assert terms["kd"].item() == pytest.approx(0.5 * logit_mse_loss(s, t).item())
    terms = KD(student, teacher, soft_loss="mse_probs", temperature=2.0)(out)
    assert terms["kd"].item() == pytest.approx(0.9 * prob_mse_loss(s, t, 2.0).item())
    terms = KD(student, teacher, logit_standardize=True, temperature=2.0, kd_weight=9.0)(out)
    expected = 9.0 * kd_loss(standardize_logits(s), standardize_logits(t), 2.0).item()
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="soft_loss"):
        KD(student, teacher, soft_loss="l1")


def test_dkd_warms_up_linearly_from_the_first_epoch(pair):
    student, teacher = pair
    distiller = DKD(student, teacher)
    # mdistiller counts epochs from 1 with weight e/20; ours count from 0: (epoch + 1) / 20.
    assert [distiller.warmup(e) for e in (0, 9, 19, 30)] == [1 / 20, 10 / 20, 1.0, 1.0]
    assert DKD(student, teacher, warmup_epochs=0).warmup(0) == 1.0
    torch.manual_seed(5)
    s, t = torch.randn(4, 10) * 3, torch.randn(4, 10) * 3
    targets = torch.tensor([1, 3, 0, 2])

    def terms(epoch):
        out = StepOutputs(torch.zeros(4), targets, torch.arange(4), s, t, epoch=epoch)
        return distiller(out)

    full = dkd_loss(s, t, targets, 1.0, 8.0, 4.0).item()
    assert terms(30)["dkd"].item() == pytest.approx(full, rel=1e-6)
    assert terms(0)["dkd"].item() == pytest.approx(full / 20, rel=1e-6)
    assert terms(0)["ce"].item() > 0
    with pytest.raises(ValueError, match="warmup_epochs"):
        DKD(student, teacher, warmup_epochs=-1)


def test_teacher_methods_need_a_teacher_and_tf_kd_does_not(pair):
    student, _ = pair
    for cls in (DKD, DIST, KD):
        with pytest.raises(ValueError, match="needs a teacher"):
            cls(student, None)
    distiller = TfKD(student, None)
    terms = step(distiller, student, None)
    assert set(terms) == {"ce", "tf_kd"} and has_grad(student)
    with pytest.raises(ValueError, match="correct_prob"):
        TfKD(student, None, correct_prob=1.0)
    with pytest.raises(ValueError, match="formulation"):
        TfKD(student, None, formulation="repdistiller")


def test_tf_kd_trains_without_a_teacher(tiny_config, tmp_path):
    metrics = train.run(tiny_config("distiller=tf_kd", "teacher=none"), tmp_path)
    assert metrics["teacher_params"] in (None, 0)
    assert metrics["best_val_acc1"] > 0.5, metrics
