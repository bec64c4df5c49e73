"""Golden values of the dense-prediction, adversarial and detection losses, worked out by hand
from the papers' formulas (structured KD, CWD, PKD, WGAN-GP, Chen et al.'s detection KD)."""

import math

import pytest
import torch

from distill_zoo.losses import (
    bounded_regression_loss,
    cwd_loss,
    gradient_penalty,
    pair_affinity,
    pairwise_affinity_loss,
    pkd_loss,
    weighted_soft_bce,
    weighted_soft_ce,
    wgan_critic_loss,
    wgan_generator_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def nodes_map(vectors: list[tuple[float, ...]], height: int, width: int) -> torch.Tensor:
    """``[1, C, H, W]`` map whose row-major positions hold ``vectors``."""
    return torch.tensor(vectors).T.reshape(1, -1, height, width)


# Teacher nodes (1,0),(0,1),(1,0),(0,1) on a 2x2 grid; the student's are all (1,0).
ALTERNATING = nodes_map([(1.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 1.0)], 2, 2)
ALL_X = nodes_map([(1.0, 0.0)] * 4, 2, 2)


# --- pair-wise affinity (structured KD) ------------------------------------------------------


def test_pair_affinity_is_cosine_similarity_by_hand():
    # Nodes (3,4) and (4,3): norms 5, so a_01 = (12 + 12) / 25 = 24/25; a_ii = 1.
    features = nodes_map([(3.0, 4.0), (4.0, 3.0)], 1, 2)
    expected = torch.tensor([[[1.0, 0.96], [0.96, 1.0]]])
    assert torch.allclose(pair_affinity(features), expected, atol=1e-6)


def test_pairwise_affinity_loss_by_hand():
    # pool_scale 0.5 on a 2x2 map: kernel int(2 * 0.5) = 1, so each pixel is a node, N = 4.
    # Teacher a_ij = 1 where i, j have the same parity, else 0; student a_ij = 1 everywhere.
    # They differ on the 8 ordered pairs (i even, j odd) and (i odd, j even), by 1 each:
    # loss = 8 / N^2 / B = 8 / 16 / 1 = 1/2.
    loss = pairwise_affinity_loss(ALL_X, ALTERNATING, pool_scale=0.5)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    # A second sample with identical maps adds 0 but doubles B: 8 / 16 / 2 = 1/4.
    student = torch.cat([ALL_X, ALTERNATING])
    teacher = torch.cat([ALTERNATING, ALTERNATING])
    assert pairwise_affinity_loss(student, teacher).item() == pytest.approx(0.25, abs=1e-6)


def test_pairwise_affinity_loss_zero_for_identical_maps_and_one_node():
    features = torch.randn(2, 3, 4, 4)
    assert pairwise_affinity_loss(features, features.clone()).item() == pytest.approx(0, abs=1e-6)
    # pool_scale 1 on a 2x2 map: kernel 2, one node, a = [[1]] for both: loss 0.
    assert pairwise_affinity_loss(ALL_X, ALTERNATING, 1.0).item() == pytest.approx(0, abs=1e-6)


def test_pairwise_affinity_loss_student_with_other_channels_and_size():
    # Student nodes (1,0,0) in 3 channels: same affinities as (1,0), so still 1/2.
    student = nodes_map([(1.0, 0.0, 0.0)] * 4, 2, 2)
    assert pairwise_affinity_loss(student, ALTERNATING).item() == pytest.approx(0.5, abs=1e-6)
    # A 4x4 student of all (1,0) pools to the teacher's 2x2 grid of (1,0): still 1/2.
    big = ALL_X.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert pairwise_affinity_loss(big, ALTERNATING).item() == pytest.approx(0.5, abs=1e-6)


def test_pairwise_affinity_loss_max_pools_4x4_to_2x2():
    # 4x4 teacher, pool_scale 0.5: kernel 2, grid 2x2. Each 2x2 block holds, in its "hot"
    # channel, [1, -1, -1, -1] (max 1) and in the other [0, -1, -1, -1] (max 0), so the max
    # gives nodes (1,0),(0,1),(1,0),(0,1) as above. (Averaging would give (-1/2, -3/4)-like
    # nodes and another loss.) The student's blocks all have channel 0 hot: nodes (1,0).
    hot = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    cold = torch.tensor([[0.0, -1.0], [-1.0, -1.0]])

    def blocks(hot_channel: list[int]) -> torch.Tensor:
        channels = [[hot if h == c else cold for h in hot_channel] for c in (0, 1)]
        rows = [
            torch.cat([torch.cat(ch[0:2], dim=1), torch.cat(ch[2:4], dim=1)], dim=0)
            for ch in channels
        ]
        return torch.stack(rows).unsqueeze(0)  # [1, 2, 4, 4]

    teacher, student = blocks([0, 1, 0, 1]), blocks([0, 0, 0, 0])
    assert pairwise_affinity_loss(student, teacher).item() == pytest.approx(0.5, abs=1e-6)


def test_pairwise_affinity_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="batch"):
        pairwise_affinity_loss(torch.zeros(2, 2, 2, 2), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        pairwise_affinity_loss(torch.zeros(1, 2, 4), torch.zeros(1, 2, 2, 2))
    for scale in (0.0, 1.5):
        with pytest.raises(ValueError, match="pool_scale"):
            pairwise_affinity_loss(ALL_X, ALTERNATING, scale)


# --- CWD ---------------------------------------------------------------------------------------


def test_cwd_loss_by_hand_tau_1_and_2():
    # One channel over two positions: teacher [ln 3, 0] -> [3/4, 1/4], student [0, 0] ->
    # [1/2, 1/2]. tau 1: KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812.
    student = torch.tensor([0.0, 0.0]).reshape(1, 1, 1, 2)
    teacher = torch.tensor([LN3, 0.0]).reshape(1, 1, 1, 2)
    assert cwd_loss(student, teacher).item() == pytest.approx(0.1308121, rel=1e-5)
    # tau 2: teacher [ln sqrt3, 0] -> [sqrt3, 1] / (sqrt3 + 1); times tau^2 = 4.
    r3 = math.sqrt(3.0)
    expected = 4.0 * kl([r3 / (r3 + 1), 1 / (r3 + 1)], [0.5, 0.5])
    assert expected == pytest.approx(0.145363, abs=1e-6)
    assert cwd_loss(student, teacher, tau=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_loss_averages_over_batch_and_channels():
    # B = 2, C = 2; only (b=0, c=0) differs (KL 0.130812 as above), the other three give 0:
    # loss = 0.130812 / (B * C) = 0.032703.
    student = torch.zeros(2, 2, 1, 2)
    teacher = torch.zeros(2, 2, 1, 2)
    teacher[0, 0, 0, 0] = LN3
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 4
    assert cwd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="connector"):
        cwd_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="resize"):
        cwd_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="temperature"):
        cwd_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), tau=0.0)


