"""Token-level divergences for language-model distillation: golden values worked out by hand
from the definitions (Hinton KD, MiniLLM's reverse KL, DistiLLM's skew KLs, GKD's generalized
JSD), masking, temperature, the top-k teacher cache, chunking and its memory, cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill_zoo.losses.language import (
    DIVERGENCES,
    TopKLogProbs,
    teacher_topk,
    token_cross_entropy,
    token_divergence,
)

LN2, LN3, LN5 = math.log(2.0), math.log(3.0), math.log(5.0)


def kl(a: list[float], b: list[float]) -> float:
    """KL(a || b) of two hand-written distributions (terms with a_i = 0 are 0)."""
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def as_logits(*rows: list[float]) -> torch.Tensor:
    """Distributions -> [1, L, V] logits log(p), whose softmax at T=1 is p itself."""
    return torch.tensor([rows], dtype=torch.float64).log().float()


# Pair A (the brief's): teacher p = [1/2, 1/4, 1/4], student q = [1/4, 1/2, 1/4]. A
# permutation of each other, so KL(p||q) = KL(q||p) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln2/4.
P_A, Q_A = [1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]
# Pair B (asymmetric): teacher p = [1/2, 1/4, 1/4], student q = [1/8, 1/8, 3/4].
P_B, Q_B = [1 / 2, 1 / 4, 1 / 4], [1 / 8, 1 / 8, 3 / 4]
# KL(p||q) = 1/2 ln 4 + 1/4 ln 2 + 1/4 ln(1/3) = 5/4 ln2 - 1/4 ln3
FORWARD_B = 5 / 4 * LN2 - 1 / 4 * LN3
# KL(q||p) = 1/8 ln(1/4) + 1/8 ln(1/2) + 3/4 ln 3 = -3/8 ln2 + 3/4 ln3
REVERSE_B = -3 / 8 * LN2 + 3 / 4 * LN3


def div(student, teacher, mask=None, **kwargs) -> float:
    return token_divergence(student, teacher, mask, **kwargs).item()


# ------------------------------------------------------------------------------------------
# Hand examples, V = 3


def test_forward_and_reverse_kl_pair_a():
    s, t = as_logits(Q_A), as_logits(P_A)
    assert kl(P_A, Q_A) == pytest.approx(LN2 / 4)
    assert div(s, t, divergence="forward_kl") == pytest.approx(LN2 / 4, rel=1e-6)
    assert div(s, t, divergence="reverse_kl") == pytest.approx(LN2 / 4, rel=1e-6)


def test_forward_and_reverse_kl_pair_b_differ():
    s, t = as_logits(Q_B), as_logits(P_B)
    assert abs(FORWARD_B - 0.591781) < 1e-6
    assert abs(REVERSE_B - 0.564030) < 1e-6
    assert div(s, t, divergence="forward_kl") == pytest.approx(FORWARD_B, rel=1e-6)
    assert div(s, t, divergence="reverse_kl") == pytest.approx(REVERSE_B, rel=1e-6)


def test_skew_kl_alpha_half_pair_a():
    # m = 1/2 p + 1/2 q = [3/8, 3/8, 1/4];
    # KL(p||m) = 1/2 ln(4/3) + 1/4 ln(2/3) + 0 = 5/4 ln2 - 3/4 ln3 = 0.042475
    expected = 5 / 4 * LN2 - 3 / 4 * LN3
    assert expected == pytest.approx(kl(P_A, [3 / 8, 3 / 8, 1 / 4]))
    got = div(as_logits(Q_A), as_logits(P_A), divergence="skew_kl", alpha=0.5)
    assert got == pytest.approx(expected, rel=1e-5)


def test_skew_kl_alpha_half_pair_b():
    # m = 1/2 p + 1/2 q = [5/16, 3/16, 1/2];
    # KL(p||m) = 1/2 ln(8/5) + 1/4 ln(4/3) + 1/4 ln(1/2) = 7/4 ln2 - 1/2 ln5 - 1/4 ln3
    expected = 7 / 4 * LN2 - 1 / 2 * LN5 - 1 / 4 * LN3
    assert expected == pytest.approx(0.133636, abs=1e-6)
    got = div(as_logits(Q_B), as_logits(P_B), divergence="skew_kl", alpha=0.5)
    assert got == pytest.approx(expected, rel=1e-5)


def test_skew_reverse_kl_alpha_tenth_pair_b():
    # m = 0.9 p + 0.1 q = [37/80, 19/80, 24/80], q = [10/80, 10/80, 60/80];
    # KL(q||m) = 1/8 ln(10/37) + 1/8 ln(10/19) + 3/4 ln(60/24)
    expected = 1 / 8 * math.log(10 / 37) + 1 / 8 * math.log(10 / 19) + 3 / 4 * math.log(5 / 2)
    got = div(as_logits(Q_B), as_logits(P_B), divergence="skew_reverse_kl", alpha=0.1)
    assert got == pytest.approx(expected, rel=1e-5)


def test_skew_kl_endpoints():
    # alpha = 0: the mixture is q (skew_kl) or p (skew_reverse_kl) -> forward / reverse KL;
    # alpha = 1: the mixture is the first argument itself -> 0.
    s, t = as_logits(Q_B), as_logits(P_B)
    assert div(s, t, divergence="skew_kl", alpha=0.0) == pytest.approx(FORWARD_B, rel=1e-6)
    assert div(s, t, divergence="skew_reverse_kl", alpha=0.0) == pytest.approx(REVERSE_B, rel=1e-6)
    for name in ("skew_kl", "skew_reverse_kl"):
        s_grad = s.clone().requires_grad_(True)
        loss = token_divergence(s_grad, t, divergence=name, alpha=1.0)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(s_grad.grad, torch.zeros_like(s))


def test_jsd_beta_half_is_classic_jensen_shannon():
    # Pair A: m = [3/8, 3/8, 1/4]; 1/2 KL(p||m) + 1/2 KL(q||m) = 5/4 ln2 - 3/4 ln3 (both halves
    # equal by symmetry). Classic JS = H(m) - (H(p) + H(q))/2 with H(p) = H(q) = 3/2 ln2 and
    # H(m) = 2 * 3/8 ln(8/3) + 1/4 ln 4 = 11/4 ln2 - 3/4 ln3: the same 5/4 ln2 - 3/4 ln3.
    expected = 5 / 4 * LN2 - 3 / 4 * LN3
    got = div(as_logits(Q_A), as_logits(P_A), divergence="jsd", beta=0.5)
    assert got == pytest.approx(expected, rel=1e-5)
    # Pair B against the entropy form of the classic JSD.
    m = [(x + y) / 2 for x, y in zip(P_B, Q_B, strict=True)]

    def entropy(d):
        return -sum(x * math.log(x) for x in d)

    expected_b = entropy(m) - (entropy(P_B) + entropy(Q_B)) / 2
    got_b = div(as_logits(Q_B), as_logits(P_B), divergence="jsd", beta=0.5)
    assert got_b == pytest.approx(expected_b, rel=1e-5)


def test_jsd_general_beta_pair_b():
    # beta = 1/4: m = 1/4 p + 3/4 q = [7/32, 5/32, 20/32]; p = [16, 8, 8]/32, q = [4, 4, 24]/32.
    # KL(p||m) = 1/2 ln(16/7) + 1/4 ln(8/5) + 1/4 ln(8/20)
    # KL(q||m) = 1/8 ln(4/7) + 1/8 ln(4/5) + 3/4 ln(24/20)
    kl_pm = 1 / 2 * math.log(16 / 7) + 1 / 4 * math.log(8 / 5) + 1 / 4 * math.log(8 / 20)
    kl_qm = 1 / 8 * math.log(4 / 7) + 1 / 8 * math.log(4 / 5) + 3 / 4 * math.log(24 / 20)
    expected = 1 / 4 * kl_pm + 3 / 4 * kl_qm
    got = div(as_logits(Q_B), as_logits(P_B), divergence="jsd", beta=0.25)
    assert got == pytest.approx(expected, rel=1e-5)


def test_jsd_beta_endpoints_are_forward_and_reverse_kl():
    s, t = as_logits(Q_B), as_logits(P_B)
    assert div(s, t, divergence="jsd", beta=0.0) == pytest.approx(FORWARD_B, rel=1e-6)
    assert div(s, t, divergence="jsd", beta=1.0) == pytest.approx(REVERSE_B, rel=1e-6)


def test_identical_distributions_give_zero_for_every_divergence():
    logits = torch.randn(2, 5, 11) * 3
    for name in DIVERGENCES:
        assert div(logits, logits.clone(), divergence=name, temperature=2.0) == pytest.approx(
            0.0, abs=1e-6
        )


# ------------------------------------------------------------------------------------------
# Temperature


def test_temperature_softens_and_scales_by_t_squared():
    # Teacher logits [0, 0, 0] -> p = [1/3, 1/3, 1/3] at any T.
    # Student logits [2 ln2, 0, 0]: at T=2 -> [ln2, 0, 0] -> q = [1/2, 1/4, 1/4];
    # at T=1 -> q = [4, 1, 1]/6 = [2/3, 1/6, 1/6].
    s = torch.tensor([[[2 * LN2, 0.0, 0.0]]])
    t = torch.zeros(1, 1, 3)
    # T=2: KL(p||q) = 1/3 ln(2/3) + 2/3 ln(4/3) = 5/3 ln2 - ln3; times T^2 = 4.
    expected_t2 = 4 * (5 / 3 * LN2 - LN3)
    assert expected_t2 == pytest.approx(0.226532, abs=1e-6)
    assert div(s, t, temperature=2.0) == pytest.approx(expected_t2, rel=1e-5)
    # T=1: KL(p||q) = 1/3 ln(1/2) + 2/3 ln 2 = 1/3 ln2.
    assert div(s, t, temperature=1.0) == pytest.approx(LN2 / 3, rel=1e-6)
    # Reverse at T=2: KL(q||p) = 1/2 ln(3/2) + 1/2 ln(3/4) = ln3 - 3/2 ln2; times 4.
    expected_rev = 4 * (LN3 - 3 / 2 * LN2)
    assert div(s, t, divergence="reverse_kl", temperature=2.0) == pytest.approx(
        expected_rev, rel=1e-5
    )


def test_forward_kl_gradient_is_t_times_q_minus_p_over_count():
    # d/ds [T^2 KL(p || softmax(s/T))] = T^2 (q - p) / T = T (q - p). With the example above
    # at T=2: 2 ([1/2, 1/4, 1/4] - [1/3, 1/3, 1/3]) = [1/3, -1/6, -1/6]. Two identical
    # positions: the mean halves each position's share -> [1/6, -1/12, -1/12] at each.
    s = torch.tensor([[[2 * LN2, 0.0, 0.0], [2 * LN2, 0.0, 0.0]]], requires_grad=True)
    token_divergence(s, torch.zeros(1, 2, 3), temperature=2.0).backward()
    expected = torch.tensor([1 / 6, -1 / 12, -1 / 12]).expand(1, 2, 3)
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# Masking

HUGE_S, HUGE_T = [0.0, 100.0, 0.0], [100.0, 0.0, 0.0]  # KL about 100 nats


def test_masked_position_is_excluded_and_gets_no_gradient():
    # Positions: pair A (ln2/4), pair B (FORWARD_B), and one with a huge divergence (~100).
    s = torch.cat([as_logits(Q_A, Q_B), torch.tensor([[HUGE_S]])], dim=1).requires_grad_(True)
    t = torch.cat([as_logits(P_A, P_B), torch.tensor([[HUGE_T]])], dim=1)
    assert div(s, t) > 30  # the huge position counts when unmasked
    mask = torch.tensor([[True, True, False]])
    loss = token_divergence(s, t, mask)
    assert loss.item() == pytest.approx((LN2 / 4 + FORWARD_B) / 2, rel=1e-6)
    loss.backward()
    assert torch.equal(s.grad[0, 2], torch.zeros(3))
    assert s.grad[0, :2].abs().sum() > 0
    only_b = torch.tensor([[False, True, False]])
    assert div(s, t, only_b) == pytest.approx(FORWARD_B, rel=1e-6)


def test_mean_is_over_counted_positions_not_sequences():
    # Row 0: [pair A, huge (masked)]; row 1: [pair B, pair B]. Three counted positions:
    # (ln2/4 + 2 FORWARD_B) / 3, not the mean of per-sequence means (ln2/4 + FORWARD_B) / 2.
    s = torch.cat([torch.cat([as_logits(Q_A), torch.tensor([[HUGE_S]])], 1), as_logits(Q_B, Q_B)])
    t = torch.cat([torch.cat([as_logits(P_A), torch.tensor([[HUGE_T]])], 1), as_logits(P_B, P_B)])
    mask = torch.tensor([[True, False], [True, True]])
    expected = (LN2 / 4 + 2 * FORWARD_B) / 3
    assert div(s, t, mask) == pytest.approx(expected, rel=1e-6)
    assert div(s, t, mask, chunk_size=1) == pytest.approx(expected, rel=1e-6)
    # A 0/1 integer mask (an attention mask) means the same.
    assert div(s, t, mask.long()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_false_mask_gives_connected_zero(divergence, chunk_size):
    s = (torch.randn(2, 5, 7) * 3).requires_grad_(True)
    t = torch.randn(2, 5, 7) * 3
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for teacher in (t, teacher_topk(t, 3)):
        s.grad = None
        loss = token_divergence(s, teacher, mask, divergence=divergence, chunk_size=chunk_size)
        assert loss.item() == 0.0
        assert loss.requires_grad
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s))


# ------------------------------------------------------------------------------------------
# Chunking


def _value_and_grad(s, teacher, mask, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    loss = token_divergence(s, teacher, mask, **kwargs)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_equals_unchunked(divergence):
    torch.manual_seed(0)
    # Logits of scale 1.5 keep the loss near 1, where atol 1e-6 is a few float32 ulps.
    s, t = torch.randn(2, 10, 13) * 1.5, torch.randn(2, 10, 13) * 1.5
    mask = torch.rand(2, 10) > 0.3
    kwargs = {"divergence": divergence, "temperature": 2.0, "alpha": 0.1, "beta": 0.3}
    for teacher in (t, teacher_topk(t, 4, temperature=2.0)):
        ref_value, ref_grad = _value_and_grad(s, teacher, mask, **kwargs)
        for chunk_size in (1, 3, 5, 64):  # 5 divides L = 10, 3 does not, 64 > L
            value, grad = _value_and_grad(s, teacher, mask, chunk_size=chunk_size, **kwargs)
            torch.testing.assert_close(value, ref_value, atol=1e-6, rtol=0)
            torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_equals_unchunked_bf16(divergence):
    torch.manual_seed(1)
    s = (torch.randn(2, 9, 17) * 3).bfloat16()
    t = (torch.randn(2, 9, 17) * 3).bfloat16()
    kwargs = {"divergence": divergence, "temperature": 1.5}
    ref_value, ref_grad = _value_and_grad(s, t, None, **kwargs)
    assert ref_value.dtype == torch.float32 and ref_grad.dtype == torch.bfloat16
    # The bf16 inputs are upcast and the maths is fp32: the fp32 computation on the same
    # (bf16-representable) values gives the same loss.
    fp32_value = token_divergence(s.float(), t.float(), **kwargs)
    torch.testing.assert_close(ref_value, fp32_value, atol=1e-6, rtol=0)
    for chunk_size in (2, 3):  # neither divides L = 9
        value, grad = _value_and_grad(s, t, None, chunk_size=chunk_size, **kwargs)
        torch.testing.assert_close(value, ref_value, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad.float(), ref_grad.float(), atol=1e-6, rtol=0)


def test_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 50) * 5, torch.randn(2, 4, 50) * 5
    for temperature in (1.0, 8.0):
        reference = token_divergence(s, t, temperature=temperature, chunk_size=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = token_divergence(s, t, temperature=temperature, chunk_size=3)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)


def _saved_bytes(fn, inputs):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, leaving
    out those of ``inputs`` (the logits exist anyway; chunk views of them cost nothing)."""
    own = {x.untyped_storage().data_ptr() for x in inputs}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = fn()
    return loss, sum(saved.values())


