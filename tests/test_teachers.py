"""Loading teacher checkpoints: every common layout, and clear errors for bad files."""

import pytest
import torch
from torch import nn

from distill_zoo.teachers.checkpoints import extract_state_dict, load_weights


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


@pytest.fixture
def trained() -> nn.Module:
    torch.manual_seed(1)
    return net()


@pytest.mark.parametrize("layout", ["plain", "model", "net", "lightning", "dataparallel"])
def test_loads_common_checkpoint_layouts(tmp_path, trained, layout):
    state = trained.state_dict()
    payload = {
        "plain": state,
        "model": {"model": state, "epoch": 240, "accuracy": 73.4},
        "net": {"net": state},
        "lightning": {
            "state_dict": {
                **{f"student.{k}": v for k, v in state.items()},
                "teacher.0.weight": torch.zeros(1),
            },
            "epoch": 3,
            "global_step": 10,
        },
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "teacher.pt"
    torch.save(payload, path)
    model = load_weights(net(), path)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"teacher\.ckpt="):
        load_weights(net(), tmp_path / "nope.ckpt")


def test_corrupt_checkpoint_is_reported(tmp_path, trained):
    path = tmp_path / "teacher.pt"
    torch.save(trained.state_dict(), path)
    path.write_bytes(path.read_bytes()[:50])  # truncated download
    with pytest.raises(RuntimeError, match="corrupt"):
        load_weights(net(), path)


def test_pickled_objects_are_refused(tmp_path, trained):
    path = tmp_path / "whole_model.pt"
    torch.save(trained, path)  # a whole pickled module: not loadable with weights_only=True
    with pytest.raises(RuntimeError, match="cannot read"):
        load_weights(net(), path)


def test_mismatched_architecture_lists_keys_and_shapes(tmp_path):
    other = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError) as err:
        load_weights(net(), path)
    message = str(err.value)
    assert "shape mismatch" in message and "0.weight" in message and "Sequential" in message


def test_non_state_dict_is_rejected():
    with pytest.raises(ValueError, match="no state dict"):
        extract_state_dict({"epoch": 3})


def test_teachers_on_demand_train_for_teacher_epochs_when_set() -> None:
    from distill_zoo.config import compose
    from distill_zoo.teachers.store import teacher_key, teacher_training_config

    cfg = compose(["epochs=3"])
    same = teacher_training_config(cfg)
    longer = teacher_training_config(compose(["epochs=3", "teacher_epochs=8"]))
    assert same.epochs == 3 and longer.epochs == 8
    assert longer.sched.T_max == 8  # the schedule follows the teacher's epochs
    assert teacher_key(same) != teacher_key(longer)
    # The student's epochs do not change a teacher that has its own.
    assert teacher_key(longer) == teacher_key(
        teacher_training_config(compose(["epochs=5", "teacher_epochs=8"]))
    )
