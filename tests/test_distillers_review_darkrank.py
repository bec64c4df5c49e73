"""ReviewKD and DarkRank: the hierarchical context loss, attention-based fusion, Plackett-Luce
rankings and DarkRank's scores worked out by hand or by explicit loops over the papers'
formulas, then both distillers on heterogeneous zoo pairs."""

import itertools
import math

import pytest
import torch
from helpers import distill_step as step
from helpers import has_grad

from distill_zoo.distillers.base import DistillContext
from distill_zoo.distillers.darkrank import DarkRank
from distill_zoo.distillers.reviewkd import ABF, ReviewKD
from distill_zoo.losses import (
    darkrank_loss,
    darkrank_scores,
    hcl_loss,
    listmle_loss,
    plackett_luce_log_prob,
)
from distill_zoo.models import create_model

# ---------------------------------------------------------------- HCL by hand


def corner(size: int, block: int, value: float) -> torch.Tensor:
    """A ``[1, 1, size, size]`` map of zeros with ``value`` in its top-left ``block x block``."""
    x = torch.zeros(1, 1, size, size)
    x[..., :block, :block] = value
    return x


def test_hcl_loss_on_a_4x4_map_skips_the_4x4_level_and_halves_the_weights():
    # s = 0, t = 4 in the top-left 2x2 of a 4x4 map. Levels 4, 2, 1: 4 >= H is skipped, so
    # 2x2 weighs 1/2 and 1x1 weighs 1/4 (not 1/4 and 1/8).
    # full: 4 cells of 4^2 = 64 over 16 cells -> 4
    # 2x2 pooled: [[4, 0], [0, 0]] -> 16 / 4 = 4
    # 1x1 pooled: mean 1 -> 1
    # (4 + 4/2 + 1/4) / (1 + 1/2 + 1/4) = 6.25 / 1.75 = 25/7
    s, t = torch.zeros(1, 1, 4, 4), corner(4, 2, 4.0)
    assert hcl_loss(s, t).item() == pytest.approx(25 / 7)


def test_hcl_loss_on_an_8x8_map_uses_all_three_levels():
    # t = 2 in the top-left 4x4 of an 8x8 map, s = 0.
    # full: 16 cells of 4 over 64 -> 1
    # 4x4 pooled: top-left 2x2 = 2 -> 4 * 4 / 16 = 1
    # 2x2 pooled: [[2, 0], [0, 0]] -> 4 / 4 = 1
    # 1x1 pooled: mean 0.5 -> 0.25
    # (1 + 1/2 + 1/4 + 0.25/8) / (1 + 1/2 + 1/4 + 1/8) = 1.78125 / 1.875 = 0.95
    s, t = torch.zeros(1, 1, 8, 8), corner(8, 4, 2.0)
    assert hcl_loss(s, t).item() == pytest.approx(0.95)
    # Without levels it is the plain MSE.
    assert hcl_loss(s, t, levels=()).item() == pytest.approx(1.0)


def test_hcl_loss_sums_pairs_and_a_pooled_pair_is_plain_mse():
    # A 1x1 pair (a pooled embedding): no level is smaller, so MSE of [1, 3] vs [0, 0] = 5.
    s1, t1 = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    assert hcl_loss(s1, t1).item() == pytest.approx(5.0)
    pairs_s = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 8, 8), s1]
    pairs_t = [corner(4, 2, 4.0), corner(8, 4, 2.0), t1]
    assert hcl_loss(pairs_s, pairs_t).item() == pytest.approx(25 / 7 + 0.95 + 5.0)


def test_hcl_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differs in shape"):
        hcl_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------- ABF on a tiny example


def identity_bn(abf: ABF) -> None:
    """Eval-mode BatchNorms that pass their input through (eps 0, mean 0, var 1)."""
    for bn in (abf.conv1[1], abf.conv2[1]):
        bn.eps = 0.0
    abf.eval()


