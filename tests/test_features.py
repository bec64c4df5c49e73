"""FeatureTap reads named layers of any module and rejects unknown names helpfully."""

import pytest
import torch
from torch import nn

from distill_zoo.distillers.taps import FeatureTap, check_layers


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def test_tap_records_named_outputs_without_changing_forward():
    net = tiny_net()
    x = torch.randn(2, 3, 8, 8)
    plain = net(x)
    tap = FeatureTap(net, ["0", "2.0", "5"])
    tapped = net(x)
    assert torch.equal(plain, tapped)
    features = tap.pop()
    assert features["0"].shape == (2, 4, 8, 8)
    assert features["2.0"].shape == (2, 8, 6, 6)
    assert torch.equal(features["5"], tapped)
    assert tap.features == {}


def test_tap_remove_detaches_hooks():
    net = tiny_net()
    tap = FeatureTap(net, ["1"])
    tap.remove()
    net(torch.randn(1, 3, 8, 8))
    assert tap.features == {}


def test_unknown_layer_lists_valid_names_and_suggests():
    with pytest.raises(ValueError) as err:
        FeatureTap(tiny_net(), ["2.O"], role="student")
    message = str(err.value)
    assert "'2.O'" in message and "student" in message
    assert "did you mean" in message and "2.0" in message.split("did you mean")[1]
    assert "Valid names" in message and "2.1" in message


def test_check_layers_accepts_valid():
    check_layers(tiny_net(), ["0", "2", "2.1"])
