"""AB and FT, the two methods with a pre-training stage: loss golden values worked out by hand,
pre-activation taps, and the distillers on a heterogeneous zoo pair in both their modes."""

import logging
import math

import pytest
import torch
from helpers import distill_step as step
from helpers import has_grad

from distill_zoo.distillers.ab import AB
from distill_zoo.distillers.base import DistillContext
from distill_zoo.distillers.ft import FT
from distill_zoo.distillers.layers import preactivation
from distill_zoo.distillers.taps import FeatureTap
from distill_zoo.losses import ab_loss, factor, ft_loss
from distill_zoo.models import create_model


def row(values: list[float]) -> torch.Tensor:
    """A ``[1, 1, 1, W]`` feature map."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


# ---------------------------------------------------------------- AB loss by hand


def test_ab_loss_by_hand():
    # Teacher on at the first two neurons, off (t <= 0) at the last two; margin 1:
    # s=-0.5 on: (1 - -0.5)^2 = 2.25;  s=2 on: past the margin, 0;
    # s=0.5 off: (1 + 0.5)^2 = 2.25;   s=-2 off: past the margin, 0.   Sum 4.5.
    s, t = row([-0.5, 2.0, 0.5, -2.0]), row([1.0, 1.0, -1.0, 0.0])
    assert ab_loss(s, t, formulation="paper").item() == pytest.approx(4.5)
    assert ab_loss(s, t).item() == pytest.approx(4.5 * 3 / 1000)
    # A batch of two equal samples: summed over neurons, averaged over the batch.
    assert ab_loss(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1), formulation="paper").item() == (
        pytest.approx(4.5)
    )
    # Margin 2: s=-0.5 on: 2.5^2; s=2 on: 0; s=0.5 off: 2.5^2; s=-2 off: 0.
    assert ab_loss(s, t, margin=2.0, formulation="paper").item() == pytest.approx(12.5)


def test_ab_loss_weights_deeper_pairs_more_in_repdistiller_form():
    s1, t1 = row([-0.5, 2.0, 0.5, -2.0]), row([1.0, 1.0, -1.0, 0.0])  # 4.5
    s2, t2 = row([0.0]), row([0.0])  # off at s=0: (1 + 0)^2 = 1
    assert ab_loss([s1, s2], [t1, t2], formulation="paper").item() == pytest.approx(5.5)
    # RepDistiller: pair j of n weighs 2^(j - n + 1), all times 3/1000.
    expected = (0.5 * 4.5 + 1.0 * 1.0) * 3 / 1000
    assert ab_loss([s1, s2], [t1, t2]).item() == pytest.approx(expected)


def test_ab_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        ab_loss(row([1.0, 2.0]), row([1.0]))


# ---------------------------------------------------------------- FT loss by hand


def test_factor_and_ft_loss_by_hand():
    # Student factor: both channels [1, 0]; teacher factor: both channels [1, 1].
    s = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    t = torch.ones(1, 2, 1, 2)
    # repdistiller: channel mean of squares -> s [1, 0], t [1, 1]/sqrt2;
    # |diff| = [1 - 1/sqrt2, 1/sqrt2], mean 0.5.
    assert factor(s).tolist() == [[1.0, 0.0]]
    assert ft_loss(s, t).item() == pytest.approx(0.5)
    # paper: whole factors -> s [1, 0, 1, 0]/sqrt2, t [1, 1, 1, 1]/2;
    # |diff| summed = 2 (1/sqrt2 - 1/2) + 2 (1/2) = sqrt2.
    assert ft_loss(s, t, formulation="paper").item() == pytest.approx(math.sqrt(2))
    assert ft_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_ft_loss_pools_the_larger_factor():
    s = torch.ones(1, 2, 4, 4)
    assert ft_loss(s, torch.ones(1, 2, 2, 2), formulation="paper").item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ in channels"):
        ft_loss(torch.ones(1, 3, 2, 2), torch.ones(1, 2, 2, 2), formulation="paper")


# ---------------------------------------------------------------- pre-activation taps


@pytest.mark.parametrize(
    ("arch", "stage", "expected"),
    [
        ("resnet8", "layer3", "layer3.0.relu2:input"),  # block ends in its own ReLU
        ("vgg8", "block2", "block2.2:input"),  # conv, BN, ReLU
        ("wrn_16_2", "block3", "block3"),  # pre-activation WRN: the output is un-rectified
        ("mobilenetv2", "layer4", "layer4"),  # linear bottleneck
    ],
)
def test_preactivation_is_the_input_of_the_final_relu(arch, stage, expected):
    model = create_model(arch, 10).eval()
    images = torch.randn(2, 3, 32, 32)
    assert preactivation(model, stage, torch.zeros(2, 3, 32, 32)) == expected
    tap = FeatureTap(model, [stage, expected])
    model(images)
    features = tap.pop()
    assert torch.equal(features[expected].relu(), features[stage].relu())
    if expected != stage:
        assert (features[expected] < 0).any() and (features[stage] >= 0).all()


# ---------------------------------------------------------------- distillers on a zoo pair


@pytest.fixture(scope="module")
def pair():
    """A heterogeneous pair: wrn_16_2 teacher (pre-activation blocks) -> resnet8 student."""
    torch.manual_seed(0)
    teacher = create_model("wrn_16_2", 10).eval()
    student = create_model("resnet8", 10)
    context = DistillContext(
        student_stages=["layer1", "layer2", "layer3"],
        teacher_stages=["block1", "block2", "block3"],
        example_input=torch.zeros(2, 3, 32, 32),
        num_classes=10,
    )
    return student, teacher, context


def test_ab_reads_preactivations_through_connectors(pair):
    student, teacher, context = pair
    distiller = AB(student, teacher, context=context)
    assert distiller.layers() == (
        ["layer1.0.relu2:input", "layer2.0.relu2:input", "layer3.0.relu2:input"],
        ["block1", "block2", "block3"],
    )
    terms = step(distiller, student, teacher)
    assert set(terms) == {"ce", "ab"} and all(torch.isfinite(v) for v in terms.values())
    assert has_grad(student) and all(has_grad(c) for c in distiller.connectors)
    only = AB(student, teacher, context=context, ab_only=True, student_layers=[1, 2])
    assert len(only.connectors) == 2
    terms = step(only, student, teacher)
    assert set(terms) == {"ab"}
    assert student.fc.weight.grad is None  # the initialisation stage never touches the head


def test_ft_paraphraser_mode_trains_only_the_paraphraser(pair):
    student, teacher, context = pair
    distiller = FT(student, teacher, context=context, mode="paraphraser")
    assert distiller.layers() == (["layer3"], ["block3"])
    distiller.train()
    terms = step(distiller, student, teacher)
    assert set(terms) == {"rec"}
    assert has_grad(distiller.paraphraser) and not has_grad(distiller.translator)
    assert not has_grad(student)
    assert distiller.paraphraser_steps.item() == 1
    # 128 teacher channels at rate 0.5: 64 factors, which the translator also produces.
    assert distiller.paraphraser.encoder[-2].out_channels == 64
    assert distiller.translator[-2].out_channels == 64


def test_ft_transfer_freezes_the_paraphraser_and_warns_when_untrained(pair, caplog):
    student, teacher, context = pair
    distiller = FT(student, teacher, context=context)
    assert not any(p.requires_grad for p in distiller.paraphraser.parameters())
    with caplog.at_level(logging.WARNING):
        terms = step(distiller, student, teacher)
    assert "never trained" in caplog.text and "pipeline=ft_2stage" in caplog.text
    assert set(terms) == {"ce", "ft"}
    assert has_grad(student) and has_grad(distiller.translator)
    trained = FT(student, teacher, context=context)
    trained.paraphraser_steps.fill_(10)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        step(trained, student, teacher)
    assert "never trained" not in caplog.text


def test_bad_options_fail_at_construction(pair):
    student, teacher, context = pair
    with pytest.raises(ValueError, match="mode must be one of"):
        FT(student, teacher, context=context, mode="both")
    with pytest.raises(ValueError, match="one student layer"):
        FT(student, teacher, context=context, student_layers="all")
    with pytest.raises(ValueError, match="margin must be > 0"):
        AB(student, teacher, context=context, margin=0)
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
        AB(student, teacher, context=context, student_layers=["layer9"], teacher_layers=[0])
