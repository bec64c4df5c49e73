"""Structured pruning (shipping/prune.py, on torch-pruning) and pruned-structure records
(models/pruned_structure.py)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_zoo.models import create_model, segmentation_model
from distill_zoo.models.pruned_structure import STRUCTURE_KEY, is_pruned, record, restore
from distill_zoo.shipping.compression import count_macs, count_parameters
from distill_zoo.shipping.prune import IMPORTANCES, PruneSpec

try:
    import torch_pruning  # noqa: F401
except ImportError:
    HAS_TORCH_PRUNING = False
else:
    HAS_TORCH_PRUNING = True
needs_tp = pytest.mark.skipif(
    not HAS_TORCH_PRUNING, reason='needs torch-pruning: pip install -e ".[prune]"'
)

LAYER_TOLERANCE = 0.04
"""Layer scope: every layer loses the same channel fraction, so the pruned quantity can land
below the target by what one more channel of every layer costs (3.4% of resnet20's MACs at
75%: its first stage has 16 channels)."""
GLOBAL_TOLERANCE = 0.015


def cifar(name: str, seed: int = 0) -> nn.Module:
    """A zoo classifier (10 classes) with random, untied BatchNorm scales."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.1, 1.0)
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def images(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def ce_backward(batch: int = 4, size: int = 32):
    """Taylor's backward: cross-entropy on one fixed random batch."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(batch) % 10

    def backward(model: nn.Module) -> None:
        F.cross_entropy(model(x), labels).backward()

    return backward


# ---- reaching the target ---------------------------------------------------------------


@needs_tp
@pytest.mark.parametrize("name", ["resnet20", "vgg8"])
@pytest.mark.parametrize("target", ["macs", "params"])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_prune_reaches_target(name, target, ratio):
    model, x = cifar(name), images()
    result = PruneSpec(target=target, ratio=ratio).prune(model, x)
    start = result["before"][target]
    kept = result["after"][target]
    # at most the target, and not far below it
    assert (1 - ratio - LAYER_TOLERANCE) * start <= kept <= (1 - ratio) * start
    assert result["after"] == {
        "params": count_parameters(model),
        "macs": count_macs(model, x),
    }
    assert model(x).shape == (2, 10)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert classifier.out_features == 10
    assert result["structure"] == record(model)
    assert 0 < result["channel_ratio"] < 1


@needs_tp
@pytest.mark.parametrize("name", ["resnet20", "vgg8"])
def test_global_scope_reaches_target(name):
    model, x = cifar(name), images()
    result = PruneSpec(scope="global", ratio=0.6).prune(model, x)
    start, kept = result["before"]["macs"], result["after"]["macs"]
    assert (0.4 - GLOBAL_TOLERANCE) * start <= kept <= 0.4 * start
    assert model(x).shape == (2, 10)


@needs_tp
@pytest.mark.parametrize("head", ["fcn", "psp"])
def test_segmentation_keeps_class_channels(head):
    torch.manual_seed(0)
    model = segmentation_model(f"{head}_resnet8", num_classes=11).eval()
    x = images()
    result = PruneSpec(ratio=0.5).prune(model, x)
    assert result["after"]["macs"] <= 0.5 * result["before"]["macs"]
    assert model.head.classifier.out_channels == 11
    assert model(x).shape == (2, 11, 32, 32)


class TwoHeads(nn.Module):
    """A segmenter returning a dict of main and auxiliary logits, as torchvision's do."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3)
        )
        self.main = nn.Sequential(nn.ReLU(), nn.Conv2d(32, 16, 1), nn.ReLU())
        self.main_classifier = nn.Conv2d(16, classes, 1)
        self.aux = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        features = self.body(x)
        size = x.shape[-2:]
        out = F.interpolate(self.main_classifier(self.main(features)), size=size)
        return {"out": out, "aux": F.interpolate(self.aux(features), size=size)}


@needs_tp
def test_every_output_layer_keeps_its_channels():
    model = TwoHeads().eval()
    x = images(16)
    PruneSpec(ratio=0.5).prune(model, x)
    assert model.main_classifier.out_channels == 5 and model.aux.out_channels == 5
    assert model.main[1].out_channels < 16  # the layers before them are pruned
    out = model(x)
    assert out["out"].shape == out["aux"].shape == (2, 5, 16, 16)


@needs_tp
def test_ignored_layers_keep_their_output_channels():
    model = cifar("resnet20")
    PruneSpec(ratio=0.5).prune(model, images(), ignored_layers=["layer1.0.conv1"])
    assert model.layer1[0].conv1.out_channels == 16
    assert model.layer1[1].conv1.out_channels < 16
    model = cifar("resnet20")
    PruneSpec(ratio=0.5).prune(model, images(), ignored_layers=[model.layer1[0].conv1])
    assert model.layer1[0].conv1.out_channels == 16


# ---- importances, scopes, architectures ---------------------------------------------------


