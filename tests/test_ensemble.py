"""Ensemble teachers: averaged softened predictions, built from a list of checkpoints."""

import pytest
import torch
from torch import nn

from distill_zoo import build, train
from distill_zoo.teachers.ensemble import TeacherEnsemble, TeacherRoute


class Fixed(nn.Module):
    """A 'network' that always returns the given logits."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor([logits]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_ensemble_softmax_is_the_mean_of_the_members_softmax_by_hand():
    # Members at T=1: softmax([0, ln 3]) = [1/4, 3/4] and softmax([ln 3, 0]) = [3/4, 1/4];
    # their mean is [1/2, 1/2].
    ensemble = TeacherEnsemble([Fixed([0.0, 3.0]), Fixed([3.0, 0.0])], temperature=1.0)
    ensemble.members[0].logits.copy_(torch.tensor([[0.0, torch.log(torch.tensor(3.0))]]))
    ensemble.members[1].logits.copy_(torch.tensor([[torch.log(torch.tensor(3.0)), 0.0]]))
    probs = ensemble(torch.zeros(1, 1)).softmax(dim=1)
    assert probs.tolist() == [[pytest.approx(0.5), pytest.approx(0.5)]]


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_ensemble_is_exact_at_its_temperature(temperature):
    torch.manual_seed(0)
    z = torch.randn(3, 5, 7) * 5
    members = [Fixed(z[i, 0].tolist()) for i in range(3)]
    ensemble = TeacherEnsemble(members, temperature=temperature)
    out = ensemble(torch.zeros(1, 1))
    expected = torch.stack([(z[i, :1] / temperature).softmax(dim=1) for i in range(3)]).mean(0)
    assert torch.allclose((out / temperature).softmax(dim=1), expected, atol=1e-6)


def test_ensemble_needs_two_members():
    with pytest.raises(ValueError, match="at least two members"):
        TeacherEnsemble([Fixed([0.0, 1.0])])


def two_teachers(tiny_config) -> str:
    """``teacher.ckpt=[...]`` of two tiny teachers trained with different seeds (cached)."""
    paths = [str(train.ensure_teacher(tiny_config(f"teacher_seed={seed}"))) for seed in (0, 1)]
    assert paths[0] != paths[1]
    return f"teacher.ckpt=[{paths[0]},{paths[1]}]"


def test_kd_from_a_list_of_teacher_checkpoints(tiny_config, tmp_path):
    ckpts = two_teachers(tiny_config)
    metrics = train.run(tiny_config("distiller=kd", ckpts, "epochs=4"), tmp_path / "kd")
    assert metrics["teacher_params"] == 2 * build.count_parameters(
        build.build_model(tiny_config().teacher, 4, 3)
    )
    assert metrics["best_val_acc1"] > 0.6
    with pytest.raises(ValueError, match="only gives predictions"):
        train.run(tiny_config("distiller=at", ckpts), tmp_path / "at")


def test_route_switches_anchor_at_its_start_epochs():
    route = TeacherRoute([Fixed([1.0, 0.0]), Fixed([0.0, 1.0]), Fixed([2.0, 2.0])], [0, 2, 5])
    seen = []
    for epoch in range(7):
        route.set_epoch(epoch)
        seen.append(route(torch.zeros(1, 1)).tolist()[0])
    assert seen == [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match="begin at 0 and increase"):
        TeacherRoute([Fixed([1.0]), Fixed([1.0])], [0, 0])


@pytest.mark.parametrize("distiller", ["dkd", "dist", "ctkd"])
def test_every_logit_method_takes_an_ensemble(tiny_config, tmp_path, distiller):
    metrics = train.run(
        tiny_config(f"distiller={distiller}", two_teachers(tiny_config), "epochs=1"), tmp_path
    )
    assert metrics["teacher_test_acc1"] > 0.25