def test_chunking_saves_only_views_for_backward():
    torch.manual_seed(3)
    batch, length, vocab, chunk = 2, 64, 1000, 8
    t = torch.randn(batch, length, vocab)
    s_full = (torch.randn(batch, length, vocab) * 2).requires_grad_(True)
    s_chunk = s_full.detach().clone().requires_grad_(True)
    mask = torch.rand(batch, length) > 0.2

    loss_full, bytes_full = _saved_bytes(
        lambda: token_divergence(s_full, t, mask, divergence="jsd"), (s_full, t, mask)
    )
    loss_chunk, bytes_chunk = _saved_bytes(
        lambda: token_divergence(s_chunk, t, mask, divergence="jsd", chunk_size=chunk),
        (s_chunk, t, mask),
    )
    one_fp32_copy = batch * length * vocab * 4  # 512 000 bytes
    assert bytes_full >= one_fp32_copy  # unchunked keeps several [B, L, V] fp32 tensors
    assert bytes_chunk * 4 <= bytes_full
    assert bytes_chunk < batch * chunk * vocab * 4  # not even one chunk's fp32 softmax
    loss_full.backward()
    loss_chunk.backward()
    torch.testing.assert_close(loss_chunk, loss_full, atol=1e-6, rtol=0)
    torch.testing.assert_close(s_chunk.grad, s_full.grad, atol=1e-6, rtol=0)