def test_abf_fuses_the_upsampled_residual_with_learned_spatial_attention():
    abf = ABF(in_channels=1, mid_channels=1, out_channels=3, fuse=True)
    identity_bn(abf)
    with torch.no_grad():
        abf.conv1[0].weight.fill_(1.0)  # x passes through conv1
        att = abf.att_conv[0]
        att.weight.zero_()
        att.weight[0, 0] = 1.0  # attention on x: sigmoid(x) per pixel
        att.bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # on the residual: sigmoid(log 3) = 3/4
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    residual = torch.full((1, 1, 1, 1), 8.0)  # from a 1x1 deeper level: upsampled to 2x2 of 8s
    output, fused = abf(x, residual, out_size=(4, 4))
    # fused at 2x2: x * sigmoid(x) + 8 * 3/4, then nearest-upsampled to the teacher's 4x4.
    expected = [[v * (1 / (1 + math.exp(-v))) + 6.0 for v in row] for row in [[1, 2], [3, 4]]]
    expected = torch.tensor(expected).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert fused.shape == (1, 1, 4, 4)
    assert torch.allclose(fused[0, 0], expected, atol=1e-6)
    assert output.shape == (1, 3, 4, 4)
    assert torch.allclose(output, abf.conv2[0](fused), atol=1e-6)


def test_abf_without_fusion_and_missing_residual():
    deepest = ABF(in_channels=4, mid_channels=2, out_channels=5, fuse=False)
    assert deepest.att_conv is None
    output, fused = deepest(torch.randn(3, 4, 1, 1), None, out_size=(1, 1))
    assert output.shape == (3, 5, 1, 1) and fused.shape == (3, 2, 1, 1)
    with pytest.raises(ValueError, match="residual"):
        ABF(4, 2, 5, fuse=True)(torch.randn(3, 4, 2, 2), None, out_size=(2, 2))


# ---------------------------------------------------------------- ListMLE and scores by hand


def test_listmle_by_hand_for_three_items():
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    # Ranking (0, 1, 2): -log P = [log(e^2 + e + 1) - 2] + [log(e + 1) - 1] + [0 - 0]
    #   = (2.4076059 - 2) + (1.3132617 - 1) = 0.7208676
    best = math.log(math.e**2 + math.e + 1) - 2 + math.log(math.e + 1) - 1
    assert best == pytest.approx(0.7208676, abs=1e-6)
    assert listmle_loss(scores, torch.tensor([[0, 1, 2]])).item() == pytest.approx(best)
    # Reverse ranking (2, 1, 0): [log(e^2 + e + 1) - 0] + [log(e^2 + e) - 1] = 3.7208676
    worst = math.log(math.e**2 + math.e + 1) + math.log(math.e**2 + math.e) - 1
    assert listmle_loss(scores, torch.tensor([[2, 1, 0]])).item() == pytest.approx(worst)
    # The Plackett-Luce probabilities of all 6 rankings sum to 1.
    perms = torch.tensor(list(itertools.permutations(range(3))))
    assert plackett_luce_log_prob(scores[0][perms]).exp().sum().item() == pytest.approx(1.0)


def test_darkrank_scores_by_hand():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # distances: d01 = 1, d02 = 2, d12 = sqrt(5); S = -3 d^3
    s = darkrank_scores(x, alpha=3.0, beta=3.0)
    expected = torch.tensor(
        [
            [0.0, -3.0, -24.0],
            [-3.0, 0.0, -3 * 5**1.5],
            [-24.0, -3 * 5**1.5, 0.0],
        ]
    )
    assert torch.allclose(s, expected, atol=1e-4)
    # alpha 2, beta 1: S = -2 d
    assert darkrank_scores(x, alpha=2.0, beta=1.0)[0, 2].item() == pytest.approx(-4.0)


# ---------------------------------------------------------------- DarkRank by explicit loops


def loop_log_prob(scores: list[float]) -> float:
    """log of prod_j exp(s_j) / sum_{k >= j} exp(s_k), written out."""
    total = 0.0
    for j in range(len(scores)):
        total += scores[j] - math.log(sum(math.exp(v) for v in scores[j:]))
    return total


def loop_darkrank(student, teacher, alpha, beta, length, soft):
    """The paper's losses over 1-D embeddings, query by query, with plain Python loops."""
    b = len(student)
    losses = []
    for q in range(b):
        others = [i for i in range(b) if i != q]
        order = sorted(others, key=lambda i: abs(teacher[q] - teacher[i]))[:length]

        def score(x, i, q=q):
            return -alpha * abs(x[q] - x[i]) ** beta

        if not soft:
            losses.append(-loop_log_prob([score(student, i) for i in order]))
            continue
        kl = 0.0
        for perm in itertools.permutations(order):
            log_t = loop_log_prob([score(teacher, i) for i in perm])
            log_s = loop_log_prob([score(student, i) for i in perm])
            kl += math.exp(log_t) * (log_t - log_s)
        losses.append(kl)
    return sum(losses) / b


STUDENT_1D = [0.0, 0.5, 2.0, 1.2, 3.5]
TEACHER_1D = [0.0, 1.0, 3.0, 6.5, 2.5]  # no ties in any query's distances


