"""Quantized students: fake quantization keeps the student's names and forward, distils under
DistillationModule, rounds to the promised grids, and converts to a smaller int8 CPU model."""

import json
import math

import pytest
import torch
from helpers import quiet_trainer
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from distill_zoo import train
from distill_zoo.config import compose
from distill_zoo.data import SyntheticDataModule
from distill_zoo.distillers import KD, CrossEntropyOnly
from distill_zoo.distillers.base import DistillContext
from distill_zoo.distillers.fitnets import FitNets
from distill_zoo.distillers.taps import FeatureTap
from distill_zoo.models import create_model
from distill_zoo.module import DistillationModule
from distill_zoo.shipping import quantize
from distill_zoo.shipping.quantize import QuantConv2d, QuantLinear, QuantSpec, prepare_qat

STAGES = ["layer1", "layer2", "layer3"]


def resnet(name: str = "resnet8") -> nn.Module:
    return create_model(name=name, num_classes=4, in_channels=3)


def data(on_device: bool = False) -> SyntheticDataModule:
    dm = SyntheticDataModule(num_samples=256, batch_size=32, on_device=on_device)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def distil(student: nn.Module, distiller_cls, dm: SyntheticDataModule, steps: int = 8):
    """Distils ``student`` from an untrained resnet14 for ``steps`` steps; returns the module."""
    teacher = resnet("resnet14")
    context = DistillContext(
        student_stages=STAGES,
        teacher_stages=STAGES,
        example_input=torch.randn(2, 3, 16, 16),
        num_classes=4,
        num_train_samples=dm.num_train_samples,
    )
    module = DistillationModule(
        student,
        teacher,
        distiller_cls(student, teacher, context=context),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        scheduler=None,
        num_classes=4,
    )
    quiet_trainer(max_steps=steps, limit_val_batches=0).fit(module, datamodule=dm)
    return module


# ------------------------------------------------------------------------ the swapped model


def test_swap_keeps_names_parameters_and_forward_so_taps_work():
    torch.manual_seed(0)
    model = resnet()
    names = [name for name, _ in model.named_modules()]
    parameters = [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 16, 16)
    prepare_qat(model)
    assert [name for name, _ in model.named_modules()] == names
    assert [id(p) for p in model.parameters()] == parameters  # the very same tensors
    layers = quantize.quantized_layers(model)
    assert len(layers) == 10  # stem, 3 blocks x 2 convs, 2 projection convs, and fc
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert isinstance(model.conv1, nn.Conv2d)  # distillers' isinstance checks still hold
    tap = FeatureTap(model, [*STAGES, "layer3.0.relu2:input"])
    assert model(x).shape == (2, 4)
    assert tap.pop()["layer3"].shape == (2, 64, 4, 4)


def test_float_checkpoint_loads_into_the_quantized_student_and_float_copy_has_its_keys():
    model = resnet()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_qat(model)
    qat_keys = set(model.state_dict())
    assert {k for k in qat_keys if not quantize.is_range_key(k)} == set(float_state)
    assert len(qat_keys - set(float_state)) == 2 * 10  # act_min, act_max per layer
    model.load_state_dict(float_state)  # strict: a float checkpoint fits (init_from)
    assert math.isinf(model.conv1.act_min.item())
    plain = quantize.float_copy(model)
    assert type(plain.conv1) is nn.Conv2d and type(plain.fc) is nn.Linear
    assert set(plain.state_dict()) == set(float_state)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, float_state[key])


def test_prepare_refuses_what_it_cannot_do():
    model = resnet()
    FeatureTap(model, ["layer1.0.conv1"])
    with pytest.raises(ValueError, match="already has forward hooks.*before FeatureTap"):
        prepare_qat(model)
    fresh = prepare_qat(resnet(), skip=["fc"])
    assert type(fresh.fc) is nn.Linear
    with pytest.raises(ValueError, match="already fake-quantized"):
        prepare_qat(fresh)
    with pytest.raises(ValueError, match=r"unknown layers \['layer9'\]"):
        prepare_qat(resnet(), skip=["layer9"])
    with pytest.raises(ValueError, match="2..8 bits"):
        prepare_qat(resnet(), weight_bits=16)
    with pytest.raises(ValueError, match="no plain nn.Conv2d or nn.Linear"):
        prepare_qat(nn.Sequential(nn.ReLU()))


