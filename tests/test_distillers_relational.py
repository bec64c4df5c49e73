"""SP, CC, RKD, PKT and VID: golden values of the losses, worked out by hand or by explicit
loops over the papers' formulas, and the distillers on heterogeneous zoo pairs."""

import itertools
import math

import pytest
import torch
from helpers import distill_step as step
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from distill_zoo.config import CONF_DIR, compose
from distill_zoo.distillers.base import DistillContext, StepOutputs
from distill_zoo.distillers.cc import CC
from distill_zoo.distillers.layers import penultimate_layer
from distill_zoo.distillers.pkt import PKT
from distill_zoo.distillers.rkd import RKD
from distill_zoo.distillers.sp import SP
from distill_zoo.distillers.taps import FeatureTap
from distill_zoo.distillers.vid import VID, VIDRegressor
from distill_zoo.losses import (
    cc_loss,
    kd_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
    vid_loss,
)
from distill_zoo.models import create_model

# ---------------------------------------------------------------- golden values: SP


def test_sp_loss_by_hand():
    # Student A = I: G = I, rows already unit. Teacher A = all ones: G = 2 * ones, rows
    # normalised to 1/sqrt2. ||G_s - G_t||^2 = 2 * ((1 - 1/sqrt2)^2 + 1/2) = 4 - 2 sqrt2,
    # divided by b^2 = 4: 1 - sqrt2 / 2.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert sp_loss(student, teacher).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def sp_reference(a_s: list[list[float]], a_t: list[list[float]]) -> float:
    """Tung & Mori's G = normalize_rows(A A^T), ||G_s - G_t||_F^2 / b^2, with plain loops."""

    def gram(a):
        g = [[sum(x * y for x, y in zip(ai, aj, strict=True)) for aj in a] for ai in a]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    g_s, g_t = gram(a_s), gram(a_t)
    b = len(a_s)
    return sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_loss_matches_loops_on_maps_of_different_shapes():
    torch.manual_seed(0)
    student = torch.randn(3, 2, 2, 2)  # b=3, 8 values per sample
    teacher = torch.randn(3, 5, 1, 1)  # b=3, 5 values per sample
    expected = sp_reference(student.reshape(3, -1).tolist(), teacher.reshape(3, -1).tolist())
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- golden values: CC


def test_cc_loss_repdistiller_by_hand():
    # d = |s - t| = [[1, 2], [2, 3], [1, 1]]; consecutive products 1*2 + 2*3 = 8 and
    # 2*1 + 3*1 = 5; their mean 6.5.
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert cc_loss(student, teacher, mode="repdistiller").item() == pytest.approx(6.5)


def test_cc_loss_gaussian_and_bilinear_by_hand():
    # Student rows e1, e2 (dots: I); teacher rows e1, e1 (dots: all ones). With P = 2 every
    # teacher entry and the student diagonal are exp(-2g)(1 + 2g + 2g^2); the student's
    # off-diagonal is exp(-2g) (the p = 0 term). Two off-diagonal differences, / b^2 = 4.
    student = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # norms do not matter: rows normalised
    teacher = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    g = 0.4
    off = math.exp(-2 * g) * (2 * g + 2 * g**2)
    expected = 2 * off**2 / 4
    assert expected == pytest.approx(0.126630, abs=1e-6)
    got = cc_loss(student, teacher, mode="gaussian", gamma=g, order=2).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # Bilinear: C_s = I, C_t = ones; two off-diagonal differences of 1, / 4.
    assert cc_loss(student, teacher, mode="bilinear").item() == pytest.approx(0.5)