@needs_tp
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("importance", ["l1", "bn_scale", "taylor"])
def test_each_importance_prunes(importance, scope):
    model, x = cifar("resnet20"), images()
    backward = ce_backward() if importance == "taylor" else None
    spec = PruneSpec(importance=importance, scope=scope, ratio=0.4, steps=2)
    result = spec.prune(model, x, backward=backward)
    assert result["after"]["macs"] <= 0.6 * result["before"]["macs"]
    assert model(x).shape == (2, 10)
    assert all(p.grad is None for p in model.parameters())


@needs_tp
def test_importances_rank_differently():
    kept = []
    for importance in IMPORTANCES:
        model = cifar("resnet20")
        backward = ce_backward() if importance == "taylor" else None
        PruneSpec(importance=importance, ratio=0.5, steps=1).prune(
            model, images(), backward=backward
        )
        kept.append(model.layer2[0].conv1.weight.detach())
    assert all(w.shape == kept[0].shape for w in kept)  # layer scope: the same sizes
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])


@needs_tp
def test_mobilenetv2_depthwise_convs_stay_consistent():
    model, x = cifar("mobilenetv2"), images()
    PruneSpec(ratio=0.5, steps=2).prune(model, x)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise
    for conv in depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels
        assert conv.weight.shape[:2] == (conv.out_channels, 1)
    assert any(conv.out_channels < 96 for conv in depthwise if conv.kernel_size == (3, 3))
    assert model(x).shape == (2, 10)


@needs_tp
def test_round_to_keeps_multiples():
    model, x = cifar("vgg8"), images()
    PruneSpec(ratio=0.5, round_to=8).prune(model, x)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.out_channels % 8 == 0 for conv in convs)


@needs_tp
def test_wrn_prunes():
    model, x = cifar("wrn_16_2"), images()
    result = PruneSpec(ratio=0.5).prune(model, x)
    assert result["after"]["macs"] <= 0.5 * result["before"]["macs"]
    assert model(x).shape == (2, 10)


@needs_tp
@pytest.mark.slow
def test_resnet32x4_and_torchvision_resnet18_prune():
    from distill_zoo.models import torchvision_model

    for model in (cifar("resnet32x4"), torchvision_model("resnet18", num_classes=10).eval()):
        x = images()
        result = PruneSpec(ratio=0.5, scope="global").prune(model, x)
        assert result["after"]["macs"] <= 0.5 * result["before"]["macs"]
        assert model(x).shape == (2, 10)


@needs_tp
def test_mode_and_requires_grad_are_kept():
    model = cifar("resnet20").train()
    model.layer1.requires_grad_(False)
    running_mean = model.bn1.running_mean.clone()
    PruneSpec(ratio=0.3, steps=1).prune(model, images())
    assert model.training
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer3.parameters())
    # traced in eval mode: kept channels keep their running statistics
    assert all(bool((running_mean - value).abs().min() == 0) for value in model.bn1.running_mean)


# ---- determinism -------------------------------------------------------------------------


@needs_tp
@pytest.mark.parametrize(
    "spec", [PruneSpec(scope="global"), PruneSpec(importance="taylor", ratio=0.4, steps=2)]
)
def test_same_weights_give_the_same_structure(spec):
    first = cifar("resnet20")
    second = copy.deepcopy(first)
    backward = ce_backward() if spec.importance == "taylor" else None
    a = spec.prune(first, images(), backward=backward)
    b = spec.prune(second, images(), backward=backward)
    assert a["structure"] == b["structure"]
    assert all(
        torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters(), strict=True)
    )


# ---- pruned-structure records ------------------------------------------------------------


@needs_tp
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_record_restore_load_gives_identical_outputs(name):
    pruned, x = cifar(name), images()
    PruneSpec(ratio=0.5, scope="global", steps=2).prune(pruned, x)
    structure = json.loads(json.dumps(record(pruned)))  # as a checkpoint or JSON file holds it
    assert structure == record(pruned)
    fresh = create_model(name, num_classes=10)
    assert is_pruned(fresh, structure)
    assert restore(fresh, structure) is fresh
    assert not is_pruned(fresh, structure)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))


