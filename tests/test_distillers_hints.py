"""FitNets, AT, FSP and NST: loss golden values worked out by hand or with explicit loops over
the papers' formulas, and the distillers on heterogeneous zoo pairs."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import distill_step as run_step
from omegaconf import OmegaConf

from distill_zoo.distillers.at import AT
from distill_zoo.distillers.base import DistillContext
from distill_zoo.distillers.fitnets import FitNets, HintRegressor
from distill_zoo.distillers.fsp import FSP
from distill_zoo.distillers.nst import NST
from distill_zoo.losses import (
    at_loss,
    attention_map,
    fsp_loss,
    fsp_matrix,
    hint_loss,
    nst_loss,
)
from distill_zoo.models import create_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- reference maths, by loops


def block_mean(feature: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Average of equal blocks (what adaptive pooling does when the sizes divide)."""
    h, w = len(feature), len(feature[0])
    bh, bw = h // out_h, w // out_w
    return [
        [
            sum(feature[i * bh + a][j * bw + b] for a in range(bh) for b in range(bw)) / (bh * bw)
            for j in range(out_w)
        ]
        for i in range(out_h)
    ]


def loop_fsp(first: torch.Tensor, second: torch.Tensor) -> list[list[list[float]]]:
    """G[b][i][j] = 1/(h*w) sum_{s,t} F1[b,i,s,t] F2[b,j,s,t], pooling the larger map first."""
    f1, f2 = first.tolist(), second.tolist()
    h = min(first.shape[2], second.shape[2])
    w = min(first.shape[3], second.shape[3])
    out = []
    for b in range(first.shape[0]):
        a = [block_mean(f1[b][i], h, w) for i in range(first.shape[1])]
        c = [block_mean(f2[b][j], h, w) for j in range(second.shape[1])]
        out.append(
            [
                [
                    sum(a[i][s][q] * c[j][s][q] for s in range(h) for q in range(w)) / (h * w)
                    for j in range(len(c))
                ]
                for i in range(len(a))
            ]
        )
    return out


def loop_mmd2(student: torch.Tensor, teacher: torch.Tensor, degree: int, c: float) -> float:
    """Batch mean of the polynomial-kernel MMD^2 between the normalised channel maps."""

    def samples(x, b):
        rows = [[v for row in channel for v in row] for channel in x[b].tolist()]
        return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]

    def kmean(xs, ys):
        total = sum((sum(p * q for p, q in zip(x, y, strict=True)) + c) ** degree
                    for x in xs for y in ys)  # fmt: skip
        return total / (len(xs) * len(ys))

    values = []
    for b in range(student.shape[0]):
        s, tt = samples(student, b), samples(teacher, b)
        values.append(kmean(tt, tt) + kmean(s, s) - 2 * kmean(s, tt))
    return sum(values) / len(values)


# ---------------------------------------------------------------- hint_loss (FitNets)


