"""Training on every task: each distiller on each task it declares, learning, reproducibility,
resume, and the run's honesty (refused overrides, no logger, a diverged run stopped)."""

import json
import logging

import pytest
from helpers import DISTILLER_CONFIGS, declared_tasks

from distill_zoo import train
from distill_zoo.config import compose
from distill_zoo.distillers import DistillContext

SCENES = [
    "data.num_train=32",
    "data.num_val=16",
    "data.num_test=16",
    "data.batch_size=16",
    "data.image_size=32",
    "data.min_scale=8",
    "data.max_scale=14",
    "data.padding=4",
]
TASKS = {
    "segmentation": ["task=segmentation", *SCENES],
    "detection": ["task=detection", *SCENES],
    "regression": [
        "task=regression",
        "data.num_train=64",
        "data.num_val=32",
        "data.num_test=32",
        "data.batch_size=32",
    ],
    "tabular": [
        "task=regression",
        "data=tabular_regression",
        "student=mlp_small",
        "teacher=mlp_large",
    ],
}
"""Overrides of a seconds-long run of each task on its embedded data."""
FAST = ["trainer=cpu", "logger=csv", "callbacks=none", "report_compression=false"]

DISTILLERS = DISTILLER_CONFIGS


FEATURE_ONLY_ON_IMAGES = {"tabular"}  # an MLP's features are vectors: no conv connectors
CASES = [
    (name, case)
    for name in DISTILLERS
    for case, overrides in TASKS.items()
    if overrides[0].removeprefix("task=") in declared_tasks(name)
    and (case not in FEATURE_ONLY_ON_IMAGES or name in ("none", "kd"))
]


@pytest.fixture
def task_config(teacher_store):
    def make(case: str, *overrides: str):
        return compose(
            [*TASKS[case], *FAST, "epochs=1", f"teacher_store={teacher_store}", *overrides]
        )

    return make


@pytest.mark.parametrize(("distiller", "case"), CASES, ids=[f"{d}-{c}" for d, c in CASES])
def test_every_distiller_trains_on_every_task_it_declares(
    distiller, case, task_config, tmp_path
) -> None:
    cfg = task_config(case, f"distiller={distiller}", "+trainer.limit_train_batches=2")
    metrics = train.run(cfg, tmp_path)
    monitor = metrics["monitor"].split("/")[1]
    assert metrics["task"] == cfg.task.name
    assert metrics[f"best_val_{monitor}"] is not None
    # Every default config keeps the task loss (ce_weight 1) beside its own terms.
    task_term = {"segmentation": "ce", "detection": "det"}.get(case, cfg.task.get("loss"))
    logged = (tmp_path / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert f"train/loss_{task_term}" in logged.split(",")


def test_the_tables_cover_every_task_with_several_methods() -> None:
    for task in ("segmentation", "detection", "regression"):
        served = [name for name in DISTILLERS if task in declared_tasks(name)]
        assert {"none", "fitnets", "at"} <= set(served), task
    assert "segmentation" in declared_tasks("kd") and "detection" not in declared_tasks("kd")


@pytest.mark.parametrize("case", ["segmentation", "regression"])
def test_kd_learns_on_dense_and_regression_tasks(case, teacher_store, tmp_path) -> None:
    # Segmentation on 64x64 scenes (the default size): at 32x32 a few epochs are too few.
    data = ["data.num_train=512", "data.num_val=32", "data.num_test=64"]
    overrides = ["task=segmentation", *data] if case == "segmentation" else TASKS[case]
    cfg = compose(
        [*overrides, *FAST, "epochs=4", "distiller=kd", f"teacher_store={teacher_store}"]
    )
    metrics = train.run(cfg, tmp_path)
    rows = (tmp_path / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train/loss")
    losses = [float(row.split(",")[column]) for row in rows[1:] if row.split(",")[column]]
    assert losses[-1] < losses[0]
    if case == "segmentation":
        # Predicting background everywhere scores mIoU ~0.08 (1 of 11 classes, ~91% of pixels).
        assert metrics["test_miou_best"] > 0.1
        assert metrics["teacher_test_miou"] > 0.1
    else:
        assert metrics["test_mae_best"] < 0.5  # targets are standardised: 1.0 is chance level


@pytest.mark.parametrize("case", ["segmentation", "detection", "regression"])
def test_the_same_seed_gives_the_same_metrics(case, task_config, tmp_path) -> None:
    overrides = ["distiller=none", "teacher=none", "+trainer.limit_train_batches=2"]
    first = train.run(task_config(case, *overrides), tmp_path / "a")
    second = train.run(task_config(case, *overrides), tmp_path / "b")
    keys = [k for k in first if k.startswith(("test_", "best_val_"))]
    assert {k: first[k] for k in keys} == {k: second[k] for k in keys}


def test_a_resumed_segmentation_run_ends_where_an_uninterrupted_one_does(
    task_config, tmp_path, interrupt
) -> None:
    overrides = ["distiller=kd", "epochs=2"]
    whole = train.run(task_config("segmentation", *overrides), tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train.run(task_config("segmentation", *overrides), tmp_path / "cut", [interrupt(1)])
    resumed = train.run(task_config("segmentation", *overrides, "resume=true"), tmp_path / "cut")
    for key in ("best_val_miou", "test_miou_best", "test_miou_last"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6)


def test_a_diverged_run_stops_naming_the_term_epoch_and_step(task_config, tmp_path) -> None:
    cfg = task_config("regression", "distiller=none", "teacher=none", "optim.lr=1e12")
    cfg.epochs = 3
    with pytest.raises(FloatingPointError, match=r"not finite at epoch \d+, step \d+.*mse"):
        train.run(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()  # no result is reported for it


def test_an_override_the_run_would_ignore_is_refused(task_config, tmp_path) -> None:
    cfg = task_config("tabular", "distiller=none", "teacher=none", "++trainer.max_epochs=2")
    with pytest.raises(ValueError, match=r"trainer.max_epochs=2 would be ignored.*epochs=<n>"):
        train.run(cfg, tmp_path)


def test_a_run_without_logger_keeps_the_default_callbacks_working(tmp_path) -> None:
    cfg = compose([*TASKS["tabular"], "trainer=cpu", "logger=none", "distiller=none"])
    cfg.teacher = {}
    cfg.epochs = 1
    cfg.report_compression = False
    metrics = train.run(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["task"] == "regression"
    assert metrics["epochs"] == 1


def test_a_teacher_trained_on_demand_is_quiet_and_not_in_the_students_time(
    tmp_path, caplog
) -> None:
    cfg = compose([*TASKS["tabular"], *FAST, "epochs=2", f"teacher_store={tmp_path / 'store'}"])
    with caplog.at_level(logging.INFO):
        metrics = train.run(cfg, tmp_path / "run")
    assert "starting from scratch" not in caplog.text
    assert "training teacher" in caplog.text
    assert metrics["teacher_training_s"] > 0
    assert "teacher trained first in" in train.summary(metrics)


def test_distill_context_defaults_to_classification() -> None:
    assert DistillContext().task == "classification"