def test_no_grad_chunked_value():
    torch.manual_seed(4)
    s, t = torch.randn(1, 7, 9), torch.randn(1, 7, 9)
    reference = token_divergence(s, t, divergence="reverse_kl")
    with torch.no_grad():
        got = token_divergence(s, t, divergence="reverse_kl", chunk_size=2)
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# Top-k teacher cache

# Teacher logits log[1, 2, 4, 1] -> p = [1/8, 1/4, 1/2, 1/8]; top-2: ids [2, 1], probs
# [1/2, 1/4], rest 1/4. Student logits log[2, 2, 1, 3] -> q = [1/4, 1/4, 1/8, 3/8]; at ids
# [2, 1]: [1/8, 1/4], rest 1/4 + 3/8 = 5/8. The 3-bucket distributions:
#   p^ = [1/2, 1/4, 1/4],  q^ = [1/8, 1/4, 5/8]
# forward KL(p^||q^) = 1/2 ln 4 + 1/4 ln 1 + 1/4 ln(2/5) = 5/4 ln2 - 1/4 ln5 = 0.464075
# reverse KL(q^||p^) = 1/8 ln(1/4) + 0 + 5/8 ln(5/2) = 5/8 ln5 - 7/8 ln2 = 0.399394
# (the full forward KL(p||q) = -1/8 ln2 + 0 + ln2 - 1/8 ln3 = 0.469177 is larger: merging
# tokens into one bucket can only lose divergence.)
TOPK_T = [[[0.0, LN2, 2 * LN2, 0.0]]]
TOPK_S = [[[LN2, LN2, 0.0, math.log(3.0)]]]


