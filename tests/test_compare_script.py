"""scripts/compare_kd_cifar10.py on tiny synthetic data: runs, summary, resume, missing data."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from distill_zoo.results import table

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_kd_cifar10.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_kd_cifar10", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_vanilla_and_kd_runs_are_summarised_and_skipped_on_rerun(script, tmp_path, capsys):
    argv = shlex.split("--data synthetic --subset 0 --epochs 1 --seeds 0 1 --teacher resnet14")
    argv += ["--out", str(tmp_path), "--extra", "callbacks=none"]
    assert script.main(argv) == 0
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    expected = [
        "teacher-resnet14",
        *(f"{r}-resnet8-seed{s}" for r in ("kd", "vanilla") for s in (0, 1)),
    ]
    assert runs == sorted(expected)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["vanilla"]["test_acc1_best"]["n"] == 2
    assert summary["kd"]["test_acc1_best"]["n"] == 2
    kd = json.loads((tmp_path / "kd-resnet8-seed0" / "metrics.json").read_text())
    teacher = json.loads((tmp_path / "teacher-resnet14" / "metrics.json").read_text())
    assert kd["teacher_test_acc1"] == pytest.approx(teacher["test_acc1_best"])
    assert "KD gain" in (tmp_path / "summary.md").read_text()
    assert "KD gain" in capsys.readouterr().out
    # distill_zoo.report sees three groups: teacher, vanilla (2 seeds), KD (2 seeds).
    rows = table.summarise(tmp_path)[0]
    assert sorted(row["runs"] for row in rows) == [1, 2, 2]

    stamp = (tmp_path / "kd-resnet8-seed1" / "metrics.json").stat().st_mtime_ns
    assert script.main(argv) == 0
    assert (tmp_path / "kd-resnet8-seed1" / "metrics.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count("[skip]") == 5


def test_missing_archive_exits_with_code_2_and_says_where(script, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "cifar10-jpeg.tar.gz"
    code = script.main(["--out", str(tmp_path), "--extra", f"data.archive={missing}"])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not list(tmp_path.glob("teacher-*"))