def test_cc_gaussian_taylor_series_tends_to_the_rbf_kernel():
    # exp(-g ||x - y||^2) of unit vectors, computed directly, against a high-order series.
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 3), torch.randn(4, 6)

    def rbf(x):
        x = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in x.tolist()]
        return [
            [math.exp(-0.4 * sum((a - b) ** 2 for a, b in zip(xi, xj, strict=True))) for xj in x]
            for xi in x
        ]

    c_s, c_t = rbf(student), rbf(teacher)
    expected = sum((c_s[i][j] - c_t[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    got = cc_loss(student, teacher, mode="gaussian", gamma=0.4, order=20).item()
    assert got == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- golden values: RKD


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_reference(s: list[list[float]], t: list[list[float]], w_d: float, w_a: float) -> float:
    """Park et al.'s potentials with loops: distances over the mean of distinct pairs, angles at
    the middle vertex (cos of angle t_i t_j t_k), Huber averaged over all pairs/triplets."""
    b = len(s)

    def dist(x, i, j):
        return math.sqrt(sum((a - c) ** 2 for a, c in zip(x[i], x[j], strict=True)))

    def unit(x, i, j):  # e_ij = (x_i - x_j) / ||x_i - x_j||, 0 if degenerate
        n = dist(x, i, j)
        return [(a - c) / n if n > 0 else 0.0 for a, c in zip(x[i], x[j], strict=True)]

    def potentials(x):
        mu = sum(dist(x, i, j) for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        d = {(i, j): dist(x, i, j) / mu for i in range(b) for j in range(b)}
        a = {
            (i, j, k): sum(p * q for p, q in zip(unit(x, i, j), unit(x, k, j), strict=True))
            for i, j, k in itertools.product(range(b), repeat=3)
        }
        return d, a

    (d_s, a_s), (d_t, a_t) = potentials(s), potentials(t)
    loss_d = sum(huber(d_s[key] - d_t[key]) for key in d_s) / b**2
    loss_a = sum(huber(a_s[key] - a_t[key]) for key in a_s) / b**3
    return w_d * loss_d + w_a * loss_a


def test_rkd_distance_by_hand():
    # Student points 0, 1, 2 on a line: distances 1, 2, 1, mean 4/3 -> 3/4, 3/2, 3/4.
    # Teacher 0, 1, 3: distances 1, 3, 2, mean 2 -> 1/2, 3/2, 1. Differences 1/4, 0, 1/4, each
    # pair counted twice: 4 * (1/2)(1/16) = 1/8, averaged over b^2 = 9 pairs: 1/72. The same
    # ordering on a line gives the same angles (cos = +-1), so the angle term is 0.
    student = torch.tensor([[0.0], [1.0], [2.0]])
    teacher = torch.tensor([[0.0], [1.0], [3.0]])
    got = rkd_loss(student, teacher, distance_weight=1.0, angle_weight=1.0).item()
    assert got == pytest.approx(1 / 72, rel=1e-5)


def test_rkd_loss_matches_loops():
    # A right isosceles triangle (student) against collinear points (teacher), plus random.
    student = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    teacher = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]
    got = rkd_loss(torch.tensor(student), torch.tensor(teacher), 25.0, 50.0).item()
    assert got == pytest.approx(rkd_reference(student, teacher, 25.0, 50.0), rel=1e-5)
    torch.manual_seed(2)
    s, t = torch.randn(5, 4), torch.randn(5, 7) * 10
    expected = rkd_reference(s.tolist(), t.tolist(), 25.0, 50.0)
    assert rkd_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_is_scale_invariant_and_zero_for_one_sample():
    torch.manual_seed(3)
    x = torch.randn(6, 5)
    assert rkd_loss(x, 7.0 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_loss(x[:1], x[:1] + 1).item() == 0.0


# ---------------------------------------------------------------- golden values: PKT


def test_pkt_loss_by_hand():
    # Student rows e1, e2: cos = I, (cos + 1)/2 = [[1, .5], [.5, 1]] -> rows [2/3, 1/3] and
    # [1/3, 2/3]. Teacher rows e1, e1: all ones -> rows [1/2, 1/2]. Each row's KL(t || s) is
    # 1/2 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8); two rows.
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    total = math.log(9 / 8)
    assert pkt_loss(student, teacher, "sum").item() == pytest.approx(total, rel=1e-5)
    assert pkt_loss(student, teacher, "batchmean").item() == pytest.approx(total / 2, rel=1e-5)
    assert pkt_loss(student, teacher).item() == pytest.approx(total / 4, rel=1e-5)


# ---------------------------------------------------------------- golden values: VID


def test_vid_loss_by_hand():
    # mu = 0, t = (1, 2) in two channels with variances (1, 2):
    # channel 0: 1/2 (ln 1 + 1/1) = 1/2; channel 1: 1/2 (ln 2 + 4/2) = 1 + ln(2)/2.
    mean = torch.zeros(1, 2, 1, 1)
    target = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    expected = (0.5 + 1 + 0.5 * math.log(2)) / 2
    got = vid_loss(mean, target, torch.tensor([1.0, 2.0])).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_vid_regressor_starts_at_the_initial_variance():
    regressor = VIDRegressor(3, 4, 5, init_variance=5.0, eps=1e-5)
    assert torch.allclose(regressor.variance(), torch.full((5,), 5.0), atol=1e-5)
    assert regressor(torch.zeros(2, 3, 4, 4)).shape == (2, 5, 4, 4)


def test_losses_run_in_fp32_under_bf16_autocast():
    torch.manual_seed(4)
    s, t = torch.randn(8, 16).bfloat16(), torch.randn(8, 32).bfloat16()
    for loss in (sp_loss, rkd_loss, pkt_loss, lambda a, b: cc_loss(a, b, "gaussian")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = loss(s, t)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(loss(s.float(), t.float()).item(), rel=1e-6)


# ---------------------------------------------------------------- distillers on zoo pairs

ZOO_STAGES = {
    "resnet8": ["layer1", "layer2", "layer3"],
    "resnet32x4": ["layer1", "layer2", "layer3"],
    "shufflenetv2": ["layer1", "layer2", "layer3"],
    "vgg13": ["block1", "block2", "block3", "block4"],
    "mobilenetv2": ["layer1", "layer2", "layer3", "layer4"],
}


@pytest.fixture(scope="module")
def pair():
    """resnet32x4 teacher -> shufflenetv2 student, as in the CRD benchmark."""
    torch.manual_seed(0)
    return make_pair("resnet32x4", "shufflenetv2", size=16)


def make_pair(teacher_name: str, student_name: str, size: int = 32):
    teacher, student = create_model(teacher_name, 10), create_model(student_name, 10)
    context = DistillContext(
        student_stages=ZOO_STAGES[student_name],
        teacher_stages=ZOO_STAGES[teacher_name],
        example_input=torch.zeros(2, 3, size, size),
        num_classes=10,
    )
    return student, teacher, context


def grads_flow(module: nn.Module) -> bool:
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(
        p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        for p in params
    )


@pytest.mark.parametrize(
    ("cls", "term", "kwargs"),
    [
        (SP, "sp", {}),
        (CC, "cc", {}),
        (CC, "cc", {"mode": "gaussian"}),
        (RKD, "rkd", {}),
        (PKT, "pkt", {}),
        (VID, "vid", {}),
    ],
)
def test_distiller_trains_on_heterogeneous_pair(pair, cls, term, kwargs):
    student, teacher, context = pair
    student.zero_grad(set_to_none=True)
    distiller = cls(student, teacher, context=context, **kwargs)
    terms = step(distiller, student, teacher, size=16)
    assert set(terms) == {"ce", term}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms[term].item() != 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not any(p.grad is not None for p in teacher.parameters())
    if cls in (CC, VID):
        assert grads_flow(distiller), "connector parameters get no gradient"
    else:
        assert not list(distiller.parameters())


def test_default_layers_on_heterogeneous_pair(pair):
    student, teacher, context = pair
    assert SP(student, teacher, context=context).layers() == (["layer3"], ["layer3"])
    for cls in (CC, RKD, PKT):  # ShuffleNetV2's head reads avgpool, after its last 1x1 conv
        assert cls(student, teacher, context=context).layers() == (["avgpool"], ["avgpool"])
    assert VID(student, teacher, context=context).layers() == (
        ["layer1", "layer2", "layer3"],
        ["layer1", "layer2", "layer3"],
    )


def test_vid_pools_the_larger_map_and_pairs_stages_from_the_last():
    # vgg13 (4 stages) -> resnet8 (3 stages): the last three of each; maps of different sizes.
    torch.manual_seed(0)
    student, teacher, context = make_pair("vgg13", "resnet8", size=16)
    distiller = VID(student, teacher, context=context)
    assert distiller.layers() == (["layer1", "layer2", "layer3"], ["block2", "block3", "block4"])
    terms = step(distiller, student, teacher, size=16)
    assert torch.isfinite(terms["vid"])
    assert grads_flow(distiller)


def test_stage_choice_is_pooled_like_the_head():
    # ResNet's head pools layer3, so "last" (pooled) and the default (avgpool) agree.
    student, teacher, context = make_pair("resnet32x4", "resnet8", size=16)
    tap_s = FeatureTap(student, ["layer3", "avgpool"])
    tap_t = FeatureTap(teacher, ["layer3", "avgpool"])
    student.eval()
    teacher.eval()
    torch.manual_seed(5)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        logits_s, logits_t = student(images), teacher(images)
    out = StepOutputs(
        images, torch.zeros(4, dtype=torch.long), torch.arange(4), logits_s, logits_t,
        tap_s.pop(), tap_t.pop(),
    )  # fmt: skip
    default = RKD(student, teacher, context=context)
    last = RKD(student, teacher, context=context, student_layers="last", teacher_layers="last")
    assert last.layers() == (["layer3"], ["layer3"])
    assert default(out)["rkd"].item() == pytest.approx(last(out)["rkd"].item(), rel=1e-5)


def test_kd_term_composes(pair):
    student, teacher, context = pair
    distiller = PKT(student, teacher, context=context, kd_weight=0.5, kd_temperature=2.0)
    torch.manual_seed(6)
    s_logits, t_logits = torch.randn(4, 10), torch.randn(4, 10)
    feats = torch.randn(4, 8)
    out = StepOutputs(
        torch.zeros(4, 3, 16, 16), torch.arange(4), torch.arange(4), s_logits, t_logits,
        {"avgpool": feats}, {"avgpool": feats},
    )  # fmt: skip
    terms = distiller(out)
    assert set(terms) == {"ce", "kd", "pkt"}
    assert terms["kd"].item() == pytest.approx(0.5 * kd_loss(s_logits, t_logits, 2.0).item())
    assert terms["pkt"].item() == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet8", "avgpool"),
        ("vgg8", "pool4"),
        ("mobilenetv2", "avgpool"),
        ("wrn_16_1", "avgpool"),
    ],
)
def test_penultimate_layer_is_the_classifier_input(name, expected):
    assert penultimate_layer(create_model(name, 10), torch.zeros(2, 3, 16, 16)) == expected


# ---------------------------------------------------------------- errors at construction


class Tokens(nn.Module):
    """A toy model whose 'tokens' layer gives [B, N, D] and which has no linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.tokens = nn.Flatten(2)

    def forward(self, x):
        return self.tokens(self.conv(x)).mean(dim=2)


def test_bad_layer_name_and_unpairable_choices_fail_clearly(pair):
    student, teacher, context = pair
    with pytest.raises(ValueError, match="unknown layer 'nope' in the student"):
        SP(student, teacher, context=context, student_layers="nope")
    with pytest.raises(ValueError, match=r"1 student layers \['layer3'\] and 3 teacher"):
        SP(student, teacher, context=context, student_layers="last", teacher_layers="all")
    with pytest.raises(ValueError, match="stage index 5 is outside"):
        RKD(student, teacher, context=context, student_layers=5, teacher_layers=5)
    with pytest.raises(ValueError, match="example_input"):
        PKT(student, teacher, context=DistillContext())


def test_impossible_shapes_fail_at_construction(pair):
    student, teacher, context = pair
    # ShuffleNetV2 gives 1024 features, ResNet32x4 256: unbridgeable without embeddings.
    with pytest.raises(ValueError, match=r"'avgpool' gives \(1024, 1, 1\).*'avgpool' gives"):
        CC(student, teacher, context=context, embed_dim=None)
    toy = Tokens()
    toy_context = DistillContext(example_input=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="VID regresses feature maps.*'tokens'"):
        VID(toy, toy, context=toy_context, student_layers="tokens", teacher_layers="tokens")
    with pytest.raises(ValueError, match="calls no nn.Linear"):
        RKD(toy, toy, context=toy_context)
    with pytest.raises(ValueError, match="unknown CC mode"):
        CC(student, teacher, context=context, mode="rbf")
    with pytest.raises(ValueError, match="unknown PKT reduction"):
        PKT(student, teacher, context=context, reduction="avg")


# ---------------------------------------------------------------- configs


def test_configs_instantiate_with_list_overrides():
    # Hydra hands list overrides over as ListConfig, e.g. distiller.student_layers=[1,2].
    student, teacher = create_model("resnet8", 4), create_model("resnet14", 4)
    context = DistillContext(
        student_stages=ZOO_STAGES["resnet8"],
        teacher_stages=ZOO_STAGES["resnet8"],
        example_input=torch.zeros(2, 3, 16, 16),
    )
    for name in ("sp", "cc", "rkd", "pkt", "vid"):
        cfg = OmegaConf.load(CONF_DIR / "distiller" / f"{name}.yaml")
        cfg.student_layers = [1, 2]
        cfg.teacher_layers = ["layer2", "layer3"]
        distiller = instantiate(cfg, student=student, teacher=teacher, context=context)
        assert distiller.layers() == (["layer2", "layer3"], ["layer2", "layer3"]), name


def test_config_composes():
    cfg = compose(["distiller=cc", "distiller.mode=gaussian", "distiller.embed_dim=null"])
    assert cfg.distiller.mode == "gaussian" and cfg.distiller.embed_dim is None