# --- PKD ---------------------------------------------------------------------------------------

# With the unbiased std s, z = (x - m) / s has sum z^2 = n - 1 per channel, so
# mse(z_s, z_t) / 2 = (2(n-1) - 2(n-1) r) / (2n) = (n-1)/n * (1 - r). Here n = B*H*W = 4:
# factor 3/4. (The 1e-6 added to s changes the values by ~1e-6 relatively.)


def test_pkd_affine_map_gives_zero_and_negated_map_gives_3_2():
    teacher = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    assert pkd_loss(2 * teacher + 5, teacher).item() == pytest.approx(0.0, abs=1e-5)
    # r = -1: 3/4 * 2 = 3/2.
    assert pkd_loss(-teacher, teacher).item() == pytest.approx(1.5, rel=1e-5)


def test_pkd_uncorrelated_maps_by_hand():
    # t = [1, 1, -1, -1], s = [1, -1, 1, -1]: both mean 0, s^2 = 4/3, z = +-sqrt(3)/2.
    # z_t - z_s = [0, sqrt3, -sqrt3, 0]: squares [0, 3, 3, 0], mean 3/2, halved: 3/4
    # = 3/4 * (1 - r) with r = 0.
    teacher = torch.tensor([1.0, 1.0, -1.0, -1.0]).reshape(1, 1, 2, 2)
    student = torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 2, 2)
    assert pkd_loss(student, teacher).item() == pytest.approx(0.75, rel=1e-5)


def test_pkd_standardises_per_channel_over_the_batch():
    # B = 2, C = 2, 1x2 maps: n = 4 values per channel across the batch. Channel 0 of the
    # student is an affine copy (loss 0), channel 1 negated (3/2): mean over C*n = 3/4.
    teacher = torch.tensor([[[1.0, 2.0], [5.0, -1.0]], [[3.0, 4.0], [0.0, 2.0]]])
    teacher = teacher.unsqueeze(2)  # [2, 2, 1, 2]
    student = teacher.clone()
    student[:, 0] = 3 * teacher[:, 0] - 1
    student[:, 1] = -teacher[:, 1]
    assert pkd_loss(student, teacher).item() == pytest.approx(0.75, rel=1e-5)


