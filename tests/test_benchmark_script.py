"""scripts/benchmark.py runs end to end (tiny sizes; the figures are not checked, only that
every path measures something): both classification pairs, and the dense tasks."""

import re
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import benchmark  # noqa: E402

ROW = re.compile(r"^  (\S+(?: \S+)*)\s+(\S+) img/s\s+(\S+)x\s+data\s+(\S+)% teacher\s+(\S+)%")
"""One printed row: name, images/s, ratio to the plain loop, data and teacher shares."""


def test_benchmark_times_the_plain_loop_and_our_variants(tmp_path, capsys):
    results = benchmark.main(
        [
            "--device=cpu",
            "--batch-size=4",
            "--steps=1",
            "--warmup=1",
            "--subset=40",
            f"--archive={tmp_path / 'absent.tar.gz'}",  # random images in CIFAR-10 format
            "--variants",
            "ours",
            "teacher_cache",
        ]
    )
    assert set(results) == {"kd", "crd"}
    assert set(results["kd"]) == {"plain", "ours", "teacher_cache"}
    assert set(results["crd"]) == {"plain", "ours"}  # the cache serves logit-only methods
    assert all(v > 0 for pair in results.values() for v in pair.values())
    out = capsys.readouterr().out
    assert "resnet56 -> resnet20 with kd" in out and "plain loop" in out and "teacher " in out


@pytest.mark.parametrize(
    ("task", "header"),
    [
        ("segmentation", "with kd (random teacher weights)"),
        ("detection", "with fitnets (random teacher weights)"),
    ],
)
def test_benchmark_times_a_dense_task(task, header, capsys):
    results = benchmark.main(
        [
            f"--task={task}",
            "--device=cpu",
            "--batch-size=4",
            "--steps=1",
            "--warmup=1",
            "--scenes=32",
            "--override",
            "data.num_val=16",
            "data.num_test=16",
            "--variants",
            "ours",
            "teacher_cache",  # classification only: said and skipped
        ]
    )
    assert set(results) == {task}
    assert set(results[task]) == {"plain", "ours"}
    assert all(v > 0 for v in results[task].values())
    out = capsys.readouterr().out
    assert f"task {task}: DigitScenes, 32 training scenes" in out
    assert header in out
    assert "teacher_cache: not timed" in out
    rows = {m[1]: m for line in out.splitlines() if (m := ROW.match(line))}
    assert set(rows) == {"plain loop", "ours", "plain loop again"}
    for name, images_per_s, ratio, data, teacher in (m.groups() for m in rows.values()):
        assert float(images_per_s) > 0 and float(ratio) > 0, name
        assert 0 <= float(data) <= 100 and 0 < float(teacher) < 100, name


def test_dense_defaults_and_skipped_variants(capsys):
    args = benchmark.parse_args(["--task=detection", "--device=cpu"])
    assert (args.batch_size, args.steps, args.warmup) == (32, 4, 2)
    assert benchmark.dense_variants(args) == ["ours", "contiguous"]
    assert "bf16 variants are not timed by default on a CPU" in capsys.readouterr().out
    args = benchmark.parse_args(["--task=detection", "--device=cuda"])
    assert "teacher_bf16" not in benchmark.dense_variants(args)  # no bf16 NMS
    assert "bf16_mixed" in benchmark.dense_variants(args)
    args = benchmark.parse_args(["--task=segmentation", "--device=cuda"])
    assert "teacher_bf16" in benchmark.dense_variants(args)
    args = benchmark.parse_args([])  # classification as before
    assert (args.task, args.batch_size, args.steps, args.warmup) == ("classification", 128, 10, 3)
