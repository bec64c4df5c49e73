"""The CIFAR model zoo, its Hydra configs, and the torchvision adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchvision.models import get_model

from distill_zoo.models import ZOO_NAMES, create_model, torchvision_model
from distill_zoo.models.torchvision_adapter import replace_head, replace_stem

CONF = Path(__file__).resolve().parents[1] / "conf"
META_KEYS = ("feature_layers", "ckpt")  # popped by the trainer before instantiating

# Published parameter counts, in millions, written with the precision they were printed with.
HE = "He et al., Deep Residual Learning, CVPR 2016, arXiv:1512.03385, Table 6 (CIFAR-10)"
AT = "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017, arXiv:1612.03928, "
AT += "Table 1 (CIFAR-10)"
# The KD-specific models have no parameter table in their papers; their reference is the code
# behind the CRD paper's CIFAR-100 benchmark (Tian et al., ICLR 2020, arXiv:1910.10699):
# github.com/HobbitLong/RepDistiller models/*.py at 100 classes, counted layer by layer from
# those definitions (conv weights + conv biases where present + 2 per BN channel + fc).
RD = "RepDistiller models/*.py at CIFAR-100 (code of Tian et al., ICLR 2020)"
# Counted by hand (3x3 convs, BN pairs, 1x1 projections): stem 896, stages 131,712,
# 525,568 and 2,099,712, fc 25,700; 2,783,620 in all.
BY_HAND_14X4 = "resnet14x4 counted by hand from its layers (no published figure)"
PUBLISHED: list[tuple[str, int, str, str]] = [
    ("resnet20", 10, "0.27", HE),
    ("resnet32", 10, "0.46", HE),
    ("resnet44", 10, "0.66", HE),
    ("resnet56", 10, "0.85", HE),
    ("resnet110", 10, "1.7", HE),
    ("wrn_16_1", 10, "0.2", AT),
    ("wrn_16_2", 10, "0.7", AT),
    ("wrn_40_1", 10, "0.6", AT),
    ("wrn_40_2", 10, "2.2", AT),
    ("resnet8", 100, "0.08", RD),
    ("resnet14", 100, "0.18", RD),
    ("resnet8x4", 100, "1.23", RD),
    ("resnet14x4", 100, "2.78", BY_HAND_14X4),
    ("resnet32x4", 100, "7.43", RD),
    ("resnet50", 100, "23.71", RD),
    ("wrn_40_2", 100, "2.26", RD),
    ("vgg8", 100, "3.97", RD),
    ("vgg11", 100, "9.28", RD),
    ("vgg13", 100, "9.46", RD),
    ("vgg16", 100, "14.77", RD),
    ("vgg19", 100, "20.09", RD),
    ("mobilenetv2", 100, "0.81", RD),
    ("shufflenetv1", 100, "0.95", RD),
    ("shufflenetv2", 100, "1.36", RD),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compose_group(group: str, choice: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+{group}={choice}"])
    return OmegaConf.to_container(cfg[group], resolve=True)


DENSE_PREFIXES = ("seg_", "det_", "mlp_")
"""Configs of segmentation/detection/tabular models: tests/test_models_dense.py checks them."""


def config_names(group: str) -> list[str]:
    """The classification model configs of ``group`` (``conf/student`` or ``conf/teacher``)."""
    return sorted(
        p.stem
        for p in (CONF / group).glob("*.yaml")
        if p.stem != "none" and not p.stem.startswith(DENSE_PREFIXES)
    )


def test_zoo_names_are_sorted_and_complete() -> None:
    assert sorted(set(ZOO_NAMES)) == ZOO_NAMES
    assert {name for name, *_ in PUBLISHED} == set(ZOO_NAMES)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_forward_gives_logits_on_16px_gray_and_32px_rgb(name: str) -> None:
    small = create_model(name, num_classes=10, in_channels=1)
    cifar = create_model(name, num_classes=100, in_channels=3)
    with torch.no_grad():  # train mode: BatchNorm must cope with the smallest feature maps
        out_small = small(torch.randn(2, 1, 16, 16))
        out_cifar = cifar.eval()(torch.randn(2, 3, 32, 32))
    assert isinstance(out_small, torch.Tensor) and out_small.shape == (2, 10)
    assert isinstance(out_cifar, torch.Tensor) and out_cifar.shape == (2, 100)
    assert torch.isfinite(out_small).all() and torch.isfinite(out_cifar).all()


@pytest.mark.parametrize(("name", "num_classes", "published", "source"), PUBLISHED)
def test_parameter_count_matches_publication(
    name: str, num_classes: int, published: str, source: str
) -> None:
    ours = n_params(create_model(name, num_classes=num_classes)) / 1e6
    decimals = len(published.partition(".")[2])
    # 3%, or half a unit of the last printed digit where the figure is rounded coarser than that
    tolerance = max(0.03 * float(published), 0.5 * 10**-decimals)
    assert abs(ours - float(published)) <= tolerance, f"{name}: {ours:.3f}M vs {source}"


def test_init_is_kaiming_for_convs_and_identity_for_batchnorm() -> None:
    model = create_model("resnet32x4", num_classes=10)
    conv = model.layer3[0].conv1
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5  # kaiming normal, fan_out
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_student_and_teacher_configs_exist_for_every_zoo_model(name: str) -> None:
    student = compose_group("student", name)
    teacher = compose_group("teacher", name)
    assert student["name"] == name and student["_target_"] == "distill_zoo.models.create_model"
    assert teacher == {**student, "ckpt": None}


@pytest.mark.parametrize(
    ("group", "choice"),
    # Causal LMs read token ids and find their blocks themselves: tests/test_language_models.py
    [("student", c) for c in config_names("student") if not c.startswith("lm_")]
    + [("teacher", c) for c in config_names("teacher") if not c.startswith("lm_")],
)
def test_config_instantiates_and_names_feature_layers_in_forward_order(
    group: str, choice: str
) -> None:
    node = compose_group(group, choice)
    layers = node["feature_layers"]
    kwargs = {k: v for k, v in node.items() if k not in META_KEYS}
    model = instantiate(kwargs, num_classes=10, in_channels=3).eval()
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for layer in layers:
        module = model.get_submodule(layer)  # raises AttributeError for a bad name
        module.register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.append((layer, out, out.clone()))
        )
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [layer for layer, *_ in seen] == layers  # each called once, in the listed order
    for layer, out, copy in seen:  # no later in-place op overwrites a tapped feature
        assert torch.equal(out, copy), layer


def test_unknown_zoo_name_lists_valid_names_and_torchvision_route() -> None:
    with pytest.raises(ValueError, match="Unknown zoo model 'resnet21'") as err:
        create_model("resnet21", num_classes=10)
    assert all(name in str(err.value) for name in ZOO_NAMES)
    assert "student=torchvision student.name=" in str(err.value)


def test_torchvision_resnet18_gives_logits() -> None:
    model = torchvision_model("resnet18", num_classes=10)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_unknown_torchvision_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown torchvision model 'resnet20'") as err:
        torchvision_model("resnet20", num_classes=10)
    assert "resnet18" in str(err.value) and "mobilenet_v3_small" in str(err.value)
    assert "student=resnet20" in str(err.value)  # points zoo names to the zoo


def test_torchvision_stem_is_adapted_to_gray_input() -> None:
    model = torchvision_model("resnet18", num_classes=10, in_channels=1)
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_torchvision_rgb_only_model_refuses_gray_input_clearly() -> None:
    with pytest.raises(ValueError, match="only accepts 3-channel"):
        torchvision_model("googlenet", num_classes=10, in_channels=1)


def test_pretrained_stem_adaptation_warns_and_keeps_gray_response() -> None:
    model = get_model("resnet18").eval()
    gray = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        before = model(gray.expand(-1, 3, -1, -1))
        with pytest.warns(UserWarning, match="Adapted the pretrained 3-channel stem"):
            assert replace_stem(model, in_channels=1, pretrained=True) == "conv1"
        after = model(gray)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "head"), [("resnet18", "fc"), ("squeezenet1_1", "classifier.1")])
def test_replace_head_resizes_the_classifier(name: str, head: str) -> None:
    model = get_model(name)  # 1000 ImageNet classes, as with pretrained weights
    assert replace_head(model, old_classes=1000, num_classes=7) == head
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7)