# --------------------------------------------------------------------------- the quantizers


def test_weight_rounding_hand_worked_at_4_bits():
    layer = prepare_qat(nn.Sequential(nn.Linear(4, 2, bias=False)), weight_bits=4)[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    # Row 0: scale 1/7; -0.6 -> -4.2 steps -> -4, 0.3 -> 2.1 -> 2; an all-zero row stays 0.
    expected = torch.tensor([[1.0, -4 / 7, 2 / 7, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(layer.quantized_weight(), expected)


@pytest.mark.parametrize(("spec", "middle", "edges"), [("int8", 8, 8), ("w4a8", 4, 8)])
def test_weights_take_at_most_2_to_the_bits_values_per_channel(spec, middle, edges):
    torch.manual_seed(0)
    model = instantiate(compose([f"quantize={spec}"]).quantize).prepare(resnet())
    layers = list(quantize.quantized_layers(model).values())
    for index, layer in enumerate(layers):
        bits = edges if index in (0, len(layers) - 1) else middle
        assert layer.weight_bits == bits
        weight = layer.quantized_weight().flatten(1)
        levels = max(row.unique().numel() for row in weight)
        assert levels <= 2**bits - 1  # restricted symmetric range: -(2^(b-1)-1)..2^(b-1)-1
        scale = layer.weight.detach().abs().flatten(1).amax(1, keepdim=True) / (
            2 ** (bits - 1) - 1
        )
        assert torch.allclose(weight / scale, (weight / scale).round(), atol=1e-4)
        if bits == 4:
            assert levels > 8  # uses the grid, does not collapse it


def test_input_range_is_a_moving_average_of_training_batches():
    layer = prepare_qat(nn.Sequential(nn.Linear(2, 1)), momentum=0.5)[0]
    x = torch.tensor([[0.123, 1.0]])
    layer.eval()
    assert torch.equal(layer.quantized_input(x), x)  # no training batch seen: unquantized
    layer.train()
    layer(torch.tensor([[0.0, 2.55]]))  # first batch sets the range
    assert layer.act_min.item() == 0.0 and layer.act_max.item() == pytest.approx(2.55)
    layer(torch.tensor([[-1.0, 0.55]]))  # then min/max move halfway (momentum 0.5)
    assert layer.act_min.item() == pytest.approx(-0.5)
    assert layer.act_max.item() == pytest.approx(1.55)
    layer.eval()
    layer(torch.tensor([[-9.0, 9.0]]))  # evaluation does not move it
    assert layer.act_max.item() == pytest.approx(1.55)
    # Range [-0.5, 1.55]: scale 2.05/255, zero point 62; 0.123 -> 15.3 steps -> 15.
    scale = 2.05 / 255
    out = layer.quantized_input(torch.tensor([[0.123, 5.0, -3.0]]))
    expected = torch.tensor([[15 * scale, (255 - 62) * scale, -62 * scale]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_gradients_pass_straight_through_both_quantizers():
    torch.manual_seed(0)
    layer = prepare_qat(nn.Sequential(nn.Linear(8, 3)))[0]
    x = torch.rand(5, 8, requires_grad=True)
    layer(x).sum().backward()
    weight_q = layer.quantized_weight().detach()
    x_q = layer.quantized_input(x).detach()
    # d(sum(x_q W_q^T))/dW = sum_batch x_q (identity through the rounding); /dx = sum_rows W_q.
    assert torch.allclose(layer.weight.grad, x_q.sum(0).expand(3, 8), atol=1e-6)
    assert torch.allclose(x.grad, weight_q.sum(0).expand(5, 8), atol=1e-6)


# ------------------------------------------------------------- distilling a quantized student


@pytest.mark.parametrize("distiller_cls", [KD, FitNets])
def test_quantized_student_distils_through_the_module(distiller_cls):
    torch.manual_seed(0)
    student = prepare_qat(resnet())
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    module = distil(student, distiller_cls, data(), steps=3)
    assert module.student is student
    for name, parameter in student.named_parameters():
        assert not torch.equal(parameter, before[name]), f"{name} did not train"
    for name, layer in quantize.quantized_layers(student).items():
        assert math.isfinite(layer.act_min.item()), f"{name} never observed its input"
    if distiller_cls is FitNets:
        assert any(p.abs().sum() > 0 for p in module.distiller.regressor.parameters())


# ------------------------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def trained():
    """A quantized resnet8 trained to fit the synthetic data (its BN statistics and input
    ranges settled), with its data module."""
    torch.manual_seed(0)
    dm = data()
    student = prepare_qat(resnet(), momentum=0.1)
    return distil(student, CrossEntropyOnly, dm, steps=40).student, dm


def test_int8_model_follows_the_fake_quant_student(trained):
    student, dm = trained
    images, _ = next(iter(quantize.CPUBatches(dm, "test")))
    fake = quantize.detached_copy(student)
    int8 = quantize.convert_int8(student, (x for x, _ in quantize.CPUBatches(dm, "train", 4)))
    assert not any(isinstance(m, nn.Conv2d) for m in int8.modules())  # all real int8 convs
    with torch.no_grad(), quantize.int8_inference():  # an earlier fit may leave determinism on
        expected, got = fake(images), int8(images)
    assert (expected.argmax(1) == got.argmax(1)).float().mean() >= 0.95
    assert (expected - got).abs().mean() < 0.1 * expected.abs().mean()


def test_int8_report_compares_accuracy_size_and_latency(trained):
    student, dm = trained
    spec = QuantSpec(calibration_batches=4, latency_runs=2, latency_batch_sizes=[1, 4])
    report = spec.report(student, dm)
    assert report["scheme"] == "w8a8" and set(report) >= {"fake_quant", "float", "int8"}
    assert report["fake_quant"]["acc1"] >= 0.9  # it learnt the data
    assert abs(report["int8"]["acc1"] - report["fake_quant"]["acc1"]) <= 0.05
    assert report["int8"]["weights_file_bytes"] < report["float"]["weights_file_bytes"] / 2
    for row in (report["int8"], report["float"]):
        assert row["cpu_latency_ms_batch1"] > 0 and row["cpu_latency_ms_batch4"] > 0
    assert "note" not in report


def test_4_bit_report_gives_packed_size_and_no_int8_model():
    torch.manual_seed(0)
    dm = data(on_device=True)  # also the on-device data path of CPUBatches
    spec = instantiate(compose(["quantize=w4a8"]).quantize)
    spec.latency_runs, spec.latency_batch_sizes = 1, [1]
    student = spec.prepare(resnet())
    report = spec.report(student, dm)
    assert "int8" not in report and "no int4 CPU kernels" in report["note"]
    assert report["fake_quant"]["packed_size_bytes"] < report["float"]["weights_file_bytes"] / 4
    assert 0.0 <= report["fake_quant"]["acc1"] <= 1.0
    with pytest.raises(InstantiationException, match="no int4 CPU kernels"):
        instantiate(compose(["quantize=w4a8", "quantize.convert=true"]).quantize)


def test_packed_size_hand_worked():
    model = prepare_qat(nn.Sequential(nn.Linear(4, 2)), weight_bits=4)
    # 8 weights x 4 bits + 2 float32 scales, 2 float32 biases, input scale and zero point.
    assert quantize.packed_size_bytes(model) == 4 + 8 + 8 + 8


def test_untraceable_student_fails_before_training_naming_it():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    example = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"cannot convert Branchy to int8: torch.fx cannot"):
        QuantSpec().prepare(Branchy(), example)
    with pytest.raises(ValueError, match="quantize.convert=false"):
        quantize.convert_int8(Branchy(), [example])
    QuantSpec(convert=False).prepare(Branchy(), example)  # fake quantization alone is fine


def test_none_config_composes_to_nothing():
    assert not compose(["quantize=none"]).quantize


def test_run_with_quantize_int8_reports_the_int8_student_in_metrics(tmp_path, tiny_config):
    cfg = tiny_config(
        "epochs=1",
        "quantize=int8",
        "quantize.calibration_batches=2",
        "quantize.latency_runs=1",
        "quantize.latency_batch_sizes=[1]",
    )
    metrics = train.run(cfg, tmp_path)
    quantized = json.loads((tmp_path / "metrics.json").read_text())["compression"]["quantized"]
    assert quantized["scheme"] == "w8a8"
    assert quantized["fake_quant"]["acc1"] == pytest.approx(metrics["test_acc1_best"], abs=0.05)
    assert quantized["int8"]["weights_file_bytes"] < quantized["float"]["weights_file_bytes"]