def test_hint_loss_hand_computed():
    # diff = [1, 2, 3, 4] for sample 0 and 0 for sample 1: sum of squares 30 over 8 elements.
    student = t([[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    teacher = t([[[[0.0, 0.0], [0.0, 0.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    assert hint_loss(student, teacher).item() == pytest.approx(30 / 8)
    # Paper, Eq. 3: 1/2 ||u_h - r(v_g)||^2 per sample, batch mean = (15 + 0) / 2.
    assert hint_loss(student, teacher, formulation="paper").item() == pytest.approx(7.5)


def test_hint_loss_rejects_shape_mismatch_and_unknown_formulation():
    with pytest.raises(ValueError, match="differ in shape"):
        hint_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="formulation"):
        hint_loss(torch.zeros(1, 1), torch.zeros(1, 1), formulation="other")


# ---------------------------------------------------------------- at_loss


def test_attention_map_hand_computed():
    # Channels [1, 0] and [-1, 2]: Q = mean_c A^2 = [1, 2], normalised [1, 2] / sqrt(5).
    feature = t([[[[1.0, 0.0]], [[-1.0, 2.0]]]])
    expected = [1 / math.sqrt(5), 2 / math.sqrt(5)]
    assert attention_map(feature).flatten().tolist() == pytest.approx(expected)
    # p=1 uses |A|: Q = [1, 1] -> [1, 1] / sqrt(2).
    assert attention_map(feature, p=1.0).flatten().tolist() == pytest.approx([2**-0.5] * 2)


def test_at_loss_hand_computed_both_formulations():
    # q_s = [1, 2]/sqrt5 (as above), teacher (one channel [3, 0]) q_t = [1, 0].
    # diff = [1/sqrt5 - 1, 2/sqrt5]; |diff|^2 = 2 - 2/sqrt5.
    student = t([[[[1.0, 0.0]], [[-1.0, 2.0]]]])
    teacher = t([[[[3.0, 0.0]]]])
    squared = 2 - 2 / math.sqrt(5)
    assert at_loss(student, teacher).item() == pytest.approx(squared / 2)  # mean of 2 entries
    assert at_loss(student, teacher, formulation="paper").item() == pytest.approx(
        math.sqrt(squared)
    )
    # A list of layer pairs sums the per-layer losses.
    total = at_loss([student, student], [teacher, teacher])
    assert total.item() == pytest.approx(squared)


def test_at_loss_pools_the_larger_map_and_averages_over_the_batch():
    torch.manual_seed(0)
    student = torch.rand(2, 3, 1, 2)
    teacher = torch.rand(2, 5, 2, 4)
    # Reference: pool the teacher's 2x4 maps to 1x2 by 2x2 block means, then the formula.
    pooled = t([[block_mean(ch, 1, 2) for ch in sample] for sample in teacher.tolist()])
    expected = 0.0
    for b in range(2):
        qs = [sum(ch[0][j] ** 2 for ch in student[b].tolist()) / 3 for j in range(2)]
        qt = [sum(ch[0][j] ** 2 for ch in pooled[b].tolist()) / 5 for j in range(2)]
        ns, nt = math.hypot(*qs), math.hypot(*qt)
        expected += sum((qs[j] / ns - qt[j] / nt) ** 2 for j in range(2)) / 2
    expected /= 2  # batch mean
    assert at_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert at_loss(teacher, student).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- fsp_loss


def test_fsp_matrix_hand_computed():
    # F1 channels [1, 2] and [3, 4], F2 channel [5, 6] over 2 positions:
    # G = [[(5 + 12)/2], [(15 + 24)/2]] = [[8.5], [19.5]].
    first = t([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    second = t([[[[5.0, 6.0]]]])
    assert fsp_matrix(first, second).tolist() == [[[8.5], [19.5]]]


def test_fsp_loss_hand_computed_both_formulations():
    # Student pair gives G_s = [[8.5], [19.5]]; a zero teacher gives G_t = 0.
    student = [t([[[[1.0, 2.0]], [[3.0, 4.0]]]]), t([[[[5.0, 6.0]]]])]
    teacher = [torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)]
    squares = 8.5**2 + 19.5**2  # 72.25 + 380.25
    assert fsp_loss(student, teacher).item() == pytest.approx(squares / 2)
    assert fsp_loss(student, teacher, formulation="paper").item() == pytest.approx(squares)


def test_fsp_loss_matches_loop_reference_with_pooling():
    torch.manual_seed(1)
    # Three layers -> pairs (0, 1) and (1, 2); layer 0 is 4x4 and is pooled to 2x2.
    student = [torch.rand(2, 2, 4, 4), torch.rand(2, 3, 2, 2), torch.rand(2, 2, 2, 2)]
    teacher = [torch.rand(2, 2, 4, 4), torch.rand(2, 3, 2, 2), torch.rand(2, 2, 2, 2)]
    mean_form, paper_form = 0.0, 0.0
    for i in range(2):
        gs, gt = loop_fsp(student[i], student[i + 1]), loop_fsp(teacher[i], teacher[i + 1])
        per_sample = [
            sum(
                (gs[b][r][q] - gt[b][r][q]) ** 2
                for r in range(len(gs[b]))
                for q in range(len(gs[b][0]))
            )
            for b in range(2)
        ]
        entries = len(gs[0]) * len(gs[0][0])
        mean_form += sum(per_sample) / (2 * entries)
        paper_form += sum(per_sample) / 2
    assert fsp_loss(student, teacher).item() == pytest.approx(mean_form, rel=1e-5)
    assert fsp_loss(student, teacher, formulation="paper").item() == pytest.approx(
        paper_form, rel=1e-5
    )


def test_fsp_loss_needs_pairs_of_equal_channels():
    with pytest.raises(ValueError, match="at least two"):
        fsp_loss([torch.rand(1, 2, 2, 2)], [torch.rand(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="channel counts"):
        fsp_loss([torch.rand(1, 2, 2, 2)] * 2, [torch.rand(1, 3, 2, 2)] * 2)


# ---------------------------------------------------------------- nst_loss


def test_nst_loss_hand_computed():
    # Student channels [3, 0] -> [1, 0] and [0, 1]; teacher one channel [1, 0].
    # d=2, c=0: K_tt = 1; K_ss = mean([[1, 0], [0, 1]]) = 1/2; K_st = mean(1, 0) = 1/2.
    # MMD^2 = 1 + 1/2 - 2 * 1/2 = 1/2.
    student = t([[[[3.0, 0.0]], [[0.0, 1.0]]]])
    teacher = t([[[[1.0, 0.0]]]])
    assert nst_loss(student, teacher).item() == pytest.approx(0.5)
    # d=1, c=1: K_tt = 2; K_ss = mean([[2, 1], [1, 2]]) = 3/2; K_st = mean(2, 1) = 3/2 -> 1/2.
    assert nst_loss(student, teacher, degree=1, c=1.0).item() == pytest.approx(0.5)
    # Identical sets of channels: zero discrepancy.
    assert nst_loss(student, student).item() == pytest.approx(0.0, abs=1e-6)


def test_nst_loss_matches_loop_reference_with_pooling():
    torch.manual_seed(2)
    student = torch.rand(2, 3, 2, 2) + 0.1
    teacher = torch.rand(2, 5, 4, 4) + 0.1
    pooled = t([[block_mean(ch, 2, 2) for ch in sample] for sample in teacher.tolist()])
    expected = loop_mmd2(student, pooled, degree=2, c=0.0)
    assert nst_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    both = nst_loss([student, student], [teacher, teacher], degree=3, c=0.5)
    assert both.item() == pytest.approx(2 * loop_mmd2(student, pooled, 3, 0.5), rel=1e-5)


# ---------------------------------------------------------------- distillers on the zoo


def stages(name: str) -> list[str]:
    return yaml.safe_load((CONF / "student" / f"{name}.yaml").read_text())["feature_layers"]


@pytest.fixture(scope="module")
def pair():
    """A heterogeneous pair: resnet32x4 teacher (3 stages) -> ShuffleNetV2 student."""
    torch.manual_seed(0)
    teacher = create_model("resnet32x4", 10).eval()
    student = create_model("shufflenetv2", 10)
    context = DistillContext(
        student_stages=stages("shufflenetv2"),
        teacher_stages=stages("resnet32x4"),
        example_input=torch.zeros(2, 3, 32, 32),
        num_classes=10,
    )
    return student, teacher, context


def assert_trains(terms, student, distiller) -> None:
    assert all(torch.isfinite(v) for v in terms.values()), terms
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for name, p in distiller.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert not any(p is q for p in distiller.parameters() for q in student.parameters())


def test_fitnets_on_heterogeneous_pair(pair):
    student, teacher, context = pair
    distiller = FitNets(student, teacher, context=context)
    assert distiller.layers() == (["layer2"], ["layer2"])  # stage index 1 of both
    terms = run_step(distiller, student, teacher)
    assert set(terms) == {"ce", "hint"}
    assert_trains(terms, student, distiller)
    assert any(p.grad.abs().sum() > 0 for p in distiller.regressor.parameters())
    # The regressor is rebuilt identically from the shapes, so a state dict reloads.
    FitNets(student, teacher, context=context).load_state_dict(distiller.state_dict())


def test_fitnets_hint_only_and_kd(pair):
    student, teacher, context = pair
    only = FitNets(student, teacher, context=context, hint_only=True)
    assert set(run_step(only, student, teacher)) == {"hint"}
    with_kd = FitNets(student, teacher, context=context, kd_weight=0.5, student_layers="last")
    assert set(run_step(with_kd, student, teacher)) == {"ce", "kd", "hint"}


@pytest.mark.parametrize(
    ("student_hw", "teacher_hw"),
    [((8, 8), (8, 8)), ((16, 16), (8, 8)), ((4, 4), (8, 8)), ((7, 7), (4, 4)), ((3, 3), (8, 8))],
)
def test_hint_regressor_reaches_the_teacher_shape(student_hw, teacher_hw):
    regressor = HintRegressor((2, 5, *student_hw), (2, 7, *teacher_hw))
    assert regressor(torch.randn(2, 5, *student_hw)).shape == (2, 7, *teacher_hw)


def test_at_and_nst_on_heterogeneous_pair(pair):
    student, teacher, context = pair
    for cls, name in ((AT, "at"), (NST, "nst")):
        distiller = cls(student, teacher, context=context)
        assert distiller.layers() == (stages("shufflenetv2"), stages("resnet32x4"))
        terms = run_step(distiller, student, teacher)
        assert set(terms) == {"ce", name}
        assert_trains(terms, student, distiller)
    paper = AT(student, teacher, context=context, formulation="paper", weight=1.0)
    assert_trains(run_step(paper, student, teacher), student, paper)


def test_fsp_on_heterogeneous_pair_needs_connectors(pair):
    student, teacher, context = pair
    with pytest.raises(ValueError, match=r"'layer1' gives \(116, 16, 16\).*connector=true"):
        FSP(student, teacher, context=context)
    distiller = FSP(student, teacher, context=context, connector=True)
    terms = run_step(distiller, student, teacher)
    assert set(terms) == {"ce", "fsp"}
    assert_trains(terms, student, distiller)
    assert len(list(distiller.parameters())) > 0
    only = FSP(student, teacher, context=context, connector=True, fsp_only=True)
    assert set(run_step(only, student, teacher)) == {"fsp"}


def test_stage_counts_that_differ_pair_the_last_stages():
    teacher = create_model("resnet8", 10).eval()
    student = create_model("mobilenetv2", 10)
    context = DistillContext(stages("mobilenetv2"), stages("resnet8"), torch.zeros(2, 3, 32, 32))
    distiller = AT(student, teacher, context=context)
    assert distiller.layers() == (["layer2", "layer3", "layer4"], ["layer1", "layer2", "layer3"])
    assert_trains(run_step(distiller, student, teacher), student, distiller)


def test_layer_choices_from_hydra_lists(pair):
    student, teacher, context = pair
    distiller = NST(
        student,
        teacher,
        context=context,
        student_layers=OmegaConf.create(["layer3"]),
        teacher_layers=OmegaConf.create([-1]),
    )
    assert distiller.layers() == (["layer3"], ["layer3"])


def test_bad_layer_names_and_impossible_pairings_fail_at_construction(pair):
    student, teacher, context = pair
    for cls in (FitNets, AT, FSP, NST):
        with pytest.raises(ValueError, match="unknown layer 'layer9'"):
            cls(student, teacher, context=context, student_layers="layer9")
    with pytest.raises(ValueError, match="stage index 5"):
        AT(student, teacher, context=context, teacher_layers=5)
    with pytest.raises(ValueError, match="one student hint layer"):
        FitNets(student, teacher, context=context, student_layers="all")
    with pytest.raises(ValueError, match=r"'fc' gives \(10,\).*'layer2' gives \(128, 16, 16\)"):
        FitNets(student, teacher, context=context, student_layers="fc")
    with pytest.raises(ValueError, match="at least two"):
        FSP(student, teacher, context=context, connector=True, student_layers="last")
    with pytest.raises(ValueError, match="formulation"):
        AT(student, teacher, context=context, formulation="other")


def test_layer_pairing_rules():
    from distill_zoo.distillers.layers import pair_layers

    context = DistillContext(student_stages=["a", "b", "c"], teacher_stages=["w", "x", "y", "z"])

    def pair(s, t):
        return pair_layers(context, s, t, "all", "AT")

    assert pair(None, None) == (["a", "b", "c"], ["x", "y", "z"])  # the last k of each
    assert pair("all", None) == (["a", "b", "c"], ["x", "y", "z"])
    assert pair(["b", "c"], None) == (["b", "c"], ["y", "z"])  # default side: its deepest
    assert pair(None, [0, 1]) == (["b", "c"], ["w", "x"])
    assert pair(1, "last") == (["b"], ["z"])
    with pytest.raises(ValueError, match=r"AT pairs .* 2 student layers .* 1 teacher"):
        pair(["a", "b"], ["w"])
    with pytest.raises(ValueError, match="lists of equal length"):
        pair("all", ["w", "x"])


@pytest.mark.parametrize(
    ("teacher_name", "student_name"),
    [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("wrn_40_2", "wrn_16_2")],
)
def test_fitnets_regressor_is_repdistillers_convreg_on_the_benchmark_pairs(
    teacher_name, student_name
):
    # Same-size hint and guided maps: the paper's kernel N_g - N_h + 1 = 1, with a bias, as
    # RepDistiller's ConvReg (resnet56 -> resnet20: 32 x 32 weights + 32 biases = 1,056).
    teacher, student = create_model(teacher_name, 100), create_model(student_name, 100)
    context = DistillContext(
        stages(student_name), stages(teacher_name), torch.randn(2, 3, 32, 32), 100
    )
    conv = FitNets(student, teacher, context=context).regressor.conv
    assert conv.kernel_size == (1, 1) and conv.bias is not None
    s_c, t_c = conv.in_channels, conv.out_channels
    assert sum(p.numel() for p in conv.parameters()) == t_c * s_c + t_c
    if teacher_name == "resnet56":
        assert sum(p.numel() for p in conv.parameters()) == 1056