def test_topk_hand_example_v4_k2():
    t, s = torch.tensor(TOPK_T), torch.tensor(TOPK_S)
    cache = teacher_topk(t, 2)
    assert cache.indices.tolist() == [[[2, 1]]]
    torch.testing.assert_close(cache.logprobs.exp(), torch.tensor([[[0.5, 0.25]]]))
    torch.testing.assert_close(cache.rest_logprob().exp(), torch.tensor([[0.25]]))
    forward = 5 / 4 * LN2 - 1 / 4 * LN5
    reverse = 5 / 8 * LN5 - 7 / 8 * LN2
    assert forward == pytest.approx(0.464075, abs=1e-6)
    assert reverse == pytest.approx(0.399394, abs=1e-6)
    assert div(s, cache, divergence="forward_kl") == pytest.approx(forward, rel=1e-6)
    assert div(s, cache, divergence="reverse_kl") == pytest.approx(reverse, rel=1e-6)
    full = -1 / 8 * LN2 + LN2 - 1 / 8 * LN3
    assert div(s, t, divergence="forward_kl") == pytest.approx(full, rel=1e-6)
    # jsd beta = 1/2 on the buckets: m = [5/16, 1/4, 7/16];
    # 1/2 [1/2 ln(8/5) + 0 + 1/4 ln(4/7)] + 1/2 [1/8 ln(2/5) + 0 + 5/8 ln(10/7)]
    jsd = 0.5 * (0.5 * math.log(8 / 5) + 0.25 * math.log(4 / 7)) + 0.5 * (
        1 / 8 * math.log(2 / 5) + 5 / 8 * math.log(10 / 7)
    )
    assert div(s, cache, divergence="jsd", beta=0.5) == pytest.approx(jsd, rel=1e-5)
    # A cache entry written by hand (as a cache on disk would hold it) gives the same.
    by_hand = TopKLogProbs(
        torch.tensor([[[math.log(0.5), math.log(0.25)]]]), torch.tensor([[[2, 1]]]), 1.0
    )
    assert div(s, by_hand) == pytest.approx(forward, rel=1e-6)


