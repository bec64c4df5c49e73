"""OFD and CTKD: the margin against the Gaussian expectation by numeric integration, the
partial L2, the gradient-reversal layer, the lambda curriculum and the learnable-temperature
KD term by hand, and both distillers for one step on zoo pairs."""

import math

import pytest
import torch
from helpers import distill_step as step
from helpers import has_grad

from distill_zoo.distillers.base import DistillContext, StepOutputs
from distill_zoo.distillers.ctkd import CTKD, reverse_gradient
from distill_zoo.distillers.layers import leaf_calls
from distill_zoo.distillers.ofd import OFD, preactivation_and_bn
from distill_zoo.losses import ctkd_lambda, ctkd_loss, kd_loss, ofd_loss, ofd_margin
from distill_zoo.models import create_model


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- OFD margin


def negative_mean_by_integration(mu: float, s: float) -> float:
    """E[x | x < 0] for x ~ N(mu, s^2): trapezoid integrals of x f(x) and f(x) over
    [mu - 12 s, 0], independent of the closed form."""
    x = torch.linspace(min(mu, 0.0) - 12 * s, 0.0, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - mu) / s) ** 2)  # the normalisation cancels
    return (torch.trapezoid(x * density, x) / torch.trapezoid(density, x)).item()


@pytest.mark.parametrize(("mu", "s"), [(0.0, 1.0), (1.0, 2.0), (-0.7, 0.3), (3.0, 1.0)])
def test_ofd_margin_is_the_mean_of_the_negative_part(mu, s):
    margin = ofd_margin(t([s]), t([mu])).item()
    assert margin == pytest.approx(negative_mean_by_integration(mu, s), abs=1e-5)


def test_ofd_margin_by_hand_and_its_fallbacks():
    # mu = 0, s = 1: the half-normal mean -sqrt(2/pi) = -0.7978845608.
    # mu = 1, s = 2 (weight -2: the scale is |weight|): z = 0.5, phi(0.5) = 0.3520653268,
    #   Phi(-0.5) = 0.3085375387; 1 - 2 * 0.3520653268 / 0.3085375387 = 1 - 2 * 1.1410778
    #   = -1.2821555.
    # mu = 3, s = 1: Phi(-3) = 0.0013499 > 0.001, 3 - 0.0044318484 / 0.0013498980 = -0.2830987.
    # mu = 4, s = 1: Phi(-4) = 3.2e-5 <= 0.001 -> the fallback -3 s = -3.
    # s = 0: mu = -0.5 -> -0.5 (every response is mu); mu = 0.5 -> -3 * 0 = 0.
    weight = t([1.0, -2.0, 1.0, 1.0, 0.0, 0.0])
    bias = t([0.0, 1.0, 3.0, 4.0, -0.5, 0.5])
    expected = [-0.7978845608, -1.2821555, -0.2830987, -3.0, -0.5, 0.0]
    assert ofd_margin(weight, bias).tolist() == pytest.approx(expected, abs=1e-6)
    # A BatchNorm without affine parameters outputs N(0, 1).
    assert ofd_margin(t([1.0]), None).item() == pytest.approx(-0.7978845608)
    with pytest.raises(ValueError, match="weight and bias"):
        ofd_margin(t([1.0, 1.0]), t([0.0]))


# ---------------------------------------------------------------- OFD partial L2


