"""Report, plots, compression report and export of segmentation, detection and regression
runs: tiny real 1-epoch runs (two seeds of KD and of the vanilla student per task), and
hand-made run folders where the numbers must be known."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import onnxruntime
import pytest
import torch
import yaml
from test_report import acc, make_run
from torch import nn

from distill_zoo import train
from distill_zoo.config import compose
from distill_zoo.models.detection import detection_model
from distill_zoo.models.segmentation import segmentation_model
from distill_zoo.results import plots
from distill_zoo.results.report import main as report_main
from distill_zoo.results.runs import evaluation_data, first_inputs, load_config
from distill_zoo.results.table import TASK_TABLES, Stat, collect, table_rows
from distill_zoo.shipping import compression, export
from distill_zoo.tasks import (
    ClassificationTask,
    DetectionTask,
    RegressionTask,
    SegmentationTask,
)

COMMON = ["trainer=cpu", "logger=csv", "callbacks=none", "epochs=1"]
REGRESSION = ["task=regression", "data=tabular_regression", "student=mlp_small"]
SEGMENTATION = [
    "task=segmentation",
    "data.image_size=32",
    "data.min_scale=8",
    "data.max_scale=16",
    "data.num_train=32",
    "data.num_val=16",
    "data.num_test=16",
    "data.batch_size=16",
    "student=seg_fcn_resnet20",
]
DETECTION = ["task=detection", "data.num_train=8", "data.num_val=8", "data.num_test=8"]
TEACHERS = {"regression": "teacher=mlp_large", "segmentation": "teacher=seg_fcn_resnet20"}
VANILLA = ["distiller=none", "teacher=none"]


def _run(root: Path, name: str, overrides: list[str], store: Path, compress: bool) -> dict:
    """A run of ``overrides`` in ``root/name``, recorded as a Hydra job records its
    command line (``.hydra/overrides.yaml``), so the report groups it as it would."""
    cfg = compose(
        [*COMMON, *overrides, f"teacher_store={store}", f"report_compression={compress}"]
    )
    folder = root / name
    metrics = train.run(cfg, folder)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return metrics


@pytest.fixture(scope="session")
def task_runs(tmp_path_factory, teacher_store):
    """``root/<task>/{kd,vanilla}_s{0,1}`` for regression and segmentation (the KD seed-0 runs
    with their compression report), and ``root/detection/vanilla_s0`` (Faster R-CNN)."""
    root = tmp_path_factory.mktemp("task_runs")
    metrics = {}
    for task, base in (("regression", REGRESSION), ("segmentation", SEGMENTATION)):
        for method, extra in (("kd", ["distiller=kd", TEACHERS[task]]), ("vanilla", VANILLA)):
            for seed in (0, 1):
                name = f"{method}_s{seed}"
                compress = method == "kd" and seed == 0
                overrides = [*base, *extra, f"seed={seed}"]
                metrics[task, name] = _run(root / task, name, overrides, teacher_store, compress)
    overrides = [*DETECTION, *VANILLA, "seed=0"]
    metrics["detection", "vanilla_s0"] = _run(
        root / "detection", "vanilla_s0", overrides, teacher_store, True
    )
    return SimpleNamespace(root=root, metrics=metrics)


def _group(report, start: str):
    (group,) = [g for g in report.groups if g.label.startswith(start)]
    return group


# --- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task", [ClassificationTask, SegmentationTask, DetectionTask, RegressionTask]
)
def test_each_tasks_table_follows_the_task(task):
    table = TASK_TABLES[task.name]
    assert table.monitor == task.monitor.name
    assert table.lower_is_better == (task.monitor.mode == "min")
    assert f"best_val_{task.monitor.name}" in table.columns
    # Classification's table is the one of runs made before tasks: top-1 only.
    summary = ("acc1",) if task is ClassificationTask else task.summary_metrics
    for name in summary:
        assert {f"test_{name}_best", f"test_{name}_last"} <= set(table.columns)
    for name in task.teacher_metrics:
        assert f"teacher_test_{name}" in table.columns
    assert "test_agreement_best" in table.columns
    assert set(table.gains) == {f"test_{task.monitor.name}_best", f"test_{task.monitor.name}_last"}


def _paired(kd: list[dict], vanilla: list[dict], key: str, sign: float, scale: float):
    return Stat.of([sign * scale * (k[key] - v[key]) for k, v in zip(kd, vanilla, strict=True)])


def test_regression_table_gives_errors_in_data_units_and_gain_as_vanilla_minus_student(
    task_runs,
):
    m = task_runs.metrics
    kd = [m["regression", f"kd_s{s}"] for s in (0, 1)]
    vanilla = [m["regression", f"vanilla_s{s}"] for s in (0, 1)]
    assert all(run["task"] == "regression" and run["monitor"] == "val/mae" for run in kd)
    report = collect(task_runs.root / "regression")
    assert report.tasks == ["regression"]
    group = _group(report, "distiller=kd")
    assert [g.label for g in group.vanilla_groups] == ["distiller=none teacher=none"]

    # Errors are numbers in the data's units (disease progression, ~50), never percentages.
    mae = Stat.of([run["test_mae_best"] for run in kd])
    assert group.stat("test_mae_best") == mae
    assert group.stat("test_agreement_best").mean == pytest.approx(
        statistics.fmean(run["test_agreement_best"] for run in kd)
    )
    # Lower is better: the gain is vanilla minus student, paired by seed.
    gain = group.gain("test_mae_best")
    expected = _paired(kd, vanilla, "test_mae_best", -1.0, 1.0)
    assert gain.complete and gain.paired.mean == pytest.approx(expected.mean)
    assert gain.paired.std == pytest.approx(expected.std)
    assert gain.difference == pytest.approx(
        statistics.fmean(v["test_mae_best"] for v in vanilla) - mae.mean
    )

    rows = {row["overrides"]: row for row in table_rows(report)}
    row = rows["distiller=kd teacher=mlp_large"]
    assert list(row) == [
        "overrides",
        "runs",
        "best val MAE",
        "test MAE (best val)",
        "test MAE (last)",
        "test RMSE (best val)",
        "test RMSE (last)",
        "teacher MAE",
        "teacher RMSE",
        "agreement: mean abs(student - teacher)",
        "MAE gain = vanilla - student (best val)",
        "MAE gain = vanilla - student (last)",
    ]
    assert row["test MAE (best val)"] == f"{mae.mean:.2f} +- {mae.std:.2f}"
    assert row["MAE gain = vanilla - student (best val)"] == (
        f"{expected.mean:+.2f} +- {expected.std:.2f}"
    )
    assert rows["distiller=none teacher=none"]["teacher MAE"] == "-"


def test_segmentation_table_gives_fractions_in_percent_and_gain_as_student_minus_vanilla(
    task_runs,
):
    m = task_runs.metrics
    kd = [m["segmentation", f"kd_s{s}"] for s in (0, 1)]
    vanilla = [m["segmentation", f"vanilla_s{s}"] for s in (0, 1)]
    report = collect(task_runs.root / "segmentation")
    group = _group(report, "distiller=kd")
    miou = Stat.of([100 * run["test_miou_best"] for run in kd])
    assert group.stat("test_miou_best").mean == pytest.approx(miou.mean)
    expected = _paired(kd, vanilla, "test_miou_last", 1.0, 100.0)
    gain = group.gain("test_miou_last")
    assert gain.complete and gain.paired.mean == pytest.approx(expected.mean)

    row = {r["overrides"]: r for r in table_rows(report)}["distiller=kd teacher=seg_fcn_resnet20"]
    assert row["test mIoU (best val)"] == f"{miou.mean:.2f} +- {miou.std:.2f}"
    pixel = Stat.of([100 * run["test_pixel_acc_last"] for run in kd])
    assert row["test pixel acc (last)"] == f"{pixel.mean:.2f} +- {pixel.std:.2f}"
    teacher = 100 * kd[0]["teacher_test_miou"]  # one teacher, trained once, for both seeds
    assert row["teacher mIoU"] == f"{teacher:.2f} +- 0.00"
    agreement = Stat.of([100 * run["test_agreement_best"] for run in kd])
    assert row["agreement (pixels)"] == f"{agreement.mean:.2f} +- {agreement.std:.2f}"
    assert row["gain mIoU (last)"] == f"{expected.mean:+.2f} +- {expected.std:.2f}"


def test_report_of_real_runs_of_three_tasks_has_one_table_each_and_their_plots(
    task_runs, tmp_path, capsys
):
    out = tmp_path / "report"
    report_main([str(task_runs.root), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert "Tasks: segmentation, detection, regression: one table each." in md
    for task in ("segmentation", "detection", "regression"):
        assert f"## task={task}" in md
    assert "| best val mAP | test mAP (best val) |" in md
    assert "| best val mIoU | test mIoU (best val) |" in md
    names = sorted(p.name for p in (out / "plots").iterdir())
    for task in ("segmentation", "regression"):
        assert f"training_curves_{task}.png" in names
        assert f"teacher_vs_student_{task}.png" in names
    assert "training_curves_detection.png" in names
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["task"] for row in rows} == {"segmentation", "detection", "regression"}
    reg = [r for r in rows if r["task"] == "regression" and r["distiller"] == "kd"][0]
    assert float(reg["test_mae_best_mean"]) > 1  # the data's units, not a fraction
    assert reg["test_miou_best_mean"] == "" and reg["test_miou_best_n"] == ""


# --- hand-made folders: every task at once ---------------------------------------------------


def make_task_run(root, name, overrides, task, metrics=None, *, curve=None):
    """A run folder of ``task`` as a Hydra job leaves it; ``curve``: values of the task's
    monitor ``val/<m>`` per epoch in ``logs/csv/metrics.csv``."""
    run = make_run(root, name, overrides, metrics)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["task"] = {"name": task}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if curve is not None:
        column = TASK_TABLES[task].monitor
        (run / "logs" / "csv").mkdir(parents=True)
        rows = [f"epoch,step,val/{column}"] + [f"{e},{e},{v}" for e, v in enumerate(curve)]
        (run / "logs" / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


def seg(miou, teacher=None):
    return {
        "task": "segmentation",
        "monitor": "val/miou",
        "best_val_miou": miou,
        "test_miou_best": miou,
        "test_miou_last": miou - 0.02,
        "test_pixel_acc_best": 0.9,
        "test_pixel_acc_last": 0.9,
        "teacher_test_miou": teacher,
        "test_agreement_best": 0.95 if teacher else None,
    }


def reg(mae, teacher=None):
    return {
        "task": "regression",
        "monitor": "val/mae",
        "best_val_mae": mae,
        "test_mae_best": mae,
        "test_mae_last": mae + 1,
        "test_rmse_best": 2 * mae,
        "test_rmse_last": 2 * mae,
        "teacher_test_mae": teacher,
        "test_agreement_best": 3.5 if teacher else None,
        "test_best": {"mae": mae, "mae_age": mae / 2, "mae_height": mae * 1.5},
        "test_last": {"mae": mae + 1, "mae_age": mae / 2 + 1},
    }


@pytest.fixture
def mixed(tmp_path):
    """Old classification runs (no task key), a segmentation sweep over the temperature,
    regression and detection runs, each with a vanilla student over seeds 0 and 1."""
    root = tmp_path / "mixed"
    for seed in (0, 1):
        make_run(root, f"cls_van{seed}", ["distiller=none", f"seed={seed}"], acc(0.6 + seed / 100))
        make_run(
            root,
            f"cls_kd{seed}",
            ["distiller=kd", f"seed={seed}"],
            acc(0.65 + seed / 100, teacher=0.8, agreement=0.9),
            curve=[0.5, 0.65],
        )
        base = ["task=segmentation", f"seed={seed}"]
        make_task_run(root, f"seg_van{seed}", [*base, "distiller=none"], "segmentation", seg(0.5))
        for t, value in ((2, 0.55), (4, 0.6)):
            make_task_run(
                root,
                f"seg_T{t}_{seed}",
                [*base, "distiller=kd", f"distiller.temperature={t}"],
                "segmentation",
                seg(value + seed / 100, teacher=0.7),
                curve=[0.3, value],
            )
        base = ["task=regression", f"seed={seed}"]
        make_task_run(root, f"reg_van{seed}", [*base, "distiller=none"], "regression", reg(50.0))
        make_task_run(
            root,
            f"reg_kd{seed}",
            [*base, "distiller=kd"],
            "regression",
            reg(48.0 - seed, teacher=45.0),
            curve=[60.0, 48.0],
        )
    detection = {
        "task": "detection",
        "monitor": "val/map",
        "best_val_map": 0.3,
        "test_map_best": 0.25,
        "test_map_last": 0.2,
        "teacher_test_map": 0.4,
        "test_agreement_best": -1.0,  # torchmetrics: no confident teacher box to agree with
    }
    make_task_run(
        root, "det_kd0", ["task=detection", "distiller=kd", "seed=0"], "detection", detection
    )
    # A regression run still going: its last logged epoch is read from val/mae.
    make_task_run(
        root,
        "reg_live",
        ["task=regression", "distiller=at", "seed=0"],
        "regression",
        curve=[70.0, 60.0, 55.0],
    )
    return root


def test_runs_of_several_tasks_get_one_table_each(mixed, capsys):
    report_main([str(mixed), "--no-plots"])
    md = (mixed / "report.md").read_text()
    sections = md.split("## task=")
    # Classification first, then in the order of the groups.
    assert [s.split("\n", 1)[0] for s in sections[1:]] == [
        "classification",
        "regression",
        "segmentation",
        "detection",
    ]
    # Classification runs made before tasks: the table as it always was.
    assert (
        "| overrides | runs | best val top-1 | test top-1 (best val) | test top-1 (last) "
        "| teacher top-1 | agreement | gain (best val) | gain (last) | unfinished |"
    ) in sections[1]
    assert "| distiller=kd | 2 | 65.50 +- 0.71 | 65.50 +- 0.71 |" in sections[1]
    assert "| +5.00 +- 0.00 | +5.00 +- 0.00 |" in sections[1]
    # Segmentation in %, gain in percentage points over the vanilla student of its seed.
    assert (
        "| distiller=kd distiller.temperature=4 | 2 | 60.50 +- 0.71 "
        "| 60.50 +- 0.71 | 58.50 +- 0.71 | 90.00 +- 0.00 | 90.00 +- 0.00 | 70.00 +- 0.00 | - "
        "| 95.00 +- 0.00 | +10.50 +- 0.71 | +10.50 +- 0.71 |"
    ) in sections[3]
    # Labels leave out what every run of their task shares.
    assert "common overrides of these runs: task=regression" in sections[2]
    # Regression in the data's units; the gain is vanilla minus student (lower is better).
    assert "MAE gain = vanilla - student (best val)" in sections[2]
    assert (
        "| distiller=kd | 2 | 47.50 +- 0.71 | 47.50 +- 0.71 | 48.50 +- 0.71 "
        "| 95.00 +- 1.41 | 95.00 +- 1.41 | 45.00 +- 0.00 | - | 3.50 +- 0.00 | +2.50 +- 0.71 "
        "| +2.50 +- 0.71 |"
    ) in sections[2]
    assert (
        "- running: reg_live (distiller=at task=regression, seed 0; no metrics.json; last "
        "logged epoch 3," in md
    )
    # An undefined mAP (-1) is no value.
    # (teacher mAP, mAP@50, mAP@75, agreement)
    assert "| 40.00 | - | - | - | no vanilla run | no vanilla run |" in sections[4]

    with (mixed / "report.csv").open() as handle:
        rows = {(row["task"], row["group"]): row for row in csv.DictReader(handle)}
    kd = rows["regression", "distiller=kd"]
    assert kd["task"] == "regression"
    assert float(kd["test_mae_best_mean"]) == pytest.approx(47.5)
    assert float(kd["gain_test_mae_best"]) == pytest.approx(2.5)
    # Per-target MAE from metrics.json's test_best/test_last.
    assert float(kd["test_mae_age_best_mean"]) == pytest.approx(23.75)
    assert float(kd["test_mae_height_best_mean"]) == pytest.approx(71.25)
    assert float(kd["test_mae_age_last_mean"]) == pytest.approx(24.75)
    assert float(
        rows["segmentation", "distiller=kd distiller.temperature=2"]["gain_test_miou_best"]
    ) == pytest.approx(5.5)
    assert rows["classification", "distiller=kd"]["gain_test_mae_best"] == ""
    assert float(rows["classification", "distiller=kd"]["gain_test_acc1_best"]) == 5.0


def test_plots_follow_each_tasks_metric(mixed):
    report = collect(mixed)
    written = plots.write_all(report, mixed / "plots")
    assert sorted(p.name for p in written) == [
        "miou_vs_distiller.temperature_segmentation.png",
        "teacher_vs_student.png",
        "teacher_vs_student_detection.png",
        "teacher_vs_student_regression.png",
        "teacher_vs_student_segmentation.png",
        "training_curves.png",
        "training_curves_regression.png",
        "training_curves_segmentation.png",
    ]
    segmentation = plots.task_report(report, "segmentation")
    lines, baselines = plots.sweep_series(segmentation, "distiller.temperature")
    assert [x for x, _ in lines["distiller=kd"]] == [2.0, 4.0]
    assert [g.label for g in baselines] == ["distiller=none"]
    assert plots.panels(TASK_TABLES["regression"]) == {
        "test_mae_best": "test MAE, checkpoint best on val",
        "test_mae_last": "test MAE, last epoch",
    }


# --- compression report ------------------------------------------------------------------


def test_every_run_measures_its_models_on_its_data_shape(task_runs):
    m = task_runs.metrics
    report = m["regression", "kd_s0"]["compression"]
    assert report["input_shape"] == [10]  # ten features per patient
    assert report["student"]["macs_per_image"] == 10 * 32 + 32 * 1  # mlp_small: 10-32-1
    assert report["teacher_over_student"]["params"] > 1
    assert "MACs per sample" in compression.format_report(report)
    assert m["segmentation", "kd_s0"]["compression"]["input_shape"] == [3, 32, 32]
    detector = m["detection", "vanilla_s0"]["compression"]
    assert detector["input_shape"] == [3, 64, 64] and detector["student"]["macs_per_image"] > 0
    uncounted = detector["uncounted_ops"]["student"]
    assert {"torchvision::roi_align", "torchvision::nms"} <= set(uncounted)
    assert "partial" in detector["note"]
    assert "MACs are partial" in compression.format_report(detector)


def test_compression_cli_on_a_segmentation_and_a_detection_run(task_runs, capsys):
    run = task_runs.root / "segmentation" / "kd_s0"
    assert compression.main([str(run), "repeats=1", "warmup=0"]) == 0
    report = json.loads((run / "metrics.json").read_text())["compression"]
    assert report["input_shape"] == [3, 32, 32]
    assert (
        report["student"]["params"] == task_runs.metrics["segmentation", "kd_s0"]["student_params"]
    )
    assert "uncounted_ops" not in report
    run = task_runs.root / "detection" / "vanilla_s0"
    assert compression.main([str(run), "repeats=1", "warmup=0"]) == 0
    assert "MACs are partial" in capsys.readouterr().out


def test_segmentation_macs_are_counted_at_the_data_image_size():
    model = segmentation_model("fcn_resnet20", num_classes=11, in_channels=3).eval()
    small = compression.count_macs(model, torch.zeros(1, 3, 32, 32))
    large = compression.count_macs(model, torch.zeros(1, 3, 64, 64))
    assert large == 4 * small  # every layer is a convolution: MACs follow the pixel count


def test_detector_teacher_and_student_report_says_their_macs_are_partial():
    student = detection_model("fasterrcnn_resnet8", num_classes=11, in_channels=3)
    teacher = detection_model("retinanet_resnet8", num_classes=11, in_channels=3)
    report = compression.compression_report(
        student, teacher, torch.rand(2, 3, 64, 64), batch_sizes=(1, 2), repeats=1, warmup=0
    )
    assert report["uncounted_ops"]["student"] == ["torchvision::nms", "torchvision::roi_align"]
    # RetinaNet has no RoIAlign; its NMS runs only on boxes above its score threshold.
    assert set(report["uncounted_ops"]["teacher"]) <= {"torchvision::nms"}
    assert report["student"]["cpu_latency_ms_batch2"] > 0
    assert report["teacher_over_student"]["params"] == pytest.approx(
        report["teacher"]["params"] / report["student"]["params"], abs=1e-4
    )
    json.dumps(report)


# --- export ------------------------------------------------------------------------------


def _student_and_inputs(run: Path, count: int = 16):
    cfg = load_config(run)
    data = evaluation_data(cfg)
    checkpoint = export.resolve_run(run)[1]
    return export.load_student(cfg, checkpoint, data), first_inputs(data, count)


@pytest.mark.parametrize(
    ("task", "shape"), [("segmentation", (16, 11, 32, 32)), ("regression", (16, 1))]
)
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_segmentation_and_regression_students_round_trip(task_runs, tmp_path, task, shape, fmt):
    run = task_runs.root / task / "kd_s1"
    out = tmp_path / f"student.{export.FORMATS[fmt]}"
    assert export.main([str(run), f"format={fmt}", f"out={out}"]) == 0
    student, inputs = _student_and_inputs(run)
    with torch.inference_mode():
        expected = student(inputs)
    assert expected.shape == shape
    if fmt == "torchscript":
        with torch.inference_mode():
            got = torch.jit.load(str(out))(inputs)
    else:
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        name = "predictions" if task == "regression" else "logits"
        assert [o.name for o in session.get_outputs()] == [name]
        (array,) = session.run(None, {"images": inputs[:5].numpy()})  # another batch size
        got, expected = torch.from_numpy(array), expected[:5]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_detector_exports_and_matches_eager_boxes(task_runs, tmp_path, capsys, fmt):
    run = task_runs.root / "detection" / "vanilla_s0"
    out = tmp_path / f"detector.{export.FORMATS[fmt]}"
    assert export.main([str(run), f"format={fmt}", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "(boxes and scores)" in printed and "usage: " in printed
    student, images = _student_and_inputs(run, 8)
    with torch.inference_mode():
        eager = student(images)
    exported = export.run_exported_detector(out, fmt, images)
    assert [sorted(d) for d in exported] == [["boxes", "labels", "scores"]] * len(images)
    diff, left_out = export.check_detector_export(student, exported, eager, images, 1e-4, 1e-4)
    assert len(left_out) < len(images)
    if fmt == "torchscript":  # the scripted detector: a list of images, (losses, detections)
        with torch.inference_mode():
            losses, detections = torch.jit.load(str(out))(list(images))
        assert losses == {} and len(detections) == len(images)


def _detections(*boxes):
    """One image's detections from ``(x1, y1, x2, y2, score, label)`` rows."""
    rows = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 6)
    return {"boxes": rows[:, :4], "scores": rows[:, 4], "labels": rows[:, 5].long()}


