"""The command line as a user runs it: help, composed config, errors, a run, a sweep, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY as TINY_RUN

TINY = [*TINY_RUN, "epochs=1"]


def cli(*args: str, cwd: Path, module: str = "distill_zoo") -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_help_lists_every_group(tmp_path):
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for group in (
        "data:",
        "student:",
        "teacher:",
        "distiller:",
        "optim:",
        "sched:",
        "trainer:",
        "logger:",
        "pipeline:",
    ):
        assert group in result.stdout
    assert "resnet32x4" in result.stdout and "digits" in result.stdout


def test_cfg_job_shows_the_composed_config(tmp_path):
    result = cli("--cfg", "job", "student=vgg8", "distiller.temperature=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: vgg8" in result.stdout and "temperature: 2" in result.stdout
    assert "DigitsDataModule" in result.stdout  # the embedded default data


@pytest.mark.parametrize(
    "override, message",
    [
        ("distiller=nope", "Could not find 'distiller/nope'"),
        ("distiller.temprature=3", "temprature"),
    ],
)
def test_unknown_choice_or_key_fails_with_hydras_error(tmp_path, override, message):
    result = cli(override, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_run_from_any_directory_then_resume_in_place(tmp_path, teacher_store):
    args = [*TINY, f"teacher_store={teacher_store}"]
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*/metrics.json")
    metrics = json.loads(run.read_text())
    assert metrics["teacher_test_acc1"] is not None
    resumed = cli(*args, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {run.parent}" in resumed.stdout + resumed.stderr
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1  # continued in place


def test_pipeline_runs_its_stages_and_resume_skips_the_finished_ones(tmp_path, teacher_store):
    args = [
        *TINY,
        f"teacher_store={teacher_store}",
        "pipeline=fitnets_2stage",
        "pipeline.init_epochs=1",
    ]
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (summary,) = (tmp_path / "outputs").glob("*/*/pipeline.json")
    assert "Pipeline summary" in first.stdout + first.stderr
    assert [row["status"] for row in json.loads(summary.read_text())["stages"]] == ["done"] * 2
    again = cli(*args, "resume=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "Stage hints already finished" in log and "Stage train already finished" in log
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1


@pytest.mark.slow
def test_sweep_over_temperature_and_seeds_then_report(tmp_path, teacher_store):
    sweep = tmp_path / "sweep"
    result = cli(
        "-m",
        *TINY,
        f"teacher_store={teacher_store}",
        f"hydra.sweep.dir={sweep}",
        "distiller.temperature=1,4",
        "seed=0,1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 4
    report = cli(str(sweep), cwd=tmp_path, module="distill_zoo.report")
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if "distiller.temperature=" in line]
    assert len(rows) == 2 and all("| 2 |" in row and "+-" in row for row in rows)


def test_long_override_lists_get_a_short_unique_run_folder(tmp_path):
    from distill_zoo.config import run_dir

    long_a = ",".join(f"distiller.option_{i}=/some/long/path/value_{i}" for i in range(12))
    long_b = long_a.replace("value_11", "value_99")
    a, b = (Path(run_dir(str(tmp_path), name, False)).parent.name for name in (long_a, long_b))
    assert a != b and len(a.encode()) <= 200 and "/" not in a
    assert Path(run_dir(str(tmp_path), "seed=1", False)).parent.name == "seed=1"