@pytest.mark.parametrize("length", [2, 3, 4, None])
@pytest.mark.parametrize("soft", [False, True])
def test_darkrank_loss_matches_the_formula_written_as_loops(length, soft):
    s = torch.tensor(STUDENT_1D).view(-1, 1)
    t = torch.tensor(TEACHER_1D).view(-1, 1)
    got = darkrank_loss(
        s,
        t,
        alpha=1.0,
        beta=2.0,
        transfer="soft" if soft else "hard",
        list_length=length,
        normalize=False,
    )
    expected = loop_darkrank(STUDENT_1D, TEACHER_1D, 1.0, 2.0, length or 4, soft)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_darkrank_soft_is_zero_when_the_student_is_the_teacher_and_hard_is_not():
    x = torch.randn(8, 16)
    assert darkrank_loss(x, x, transfer="soft").item() == pytest.approx(0.0, abs=1e-6)
    assert darkrank_loss(x, x).item() > 0  # ListMLE: the teacher's order is never certain
    # Normalised embeddings: scaling either network changes nothing.
    assert darkrank_loss(3 * x, x).item() == pytest.approx(darkrank_loss(x, x).item(), rel=1e-5)


def test_darkrank_loss_rejects_bad_options():
    x = torch.randn(12, 4)
    with pytest.raises(ValueError, match="transfer"):
        darkrank_loss(x, x, transfer="medium")
    with pytest.raises(ValueError, match="list_length"):
        darkrank_loss(x, x, list_length=1)
    with pytest.raises(ValueError, match="permutations"):
        darkrank_loss(x, x, transfer="soft", list_length=None)  # 11! permutations


# ---------------------------------------------------------------- distillers on zoo pairs

STAGES = {
    "resnet8": ["layer1", "layer2", "layer3"],
    "resnet32x4": ["layer1", "layer2", "layer3"],
    "shufflenetv2": ["layer1", "layer2", "layer3"],
    "wrn_40_2": ["block1", "block2", "block3"],
    "vgg8": ["block1", "block2", "block3", "block4"],
    "mobilenetv2": ["layer1", "layer2", "layer3", "layer4"],
}


def make_pair(teacher_arch: str, student_arch: str):
    torch.manual_seed(0)
    teacher = create_model(teacher_arch, 10).eval().requires_grad_(False)
    student = create_model(student_arch, 10)
    context = DistillContext(
        student_stages=STAGES[student_arch],
        teacher_stages=STAGES[teacher_arch],
        example_input=torch.zeros(2, 3, 32, 32),
        num_classes=10,
    )
    return student, teacher, context


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return all(p.grad is None for p in model.parameters()) and all(
        torch.equal(before[k], after[k]) for k in before
    )


REVIEW_PAIRS = {
    # teacher -> student: (student layers, teacher layers, teacher widths, teacher sizes)
    ("resnet32x4", "shufflenetv2"): (
        ["layer1", "layer2", "layer3", "avgpool"],
        ["layer1.4.relu2:input", "layer2.4.relu2:input", "layer3.4.relu2:input", "avgpool"],
        [64, 128, 256, 256],
        [(32, 32), (16, 16), (8, 8), (1, 1)],
    ),
    ("wrn_40_2", "resnet8"): (
        ["layer1", "layer2", "layer3", "avgpool"],
        ["block1", "block2", "block3", "avgpool"],  # pre-activation WRN: already un-rectified
        [32, 64, 128, 128],
        [(32, 32), (16, 16), (8, 8), (1, 1)],
    ),
    ("vgg8", "mobilenetv2"): (
        ["layer1", "layer2", "layer3", "layer4", "avgpool"],
        ["block1.2:input", "block2.2:input", "block3.2:input", "block4.2:input", "pool4"],
        [128, 256, 512, 512, 512],
        [(16, 16), (8, 8), (4, 4), (4, 4), (1, 1)],
    ),
}


