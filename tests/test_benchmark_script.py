"""scripts/benchmark.py runs both pairs end to end (tiny sizes; the figures are not checked,
only that every path measures something)."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import benchmark  # noqa: E402


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