def test_pkd_resizes_the_student_bilinearly():
    # Width 2 -> 4 with align_corners=False: output x samples the input at (x + 0.5) / 2 - 0.5
    # = -0.25, 0.25, 0.75, 1.25 (clamped to [0, 1]), so [0, 1] becomes [0, 1/4, 3/4, 1].
    student = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)
    teacher = torch.tensor([0.0, 1.0, 3.0, 4.0]).reshape(1, 1, 1, 4)  # 4 * that: r = 1
    assert pkd_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert pkd_loss(student, teacher.flip(-1)).item() == pytest.approx(1.5, rel=1e-5)


def test_pkd_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="connector"):
        pkd_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))


# --- WGAN-GP -----------------------------------------------------------------------------------


def test_wgan_losses_on_given_scores():
    real, fake = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0])
    assert wgan_critic_loss(real, fake).item() == pytest.approx(0.5 - 2.0)
    assert wgan_generator_loss(fake).item() == pytest.approx(-0.5)


def linear_critic(w: torch.Tensor):
    """``D(x) = sum(w * x)`` per sample: its gradient is ``w`` everywhere."""
    return lambda x: (w * x).flatten(1).sum(dim=1)


def test_gradient_penalty_of_linear_critic_is_exact_for_any_epsilon():
    # grad D = w = (3, 4) at every x_hat: ||w|| = 5, penalty (5 - 1)^2 = 16.
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    real, fake = torch.randn(3, 2), torch.randn(3, 2)
    for eps in ([0.0, 0.5, 1.0], [0.2, 0.9, 0.4]):
        penalty = gradient_penalty(linear_critic(w), real, fake, torch.tensor(eps))
        assert penalty.item() == pytest.approx(16.0, rel=1e-6)
    # The graph of the gradient is kept: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    # = 2 * 4 * (3, 4) / 5 = (4.8, 6.4).
    penalty.backward()
    assert torch.allclose(w.grad, torch.tensor([4.8, 6.4]), atol=1e-5)


def test_gradient_penalty_zero_for_unit_gradient_and_random_epsilon():
    # w = (0.6, 0.8) on [B, 1, 1, 2] maps: ||w|| = 1, penalty 0 (epsilon drawn inside).
    w = torch.tensor([0.6, 0.8]).reshape(1, 2)
    real, fake = torch.randn(4, 1, 1, 2), torch.randn(4, 1, 1, 2, requires_grad=True)
    with torch.no_grad():
        penalty = gradient_penalty(linear_critic(w), real, fake)
    assert penalty.item() == pytest.approx(0.0, abs=1e-6)
    assert fake.grad is None


def test_gradient_penalty_computes_in_the_given_dtype():
    # float64 throughout: (||(1, 1)|| - 1)^2 = (sqrt2 - 1)^2 = 3 - 2 sqrt2.
    w = torch.ones(2, dtype=torch.float64)
    real = torch.zeros(2, 2, dtype=torch.float64)
    penalty = gradient_penalty(linear_critic(w), real, real + 1)
    assert penalty.dtype == torch.float64
    assert penalty.item() == pytest.approx(3 - 2 * math.sqrt(2), rel=1e-12)
    with pytest.raises(ValueError, match="one epsilon per sample"):
        gradient_penalty(linear_critic(w), real, real, torch.zeros(3))


# --- Chen et al.'s detection KD ----------------------------------------------------------------


def test_weighted_soft_ce_two_classes_by_hand():
    # p_t = softmax([ln 3, 0]) = [3/4, 1/4]; log p_s = log softmax([0, 0]) = [-ln 2, -ln 2].
    # Background (index 0) weight 3/2: loss = (3/2 * 3/4 + 1/4) ln 2 = 11/8 ln 2.
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])
    assert weighted_soft_ce(student, teacher).item() == pytest.approx(11 / 8 * LN2, rel=1e-6)
    # T = 2 on teacher [2 ln 3, 0] gives the same p_t; no T^2 factor.
    got = weighted_soft_ce(student, 2 * teacher, temperature=2.0).item()
    assert got == pytest.approx(11 / 8 * LN2, rel=1e-6)


