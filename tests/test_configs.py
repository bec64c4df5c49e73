"""Every preset in conf/experiment composes into the CIFAR-100 recipe with its named pair."""

import pytest

from distill_zoo.config import CONF_DIR, compose

PAIRS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if "_recipe" not in p.stem)


def test_the_benchmark_pairs_are_all_there():
    assert len(PAIRS) == 11
    assert "resnet32x4_shufflenetv2" in PAIRS and "vgg13_mobilenetv2" in PAIRS


@pytest.mark.parametrize("preset", PAIRS)
def test_pair_preset_sets_recipe_teacher_and_student(preset):
    cfg = compose([f"experiment={preset}"])
    assert f"{cfg.teacher.name}_{cfg.student.name}" == preset
    assert cfg.data._target_.endswith("CIFAR100DataModule")
    assert cfg.epochs == 240 and list(cfg.sched.milestones) == [150, 180, 210]
    assert cfg.data.batch_size == 64
    expected_lr = 0.01 if cfg.student.name.startswith(("mobilenet", "shufflenet")) else 0.05
    assert cfg.optim.lr == expected_lr