def test_ofd_loss_by_hand():
    # Margins -1 (channel 0) and -0.5 (channel 1); t' = max(t, m); counted where s > t' or t' > 0.
    # ch 0: t=-2 -> t'=-1, s=-1.5 below it: skipped; t=0.5 -> (0 - 0.5)^2 = 0.25;
    #       t=-5 -> t'=-1, s=0 above it: (0 + 1)^2 = 1.                        -> 1.25
    # ch 1: t=-0.2 -> t'=-0.2, s=0.3 above: 0.5^2 = 0.25; t=-3 -> t'=-0.5, s=-1 below: skipped;
    #       t=2 -> (3 - 2)^2 = 1.                                               -> 1.25
    s = t([[[[-1.5, 0.0, 0.0]], [[0.3, -1.0, 3.0]]]])
    teacher = t([[[[-2.0, 0.5, -5.0]], [[-0.2, -3.0, 2.0]]]])
    margin = t([-1.0, -0.5])
    assert ofd_loss(s, teacher, margin).item() == pytest.approx(2.5)
    # Summed over positions, averaged over the batch.
    assert ofd_loss(s.repeat(2, 1, 1, 1), teacher.repeat(2, 1, 1, 1), margin).item() == (
        pytest.approx(2.5)
    )
    # Two pairs: each earlier pair at half the weight of the next (official code).
    # Pair 1: s=0, t=1 > 0 -> (0 - 1)^2 = 1.   2.5 / 2 + 1 = 2.25.
    pair = (t([[[[0.0]]]]), t([[[[1.0]]]]), t([-1.0]))
    total = ofd_loss([s, pair[0]], [teacher, pair[1]], [margin, pair[2]])
    assert total.item() == pytest.approx(2.25)


def test_ofd_loss_gradient_only_where_counted():
    s = t([[[[-1.5, 0.0, 0.0]]]]).requires_grad_()
    ofd_loss(s, t([[[[-2.0, 0.5, -5.0]]]]), t([-1.0])).backward()
    # d/ds (s - t')^2 = 2 (s - t'): skipped, 2 (0 - 0.5), 2 (0 + 1).
    assert s.grad.flatten().tolist() == pytest.approx([0.0, -1.0, 2.0])


def test_ofd_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        ofd_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2), t([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="one per teacher channel"):
        ofd_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), t([0.0]))


# ---------------------------------------------------------------- OFD positions


@pytest.mark.parametrize(
    ("arch", "layer", "expected"),
    [
        ("resnet8", "layer3", ("layer3.0.relu2:input", "layer3.0.bn2")),
        ("resnet8", "layer3.0.relu2:input", ("layer3.0.relu2:input", "layer3.0.bn2")),
        ("resnet8", "layer2.0.bn2", ("layer2.0.bn2", "layer2.0.bn2")),
        ("vgg8", "block2", ("block2.2:input", "block2.1")),
        # Pre-activation WRN: the next group's bn1 (the final bn after the last group), as
        # the official code's get_bn_before_relu.
        ("wrn_16_2", "block1", ("block2.0.bn1", "block2.0.bn1")),
        ("wrn_16_2", "block3", ("bn", "bn")),
        ("mobilenetv2", "layer4", ("layer4", "layer4.3.bn3")),  # linear bottleneck
        ("shufflenetv2", "layer3", ("layer3", None)),  # ends in a channel shuffle
    ],
)
def test_preactivation_and_bn(arch, layer, expected):
    model = create_model(arch, 10)
    calls = leaf_calls(model, torch.zeros(2, 3, 32, 32))
    assert preactivation_and_bn(model, layer, calls) == expected


# ---------------------------------------------------------------- GRL and the curriculum