def test_weighted_soft_ce_three_classes_rows_and_background_index():
    # Row 1: p_t = softmax([ln 2, 0, 0]) = [1/2, 1/4, 1/4], p_s = softmax([0, ln 2, 0])
    # = [1/4, 1/2, 1/4]: loss = 3/2 * 1/2 * 2 ln 2 + 1/4 ln 2 + 1/4 * 2 ln 2 = 9/4 ln 2.
    # Row 2: all logits 0, p = 1/3 each: loss = (3/2 + 1 + 1) / 3 * ln 3 = 7/6 ln 3.
    student = torch.tensor([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = (9 / 4 * LN2 + 7 / 6 * LN3) / 2
    assert weighted_soft_ce(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # Background at index 2, row 1: 1/2 * 2 ln 2 + 1/4 ln 2 + 3/2 * 1/4 * 2 ln 2 = 2 ln 2.
    got = weighted_soft_ce(student[:1], teacher[:1], background_index=2).item()
    assert got == pytest.approx(2 * LN2, rel=1e-6)


def test_weighted_soft_bce_by_hand():
    # Anchor 1: p_t = sigmoid(ln 3) = 3/4, student logit 0: log sigmoid(+-0) = -ln 2:
    #   3/4 ln 2 + 3/2 * 1/4 ln 2 = 9/8 ln 2.
    # Anchor 2: p_t = 1/2, student ln 3: log sigmoid(ln 3) = ln 3/4, log sigmoid(-ln 3) = ln 1/4:
    #   -(1/2 ln 3/4 + 3/2 * 1/2 ln 1/4) = 1/2 ln 4/3 + 3/4 ln 4.
    student, teacher = torch.tensor([[0.0, LN3]]), torch.tensor([[LN3, 0.0]])
    expected = (9 / 8 * LN2 + 0.5 * math.log(4 / 3) + 0.75 * math.log(4)) / 2
    assert weighted_soft_bce(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    got = weighted_soft_bce(student[:, :1], 2 * teacher[:, :1], temperature=2.0).item()
    assert got == pytest.approx(9 / 8 * LN2, rel=1e-6)


def test_detection_losses_on_empty_input_give_zero_with_grad_path():
    for loss, shape in (
        (lambda s: weighted_soft_ce(s, torch.zeros(0, 3)), (0, 3)),
        (lambda s: weighted_soft_bce(s, torch.zeros(0)), (0,)),
        (lambda s: bounded_regression_loss(s, torch.zeros(0, 4), torch.zeros(0, 4)), (0, 4)),
    ):
        student = torch.zeros(shape, requires_grad=True)
        value = loss(student)
        assert value.item() == 0.0
        value.backward()
        assert student.grad is not None and student.grad.shape == shape


def test_weighted_soft_ce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        weighted_soft_ce(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one shape"):
        weighted_soft_bce(torch.zeros(2), torch.zeros(3))


def test_bounded_regression_loss_by_hand():
    target = torch.zeros(2, 4)
    # Row 1: e_s = 1 < e_t = 4: the student beats the teacher, no loss (margin 0).
    # Row 2: e_s = 1 + 1 = 2 > e_t = 1: loss e_s = 2. Mean over both rows: (0 + 2) / 2 = 1.
    student = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    target.requires_grad_(True)
    loss = bounded_regression_loss(student, teacher, target)
    assert loss.item() == pytest.approx(1.0)
    # d/ds of e_s / N = 2 (s - y) / 2 on row 2 only.
    loss.backward()
    assert torch.equal(student.grad, torch.tensor([[0.0] * 4, [1.0, 1.0, 0.0, 0.0]]))
    assert teacher.grad is None and target.grad is None
    # Margin 3.5: row 1 now counts too (1 + 3.5 > 4): (1 + 2) / 2 = 3/2.
    with_margin = bounded_regression_loss(student, teacher, target, margin=3.5)
    assert with_margin.item() == pytest.approx(1.5)


def test_bounded_regression_loss_is_l2_when_student_is_worse():
    # s - y = (1, 2, -1, 0): e_s = 1 + 4 + 1 = 6; the teacher is exact (e_t = 0).
    target = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    student = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    assert bounded_regression_loss(student, target, target).item() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="one shape"):
        bounded_regression_loss(student, target, torch.zeros(1, 5))


# --- mixed precision ---------------------------------------------------------------------------


def test_losses_return_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 4, 4).bfloat16() for _ in range(2)]
    rows = [torch.randn(5, 4).bfloat16() for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [
            pair_affinity(maps[0]),
            pairwise_affinity_loss(*maps),
            cwd_loss(*maps, tau=4.0),
            pkd_loss(*maps),
            wgan_critic_loss(rows[0], rows[1]),
            wgan_generator_loss(rows[0]),
            weighted_soft_ce(rows[0], rows[1], temperature=2.0),
            weighted_soft_bce(rows[0], rows[1]),
            bounded_regression_loss(*rows),
        ]
        w = torch.tensor([3.0, 4.0, 0.0, 0.0])
        penalty = gradient_penalty(linear_critic(w), rows[0].float(), rows[1].float())
    for value in values:
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
    assert penalty.item() == pytest.approx(16.0, rel=1e-2)