def test_topk_zero_rest_is_finite():
    # k = 1 with all the teacher's mass on token 1: p^ = [1, 0] (rest exactly 0). Student
    # q = [1/4, 1/2, 1/4] -> q^ = [1/2, 1/2].
    # forward: 1 ln(1 / (1/2)) + (rest 0 contributes 0) = ln2.
    # reverse: 1/2 ln((1/2) / 1) + 1/2 (ln(1/2) - ln(tiny)), the rest floored at the smallest
    # normal float32, tiny = 2^-126: -1/2 ln2 + 1/2 (-ln2 + 126 ln2) = 62 ln2.
    cache = TopKLogProbs(torch.zeros(1, 1, 1), torch.tensor([[[1]]]), 1.0)
    assert cache.rest_prob().item() == 0.0
    assert cache.rest_logprob().item() == pytest.approx(-126 * LN2, rel=1e-6)
    s = as_logits([1 / 4, 1 / 2, 1 / 4]).requires_grad_(True)
    assert div(s, cache, divergence="forward_kl") == pytest.approx(LN2, rel=1e-6)
    loss = token_divergence(s, cache, divergence="reverse_kl")
    assert loss.item() == pytest.approx(62 * LN2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    for name in DIVERGENCES:
        assert math.isfinite(div(s, cache, divergence=name))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_k_equal_v_is_the_full_divergence(divergence):
    torch.manual_seed(5)
    s, t = torch.randn(2, 4, 7) * 3, torch.randn(2, 4, 7) * 3
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    kwargs = {"divergence": divergence, "temperature": 2.0, "alpha": 0.2, "beta": 0.3}
    full_value, full_grad = _value_and_grad(s, t, mask, **kwargs)
    cache = teacher_topk(t, 7, temperature=2.0)
    value, grad = _value_and_grad(s, cache, mask, **kwargs)
    torch.testing.assert_close(value, full_value, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=0)


def test_teacher_topk_sorted_at_temperature():
    # Logits [0, 2 ln4, 2 ln2, 0] at T=2 -> [0, ln4, ln2, 0] -> p = [1, 4, 2, 1]/8: the two
    # largest are ids [1, 2] with probabilities [1/2, 1/4]; the rest is 1/4.
    t = torch.tensor([[0.0, 4 * LN2, 2 * LN2, 0.0]]).bfloat16()
    cache = teacher_topk(t, 2, temperature=2.0)
    assert cache.temperature == 2.0 and cache.k == 2 and cache.shape == (1,)
    assert cache.logprobs.dtype == torch.float32 and cache.indices.dtype == torch.int64
    assert cache.indices.tolist() == [[1, 2]]
    torch.testing.assert_close(
        cache.logprobs.exp(), torch.tensor([[0.5, 0.25]]), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(cache.rest_prob(), torch.tensor([0.25]), atol=1e-3, rtol=0)
    # index / to keep the entry whole.
    row = cache.index(0)
    assert row.indices.tolist() == [1, 2] and row.temperature == 2.0
    assert cache.to("cpu").indices.tolist() == [[1, 2]]


def test_topk_wrong_temperature_raises():
    t = torch.randn(1, 2, 5)
    cache = teacher_topk(t, 2, temperature=2.0)
    with pytest.raises(ValueError, match="temperature 2.0"):
        token_divergence(torch.randn(1, 2, 5), cache, temperature=1.0)


def test_topk_k_out_of_range_raises():
    t = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match=r"k must be in \[1, V\]"):
        teacher_topk(t, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, V\]"):
        teacher_topk(t, 6)
    too_many = TopKLogProbs(torch.zeros(1, 2, 6), torch.zeros(1, 2, 6, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="k = 6"):
        token_divergence(torch.randn(1, 2, 5), too_many)
    out_of_vocab = TopKLogProbs(torch.zeros(1, 2, 1), torch.full((1, 2, 1), 5), 1.0)
    with pytest.raises(ValueError, match="share a vocabulary"):
        token_divergence(torch.randn(1, 2, 5), out_of_vocab)


# ------------------------------------------------------------------------------------------
# Cross-entropy


def test_token_cross_entropy_hand_example():
    # Position 0: p = [1/2, 1/4, 1/4], target 0 -> -ln(1/2) = ln2.
    # Position 1: same p, target 1 -> -ln(1/4) = 2 ln2. Position 2: ignored.
    # Mean over the two counted positions: 3/2 ln2.
    logits = as_logits(P_A, P_A, Q_A)
    targets = torch.tensor([[0, 1, -100]])
    assert token_cross_entropy(logits, targets).item() == pytest.approx(1.5 * LN2, rel=1e-6)
    assert token_cross_entropy(logits, targets, chunk_size=2).item() == pytest.approx(
        1.5 * LN2, rel=1e-6
    )


def test_token_cross_entropy_matches_torch_and_chunks():
    torch.manual_seed(6)
    logits = torch.randn(2, 9, 11) * 2
    targets = torch.randint(0, 11, (2, 9))
    targets[0, :3] = -100
    targets[1, 5] = -100
    reference = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    x = logits.clone().requires_grad_(True)
    value = token_cross_entropy(x, targets)
    value.backward()
    torch.testing.assert_close(value, reference, atol=1e-6, rtol=0)
    for chunk_size in (2, 3, 4):
        y = logits.clone().requires_grad_(True)
        chunked = token_cross_entropy(y, targets, chunk_size=chunk_size)
        chunked.backward()
        torch.testing.assert_close(chunked, value.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(y.grad, x.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_token_cross_entropy_all_ignored_is_connected_zero(chunk_size):
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.full((2, 5), -100)
    loss = token_cross_entropy(logits, targets, chunk_size=chunk_size)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ------------------------------------------------------------------------------------------
# Errors


def test_vocabulary_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match="do student and teacher share a vocabulary") as info:
        token_divergence(torch.randn(2, 3, 10), torch.randn(2, 3, 12))
    assert "(2, 3, 10)" in str(info.value) and "(2, 3, 12)" in str(info.value)


def test_bad_arguments_raise_clear_errors():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="forward_kl.*reverse_kl.*skew_kl.*skew_reverse_kl.*jsd"):
        token_divergence(s, t, divergence="kl")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        token_divergence(s, t, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got -0.1"):
        token_divergence(s, t, divergence="skew_kl", alpha=-0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_divergence(s, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"mask must be \[B, L\]"):
        token_divergence(s, t, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        token_divergence(s, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"\[B, L\] = \(2, 3\) targets"):
        token_cross_entropy(s, torch.zeros(2, 4, dtype=torch.long))