def shrunk_model() -> nn.Sequential:
    """A small network pruned by hand (no torch-pruning needed): 8 -> 5 channels."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 2)
    )
    keep = torch.tensor([0, 2, 3, 5, 7])
    conv, bn, fc = model[0], model[1], model[4]
    conv.weight = nn.Parameter(conv.weight[keep].detach())
    conv.bias = nn.Parameter(conv.bias[keep].detach())
    conv.out_channels = 5
    bn.weight, bn.bias = nn.Parameter(bn.weight[keep].detach()), nn.Parameter(bn.bias[keep])
    bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
    bn.num_features = 5
    fc.weight = nn.Parameter(fc.weight.view(2, 8, 4)[:, keep].reshape(2, 20).detach())
    fc.in_features = 20
    return model.eval()


def fresh_small() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 2)
    )


def test_record_is_json_and_describes_sizes():
    structure = record(shrunk_model())
    assert json.loads(json.dumps(structure)) == structure
    assert structure["modules"]["0"] == {
        "type": "Conv2d",
        "in_channels": 3,
        "out_channels": 5,
        "groups": 1,
    }
    assert structure["modules"]["1"] == {"type": "BatchNorm2d", "num_features": 5}
    assert structure["modules"]["4"]["in_features"] == 20
    assert structure["parameters"]["0.weight"] == [5, 3, 3, 3]
    assert structure["buffers"]["1.running_var"] == [5]
    assert structure["buffers"]["1.num_batches_tracked"] == []
    assert STRUCTURE_KEY == "pruned_structure"


def test_restore_without_torch_pruning(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    pruned = shrunk_model()
    structure = json.loads(json.dumps(record(pruned)))
    model = fresh_small()
    model.requires_grad_(False)
    restore(model, structure)
    assert not model[0].weight.requires_grad
    model.load_state_dict(pruned.state_dict())
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(model(x), pruned(x))
    assert model[0].out_channels == 5 and model[4].in_features == 20


def test_restore_keeps_shared_tensors_shared():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    pruned = copy.deepcopy(model)
    pruned[0].weight = nn.Parameter(torch.zeros(3, 4))
    pruned[1].weight = pruned[0].weight
    pruned[0].out_features = pruned[1].out_features = 3
    restore(model, record(pruned))
    assert model[0].weight is model[1].weight and model[0].weight.shape == (3, 4)


def test_restore_onto_another_architecture_fails_clearly():
    structure = record(shrunk_model())
    with pytest.raises(ValueError, match="another architecture"):
        restore(create_model("resnet8", num_classes=2), structure)
    with pytest.raises(ValueError, match="another architecture"):
        restore(nn.Sequential(nn.Conv2d(3, 8, 3)), structure)
    with pytest.raises(ValueError, match="another architecture"):
        is_pruned(nn.Sequential(nn.Linear(3, 8)), structure)
    with pytest.raises(ValueError, match="record"):
        restore(fresh_small(), {"modules": {}})
    # a record of a shallower network of the same family names a subset of the modules
    with pytest.raises(ValueError, match="another architecture"):
        restore(create_model("resnet20", 10), record(create_model("resnet8", 10)))


def test_restore_accepts_a_quantization_aware_twin():
    from distill_zoo.shipping.quantize import prepare_qat

    pruned = shrunk_model()
    quantized = prepare_qat(copy.deepcopy(pruned))
    structure = record(quantized)
    assert structure["modules"]["0"]["type"] == "QuantConv2d"
    model = restore(fresh_small(), structure)
    assert model[0].out_channels == 5 and model[0].weight.shape == (5, 3, 3, 3)


def test_is_pruned():
    pruned = shrunk_model()
    assert not is_pruned(pruned, record(pruned))
    assert is_pruned(fresh_small(), record(pruned))
    assert not is_pruned(fresh_small(), record(fresh_small()))


# ---- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"importance": "l2"}, "l1, bn_scale, taylor"),
        ({"scope": "local"}, "layer, global"),
        ({"target": "flops"}, "macs, params"),
        ({"ratio": 0.0}, r"\(0, 1\)"),
        ({"ratio": 1.0}, r"\(0, 1\)"),
        ({"ratio": 1.5}, r"\(0, 1\)"),
        ({"steps": 0}, ">= 1"),
        ({"round_to": 0}, ">= 1"),
    ],
)
def test_bad_spec_fails_clearly(options, match):
    with pytest.raises(ValueError, match=match):
        PruneSpec(**options)


def test_missing_torch_pruning_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[prune\]"'):
        PruneSpec().prune(fresh_small(), torch.randn(1, 3, 4, 4))


@needs_tp
def test_taylor_without_backward_fails_clearly():
    with pytest.raises(ValueError, match="backward="):
        PruneSpec(importance="taylor").prune(cifar("resnet8"), images())


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv(x))).mean((2, 3)))


class HardCodedReshape(NoBatchNorm):
    """Reshapes to a fixed width: torch-pruning cannot keep it consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv(x)))
        return self.fc(x.reshape(x.shape[0], 8 * 8 * 8))


@needs_tp
def test_bn_scale_without_batchnorm_fails_clearly():
    with pytest.raises(ValueError, match="no BatchNorm"):
        PruneSpec(importance="bn_scale").prune(NoBatchNorm(), images(8))
    result = PruneSpec(importance="l1").prune(NoBatchNorm(), images(8))
    assert result["after"]["macs"] <= 0.5 * result["before"]["macs"]


@needs_tp
def test_model_torch_pruning_cannot_handle_fails_with_its_name():
    model = HardCodedReshape()
    structure = record(model)
    with pytest.raises(ValueError, match="cannot prune the my_net model"):
        PruneSpec().prune(model, images(8), name="my_net")
    assert record(model) == structure  # left unpruned
    with pytest.raises(ValueError, match="cannot prune the HardCodedReshape model"):
        PruneSpec().prune(HardCodedReshape(), images(8))


@needs_tp
def test_unreachable_target_and_unknown_ignored_layer_fail_clearly():
    with pytest.raises(ValueError, match="cannot remove 99%"):
        PruneSpec(ratio=0.99).prune(NoBatchNorm(), images(8))
    with pytest.raises(ValueError, match="not a layer"):
        PruneSpec().prune(NoBatchNorm(), images(8), ignored_layers=["head"])
