"""The compression report: hand-counted parameters and MACs, ratios, and the run CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distill_zoo.models import create_model
from distill_zoo.shipping import compression


@pytest.mark.parametrize(
    ("layer", "shape", "macs"),
    [
        # Conv: C_out * H_out * W_out * (C_in / groups) * k_h * k_w; the bias is not counted.
        (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 5, 5), 8 * 5 * 5 * 3 * 3 * 3),
        (nn.Conv2d(4, 8, 3, stride=2, groups=2), (1, 4, 7, 7), 8 * 3 * 3 * 2 * 3 * 3),
        # Linear: in * out.
        (nn.Linear(10, 5), (1, 10), 10 * 5),
    ],
)
def test_macs_of_one_layer_match_the_hand_formula(layer, shape, macs):
    assert compression.count_macs(layer, torch.zeros(shape)) == macs


def test_macs_are_counted_for_one_image_of_a_batch():
    layer = nn.Linear(10, 5)
    assert compression.count_macs(layer, torch.zeros(7, 10)) == 50


def test_macs_of_resnet8_match_a_hand_count():
    # 16x16 input, 4 classes: conv1 3->16 at 16x16; layer1 two 16->16 convs at 16x16;
    # layer2 16->32, 32->32 and a 1x1 16->32 shortcut at 8x8; layer3 the same at 4x4, x2
    # channels; fc 64->4.
    hand = (
        16 * 16 * 16 * 3 * 9
        + 2 * 16 * 16 * 16 * 16 * 9
        + 8 * 8 * 32 * (16 * 9 + 32 * 9 + 16)
        + 4 * 4 * 64 * (32 * 9 + 64 * 9 + 32)
        + 64 * 4
    )
    model = create_model("resnet8", num_classes=4, in_channels=3).eval()
    assert compression.count_macs(model, torch.zeros(2, 3, 16, 16)) == hand == 3_125_504


def test_parameters_and_weights_file_of_a_small_model():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert compression.count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2 == 23
    size = compression.weights_file_bytes(model)
    # 23 float32 numbers plus the zip container's names and headers, well under 4 KiB.
    assert 23 * 4 < size < 23 * 4 + 4096
    bigger = nn.Sequential(nn.Linear(4, 300), nn.ReLU(), nn.Linear(300, 2))
    assert compression.count_parameters(bigger) == 2102
    assert 2102 * 4 < compression.weights_file_bytes(bigger) < 2102 * 4 + 4096


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_report_puts_teacher_and_student_side_by_side_with_ratios():
    student, teacher = _mlp(4), _mlp(40)
    report = compression.compression_report(
        student, teacher, torch.zeros(2, 6), batch_sizes=(1, 5), repeats=2, warmup=1
    )
    assert report["student"]["params"] == 6 * 4 + 4 + 4 * 3 + 3 == 43
    assert report["teacher"]["params"] == 6 * 40 + 40 + 40 * 3 + 3 == 403
    assert report["student"]["macs_per_image"] == 6 * 4 + 4 * 3 == 36
    assert report["teacher"]["macs_per_image"] == 6 * 40 + 40 * 3 == 360
    ratio = report["teacher_over_student"]
    assert ratio["params"] == round(403 / 43, 4)
    assert ratio["macs_per_image"] == 10.0
    for row in (report["student"], report["teacher"]):
        assert set(row) == {
            "params",
            "macs_per_image",
            "weights_file_bytes",
            "cpu_latency_ms_batch1",
            "cpu_latency_ms_batch5",
        }
        assert row["cpu_latency_ms_batch1"] > 0 and row["cpu_latency_ms_batch5"] > 0
    for key, value in ratio.items():
        assert value == round(report["teacher"][key] / report["student"][key], 4)
    assert report["torch_threads"] == torch.get_num_threads()
    assert (report["repeats"], report["warmup"], report["batch_sizes"]) == (2, 1, [1, 5])
    json.dumps(report)  # ready for metrics.json


def test_report_without_a_teacher_and_with_known_file_sizes():
    report = compression.compression_report(
        _mlp(4), None, torch.zeros(1, 6), student_weights_bytes=1234, repeats=1, warmup=0
    )
    assert report["teacher"] is None and report["teacher_over_student"] is None
    assert report["student"]["weights_file_bytes"] == 1234
    table = compression.format_report(report)
    assert "parameters" in table and "CPU latency batch 64" in table


def test_report_leaves_the_measured_model_as_it_was():
    student = _mlp(4).train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    compression.compression_report(student, None, torch.zeros(2, 6), repeats=1, warmup=0)
    assert student.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_format_report_shows_every_row_and_ratio():
    row = {"params": 2_000_000, "macs_per_image": 3_000_000, "weights_file_bytes": 2**21}
    row |= {"cpu_latency_ms_batch1": 2.0, "cpu_latency_ms_batch64": 40.0}
    small = {key: value / 2 for key, value in row.items()}
    report = {
        "student": small,
        "teacher": row,
        "teacher_over_student": compression.ratios(row, small),
        "torch_threads": 1,
        "repeats": 3,
        "warmup": 1,
    }
    lines = compression.format_report(report).splitlines()
    assert lines[1].split() == ["teacher", "student", "teacher/student"]
    assert lines[2].split() == ["parameters", "2.00M", "1.00M", "2.00x"]
    assert lines[3].split() == ["MACs", "per", "image", "3.00M", "1.50M", "2.00x"]
    assert lines[4].split() == ["weights", "file", "2.00", "MiB", "1.00", "MiB", "2.00x"]
    assert lines[6].split()[-1] == "2.00x" and "40.000 ms" in lines[6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"batch_sizes": (0,)}, "batch sizes must be >= 1"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compression.compression_report(_mlp(4), None, torch.zeros(1, 6), **kwargs)
    with pytest.raises(ValueError, match="at least one image"):
        compression.compression_report(_mlp(4), None, torch.zeros(0, 6))


def test_cli_writes_the_report_into_metrics_json(finished_run, capsys):
    run_dir, metrics = finished_run
    path = run_dir / "metrics.json"
    before = json.loads(path.read_text())
    before.pop("compression", None)  # as a run written before the report existed
    path.write_text(json.dumps(before))

    assert compression.main([str(run_dir), "repeats=1", "warmup=0"]) == 0
    after = json.loads(path.read_text())
    assert set(after) == set(before) | {"compression"}
    assert all(after[key] == value for key, value in before.items())
    report = after["compression"]
    assert report["student"]["params"] == metrics["student_params"]
    assert report["teacher"]["params"] == metrics["teacher_params"]
    assert report["student"]["macs_per_image"] == 3_125_504  # the hand count above
    assert report["teacher_over_student"]["params"] == round(
        metrics["teacher_params"] / metrics["student_params"], 4
    )
    assert report["repeats"] == 1
    out = capsys.readouterr().out
    assert "teacher/student" in out and "written into" in out


def test_cli_names_what_is_wrong(tmp_path, capsys):
    assert compression.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert compression.main([str(tmp_path)]) == 2
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err
    assert compression.main([str(tmp_path), "repeat=3"]) == 2
    assert "unknown option repeat=" in capsys.readouterr().err
    assert compression.main(["-h"]) == 0
    assert "ckpt=best|last" in capsys.readouterr().out


def test_every_run_writes_the_report_into_its_metrics(finished_run):
    run_dir, metrics = finished_run
    written = json.loads((run_dir / "metrics.json").read_text())
    report = written["compression"]
    assert report["student"]["params"] == metrics["student_params"]
    assert report["teacher"]["params"] == metrics["teacher_params"]
    assert report["teacher_over_student"]["params"] == pytest.approx(
        metrics["teacher_params"] / metrics["student_params"],
        abs=1e-4,  # rounded to 4 places
    )