def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward():
    x = t([2.0, -1.0]).requires_grad_()
    y = reverse_gradient(x, 0.5)
    assert torch.equal(y, x)
    (y * t([3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == pytest.approx([-1.5, -2.0])  # -0.5 * [3, 4]


def test_ctkd_lambda_cosine_schedule_by_hand():
    # (1 + cos((1 + n/N) pi)) / 2 with N = 10:
    # n=0: (1 + cos pi)/2 = 0; n=1: (1 - cos(0.1 pi))/2 = (1 - 0.9510565)/2 = 0.0244717;
    # n=5: (1 + cos 1.5pi)/2 = 0.5; n=10 and after: (1 + cos 2pi)/2 = 1.
    assert ctkd_lambda(0, 10) == pytest.approx(0.0, abs=1e-12)
    assert ctkd_lambda(1, 10) == pytest.approx(0.0244717, abs=1e-7)
    assert ctkd_lambda(5, 10) == pytest.approx(0.5)
    assert ctkd_lambda(10, 10) == pytest.approx(1.0)
    assert ctkd_lambda(30, 10) == pytest.approx(1.0)
    # Between lambda_min = 0.2 and lambda_max = 0.8 the midpoint is 0.5.
    assert ctkd_lambda(5, 10, lambda_max=0.8, lambda_min=0.2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup_epochs"):
        ctkd_lambda(1, 0)


def test_ctkd_loss_by_hand():
    # T = 2, teacher [2 ln 3, 0] -> softmax([ln 3, 0]) = [3/4, 1/4]; student [0, 0] -> [1/2, 1/2].
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.3040988 - 0.1732868 = 0.1308120; x T^2 = 0.5232481.
    s, teacher = t([[0.0, 0.0]]), t([[2 * math.log(3), 0.0]])
    assert ctkd_loss(s, teacher, t([2.0])).item() == pytest.approx(0.5232481, abs=1e-6)
    assert ctkd_loss(s, teacher, t(2.0)).item() == pytest.approx(kd_loss(s, teacher, 2.0).item())
    # One temperature per sample: the second sample [ln 3, 0] at T = 1 has the same
    # probabilities, KL 0.1308120 x 1. Mean (0.5232481 + 0.1308120) / 2 = 0.3270300.
    s2, t2 = s.repeat(2, 1), t([[2 * math.log(3), 0.0], [math.log(3), 0.0]])
    assert ctkd_loss(s2, t2, t([2.0, 1.0])).item() == pytest.approx(0.3270300, abs=1e-6)
    with pytest.raises(ValueError, match="one temperature or one per sample"):
        ctkd_loss(s2, t2, t([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------- distillers on zoo pairs


def context_for(student_stages, teacher_stages) -> DistillContext:
    return DistillContext(
        student_stages=student_stages,
        teacher_stages=teacher_stages,
        example_input=torch.zeros(2, 3, 32, 32),
        num_classes=10,
    )


@pytest.fixture(scope="module")
def wrn_to_resnet():
    """wrn_16_2 teacher (pre-activation groups) -> resnet8 student."""
    torch.manual_seed(0)
    teacher = create_model("wrn_16_2", 10).eval().requires_grad_(False)
    with torch.no_grad():  # trained-looking BN parameters, so the margins differ
        for module in teacher.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1.0, 1.0)
    student = create_model("resnet8", 10)
    context = context_for(["layer1", "layer2", "layer3"], ["block1", "block2", "block3"])
    return student, teacher, context


def test_ofd_one_step_on_a_zoo_pair(wrn_to_resnet):
    student, teacher, context = wrn_to_resnet
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = OFD(student, teacher, context=context)
    assert distiller.layers() == (
        ["layer1.0.relu2:input", "layer2.0.relu2:input", "layer3.0.relu2:input"],
        ["block2.0.bn1", "block3.0.bn1", "bn"],
    )
    for margin, bn in zip(
        distiller.margins(), ["block2.0.bn1", "block3.0.bn1", "bn"], strict=True
    ):
        module = teacher.get_submodule(bn)
        assert torch.equal(margin, ofd_margin(module.weight, module.bias))
        assert (margin < 0).all()
    assert {"margin0", "margin1", "margin2"} <= set(distiller.state_dict())
    terms = step(distiller, student, teacher)
    assert set(terms) == {"ce", "ofd"} and all(torch.isfinite(v) for v in terms.values())
    assert terms["ofd"].item() > 0
    assert has_grad(student) and all(has_grad(c) for c in distiller.connectors)
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ofd_connector_resizes_to_the_teacher_grid(wrn_to_resnet):
    student, teacher, context = wrn_to_resnet
    # Student layer1 (16 x 32 x 32) against the teacher's block2 position
    # (block3.0.bn1: 64 x 16 x 16).
    distiller = OFD(student, teacher, context=context, student_layers=[0], teacher_layers=[1])
    assert distiller.layers() == (["layer1.0.relu2:input"], ["block3.0.bn1"])
    assert distiller.connectors[0].out_size == (16, 16)
    assert distiller.connectors[0].conv.out_channels == 64
    terms = step(distiller, student, teacher)
    assert torch.isfinite(terms["ofd"]) and has_grad(distiller.connectors[0])


def test_ofd_needs_a_batchnorm_before_the_teacher_relu():
    student = create_model("resnet8", 10)
    teacher = create_model("shufflenetv2", 10).eval()
    context = context_for(["layer1", "layer2", "layer3"], ["layer1", "layer2", "layer3"])
    with pytest.raises(ValueError, match="BatchNorm2d feeding the teacher's pre-activation"):
        OFD(student, teacher, context=context)
    with pytest.raises(ValueError, match="example_input"):
        OFD(student, teacher, context=DistillContext())


def test_ctkd_temperature_moves_to_increase_the_kd_loss():
    torch.manual_seed(0)
    student_logits = torch.randn(8, 5)
    teacher_logits = 3 * torch.randn(8, 5)
    distiller = CTKD(None, torch.nn.Identity(), ce_weight=0.0)
    out = StepOutputs(
        images=torch.zeros(8, 1),
        targets=torch.zeros(8, dtype=torch.long),
        indices=torch.arange(8),
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        epoch=20,  # past the warm-up: lambda = 1
    )
    assert distiller.reversal_strength(20) == pytest.approx(1.0)
    # The KD loss as a function of the raw parameter, without the reversal.
    theta = distiller.raw_temperature.detach().clone().requires_grad_()
    plain = 0.9 * ctkd_loss(student_logits, teacher_logits, 1 + 20 * torch.sigmoid(theta))
    (d_plain,) = torch.autograd.grad(plain, theta)
    assert d_plain.abs().item() > 0
    # Through the reversal the gradient is -lambda times that, so a descent step ascends.
    loss_before = distiller(out)["kd"]
    loss_before.backward()
    assert distiller.raw_temperature.grad.item() == pytest.approx(-d_plain.item(), rel=1e-5)
    torch.optim.SGD(distiller.parameters(), lr=0.5).step()
    with torch.no_grad():
        loss_after = distiller(out)["kd"]
    assert loss_after.item() > loss_before.item()
    # lambda = 0: the temperature gets no gradient at all.
    distiller.zero_grad()
    ctkd_loss(student_logits, teacher_logits, distiller.temperature(0.0)).backward()
    assert distiller.raw_temperature.grad.item() == 0.0


def test_ctkd_one_step_on_a_zoo_pair():
    torch.manual_seed(0)
    teacher = create_model("resnet14", 10).eval().requires_grad_(False)
    student = create_model("resnet8", 10)
    distiller = CTKD(student, teacher, context=context_for([], []))
    assert distiller.layers() == ([], [])
    assert distiller.temperature().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    assert distiller.reversal_strength(0) == pytest.approx(0.0244717, abs=1e-7)  # n = 1
    terms = step(distiller, student, teacher, epoch=3)
    assert set(terms) == {"ce", "kd"} and all(torch.isfinite(v) for v in terms.values())
    assert has_grad(student) and has_grad(distiller)
    assert all(p.grad is None for p in teacher.parameters())
    assert "raw_temperature" in distiller.state_dict()


def test_ctkd_bad_options():
    with pytest.raises(ValueError, match="t_start > 0"):
        CTKD(None, torch.nn.Identity(), t_start=0.0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        CTKD(None, torch.nn.Identity(), warmup_epochs=0)
    with pytest.raises(ValueError, match="lambda_min"):
        CTKD(None, torch.nn.Identity(), lambda_min=1.0, lambda_max=0.5)


def test_ctkd_logs_its_learned_temperature(tiny_config, tmp_path):
    import csv

    from distill_zoo import train

    train.run(tiny_config("distiller=ctkd"), tmp_path)
    rows = list(csv.DictReader((tmp_path / "logs" / "csv" / "metrics.csv").open()))
    temperatures = [
        float(r["train/ctkd_temperature"]) for r in rows if r["train/ctkd_temperature"]
    ]
    assert len(temperatures) == 2 and all(1 < t < 21 for t in temperatures)