@pytest.mark.parametrize(("teacher_arch", "student_arch"), list(REVIEW_PAIRS))
def test_reviewkd_on_heterogeneous_pairs(teacher_arch, student_arch):
    student, teacher, context = make_pair(teacher_arch, student_arch)
    s_layers, t_layers, widths, sizes = REVIEW_PAIRS[(teacher_arch, student_arch)]
    distiller = ReviewKD(student, teacher, context=context)
    assert distiller.layers() == (s_layers, t_layers)
    assert [abf.conv2[0].out_channels for abf in distiller.abfs] == widths
    assert [tuple(size) for size in distiller.out_sizes] == sizes
    # Fusion width: min(512, width of the student's pooled embedding: 1024, 64, 1280).
    mid = {"shufflenetv2": 512, "resnet8": 64, "mobilenetv2": 512}[student_arch]
    assert all(abf.conv1[0].out_channels == mid for abf in distiller.abfs)
    fused = [abf.att_conv is not None for abf in distiller.abfs]
    assert fused == [True] * (len(widths) - 1) + [False]  # the deepest level has no residual
    before = snapshot(teacher)
    terms = step(distiller, student, teacher, epoch=19, batch=4)  # after the warm-up
    assert set(terms) == {"ce", "reviewkd"} and all(torch.isfinite(v) for v in terms.values())
    assert terms["reviewkd"] > 0
    assert has_grad(student) and all(has_grad(abf) for abf in distiller.abfs)
    assert all(has_grad(abf.att_conv) for abf in distiller.abfs[:-1])
    assert untouched(teacher, before)


def test_reviewkd_warmup_and_fusion_width():
    student, teacher, context = make_pair("wrn_40_2", "resnet8")
    distiller = ReviewKD(student, teacher, context=context, warmup_epochs=20)
    # mdistiller's min(1, e / 20) with e counted from 1.
    assert distiller.warmup_factor(0) == pytest.approx(1 / 20)
    assert distiller.warmup_factor(9) == pytest.approx(0.5)
    assert distiller.warmup_factor(19) == distiller.warmup_factor(100) == 1.0
    assert ReviewKD(student, teacher, context=context, warmup_epochs=0).warmup_factor(0) == 1.0
    torch.manual_seed(1)
    half = step(distiller, student, teacher, epoch=9)
    torch.manual_seed(1)
    full = step(distiller, student, teacher, epoch=19)
    assert half["reviewkd"].item() == pytest.approx(0.5 * full["reviewkd"].item(), rel=1e-5)
    assert half["ce"].item() == pytest.approx(full["ce"].item())
    narrow = ReviewKD(student, teacher, context=context, mid_channels=8, include_penultimate=False)
    assert narrow.layers() == (["layer1", "layer2", "layer3"], ["block1", "block2", "block3"])
    assert all(abf.conv1[0].out_channels == 8 for abf in narrow.abfs)
    assert narrow.abfs[-1].att_conv is None


def test_reviewkd_rejects_bad_options():
    student, teacher, context = make_pair("wrn_40_2", "resnet8")
    with pytest.raises(ValueError, match="warmup_epochs"):
        ReviewKD(student, teacher, context=context, warmup_epochs=-1)
    with pytest.raises(ValueError, match="mid_channels"):
        ReviewKD(student, teacher, context=context, mid_channels=0)
    with pytest.raises(ValueError, match="unknown layer"):
        ReviewKD(student, teacher, context=context, student_layers=["layer9"])
    with pytest.raises(ValueError, match="example_input"):
        ReviewKD(student, teacher, context=DistillContext(student_stages=STAGES["resnet8"]))


@pytest.mark.parametrize("transfer", ["hard", "soft"])
@pytest.mark.parametrize(
    ("teacher_arch", "student_arch"), [("wrn_40_2", "resnet8"), ("vgg8", "mobilenetv2")]
)
def test_darkrank_on_heterogeneous_pairs(teacher_arch, student_arch, transfer):
    student, teacher, context = make_pair(teacher_arch, student_arch)
    distiller = DarkRank(student, teacher, context=context, transfer=transfer)
    penultimate = "pool4" if teacher_arch == "vgg8" else "avgpool"
    assert distiller.layers() == (["avgpool"], [penultimate])
    assert not list(distiller.parameters())  # nothing trainable of its own
    before = snapshot(teacher)
    terms = step(distiller, student, teacher)
    assert set(terms) == {"ce", "darkrank"} and all(torch.isfinite(v) for v in terms.values())
    assert terms["darkrank"] > 0
    assert has_grad(student)
    assert untouched(teacher, before)


def test_darkrank_rejects_bad_options():
    student, teacher, context = make_pair("wrn_40_2", "resnet8")
    with pytest.raises(ValueError, match="permutations"):
        DarkRank(student, teacher, context=context, transfer="soft", list_length=None)
    with pytest.raises(ValueError, match="transfer"):
        DarkRank(student, teacher, context=context, transfer="medium")
    with pytest.raises(ValueError, match="alpha"):
        DarkRank(student, teacher, context=context, alpha=0.0)