def test_detections_are_matched_box_to_box_whatever_their_order():
    eager = [_detections((0, 0, 10, 10, 0.9, 1), (5, 5, 20, 20, 0.8, 2))]
    shuffled = [_detections((5, 5, 20, 20, 0.8, 2), (0, 0, 10, 10.00001, 0.9, 1))]
    assert export.check_detections(shuffled, eager, 1e-4, 1e-4) == pytest.approx(1e-5, abs=2e-6)
    with pytest.raises(export.ExportError, match="differ from eager PyTorch's in test image 0"):
        export.check_detections(
            [_detections((0, 0, 10, 10, 0.9, 3), (5, 5, 20, 20, 0.8, 2))], eager, 1e-4, 1e-4
        )
    with pytest.raises(export.ExportError, match="finds 1 boxes in test image 0, eager PyTorch 2"):
        export.check_detections([_detections((0, 0, 10, 10, 0.9, 1))], eager, 1e-4, 1e-4)


class TieBreaker(nn.Module):
    """A 'detector' whose class of its one box hangs on exact pixel values: an image holding
    a pixel of exactly 1 gets class 1, any other class 2 (noise flips the first kind)."""

    def forward(self, images):
        return [
            _detections((0, 0, 4, 4, 0.9, 1 if bool((image == 1).any()) else 2))
            for image in images
        ]


def test_images_where_eager_pytorch_itself_is_unstable_are_left_out():
    images = torch.full((3, 3, 8, 8), 0.25)
    images[1, 0, 0, 0] = 1.0  # unstable: 1e-6 of noise changes its class
    model = TieBreaker()
    eager = model(images)
    flipped = [eager[0], _detections((0, 0, 4, 4, 0.9, 2)), eager[2]]
    assert export.check_detector_export(model, flipped, eager, images, 1e-4, 1e-4) == (0.0, [1])
    wrong = [_detections((0, 0, 4, 4, 0.9, 1)), *eager[1:]]
    with pytest.raises(export.ExportError, match="eager PyTorch is stable there"):
        export.check_detector_export(model, wrong, eager, images, 1e-4, 1e-4)
    with pytest.raises(export.ExportError, match="on every test image"):
        export.check_detector_export(model, flipped[1:2], eager[1:2], images[1:2], 1e-4, 1e-4)


# --- data and the softened-prediction plot ---------------------------------------------------


def test_evaluation_data_of_every_task_serves_inputs(task_runs):
    shapes = {"regression": (3, 10), "segmentation": (3, 3, 32, 32), "detection": (3, 3, 64, 64)}
    for task, shape in shapes.items():
        run = next((task_runs.root / task).iterdir())
        assert first_inputs(evaluation_data(load_config(run)), 3).shape == shape


def test_softmax_plot_refuses_runs_of_other_tasks(task_runs, capsys):
    run = task_runs.root / "segmentation" / "kd_s0"
    with pytest.raises(SystemExit):
        report_main(["--softmax", str(run)])
    err = capsys.readouterr().err
    assert "task=segmentation run" in err and "serves task=classification runs only" in err
