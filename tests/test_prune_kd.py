"""Pruning inside runs: ``prune=structured`` prunes the student taken from ``init_from`` before
anything reads its shapes, ``pipeline=prune_kd`` prunes a copy of the teacher and fine-tunes it
with a distiller (or labels alone), and every consumer of a pruned checkpoint (resume,
init_from, teacher.ckpt, export) rebuilds the pruned network from the structure it records."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY

from distill_zoo import build, train
from distill_zoo.config import compose
from distill_zoo.models import create_model, pruned_structure
from distill_zoo.pipelines import runner as pipeline
from distill_zoo.shipping import prune as prune_module

pytest.importorskip("torch_pruning")


@pytest.fixture
def tiny(teacher_store):
    def make(*extra: str) -> list[str]:
        return [*TINY, "report_compression=false", f"teacher_store={teacher_store}", *extra]

    return make


@pytest.fixture(scope="module")
def trained_resnet14(tmp_path_factory, teacher_store):
    """A 3-epoch resnet14 on the tiny data: the network the tests prune."""
    cfg = compose([*TINY, "epochs=3", "distiller=none", "student=resnet14"])
    cfg.teacher_store, cfg.report_compression = str(teacher_store), False
    run_dir = tmp_path_factory.mktemp("resnet14")
    return train.run(cfg, run_dir)["last_checkpoint"]


def read(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def macs(metrics: dict) -> tuple[int, int]:
    return metrics["pruning"]["before"]["macs"], metrics["pruning"]["after"]["macs"]


def test_a_pruned_run_records_its_structure_and_its_report(tiny, tmp_path, trained_resnet14):
    cfg = compose(
        tiny(
            "student=resnet14",
            f"init_from={trained_resnet14}",
            "prune=structured",
            "prune.ratio=0.5",
            f"teacher.ckpt={trained_resnet14}",
            "epochs=2",
            "report_compression=true",
        )
    )
    metrics = train.run(cfg, tmp_path)
    before, after = macs(metrics)
    assert after <= 0.5 * before * 1.05, metrics["pruning"]
    assert metrics["student_params"] < metrics["teacher_params"]
    assert metrics["compression"]["student"]["macs_per_image"] == after
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["pruning"] == metrics["pruning"]
    checkpoint = read(metrics["best_checkpoint"])
    assert pruned_structure.STRUCTURE_KEY in checkpoint
    # The pruned network's checkpoint teaches, initialises and exports as itself.
    fresh = create_model("resnet14", 4, 3)
    from distill_zoo import teachers

    teachers.load_weights(fresh, metrics["best_checkpoint"])
    assert build.count_parameters(fresh) == metrics["student_params"]


def test_a_pruned_checkpoint_is_a_teacher_an_init_and_an_export(tiny, tmp_path, trained_resnet14):
    first = tmp_path / "pruned"
    cfg = compose(
        tiny(
            "student=resnet14",
            f"init_from={trained_resnet14}",
            "prune=structured",
            "prune.ratio=0.6",
            "distiller=none",
            "epochs=1",
        )
    )
    pruned = train.run(cfg, first)
    # As a teacher: its pruned features feed a feature distiller's connectors.
    as_teacher = compose(
        tiny("teacher=resnet14", f"teacher.ckpt={pruned['best_checkpoint']}", "distiller=fitnets")
        + ["epochs=1"]
    )
    taught = train.run(as_teacher, tmp_path / "taught")
    assert taught["teacher_params"] == pruned["student_params"]
    # As an init, without pruning again: same structure, trains on.
    as_init = compose(
        tiny("student=resnet14", f"init_from={pruned['last_checkpoint']}", "distiller=kd")
        + ["epochs=1"]
    )
    again = train.run(as_init, tmp_path / "again")
    assert again["student_params"] == pruned["student_params"]
    assert pruned_structure.STRUCTURE_KEY in read(again["last_checkpoint"])
    # Exported: TorchScript of the pruned student, checked against it on the test images.
    from distill_zoo.shipping.export import export_run

    result = export_run(first, "torchscript")
    assert result["max_abs_diff"] < 1e-4


def test_a_resumed_pruned_run_does_not_prune_again(
    tiny, tmp_path, trained_resnet14, interrupt, monkeypatch
):
    calls = []
    original = prune_module.PruneSpec.prune

    def counted(self, *args, **kwargs):
        calls.append(self.ratio)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(prune_module.PruneSpec, "prune", counted)
    overrides = tiny(
        "student=resnet14",
        f"init_from={trained_resnet14}",
        "prune=structured",
        "prune.ratio=0.5",
        "distiller=kd",
        f"teacher.ckpt={trained_resnet14}",
        "epochs=3",
    )
    whole = train.run(compose(overrides), tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train.run(compose(overrides), tmp_path / "cut", callbacks=[interrupt(2)])
    assert len(calls) == 2
    resumed = train.run(compose([*overrides, "resume=true"]), tmp_path / "cut")
    assert len(calls) == 2  # the structure came from last.ckpt
    assert resumed["epochs"] == whole["epochs"]
    assert resumed["pruning"] == whole["pruning"]
    a, b = read(whole["last_checkpoint"]), read(resumed["last_checkpoint"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


@pytest.mark.parametrize("distiller", ["kd", "none"])
def test_prune_kd_prunes_a_copy_of_the_teacher_in_rounds(tiny, tmp_path, distiller):
    overrides = tiny(
        "pipeline=prune_kd",
        "pipeline.rounds=2",
        "pipeline.ratio=0.75",
        f"pipeline.distiller={distiller}",
        "epochs=2",
    )
    result = pipeline.run(compose(overrides), tmp_path, overrides)
    rows = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
    assert [r["stage"] for r in rows] == ["round1", "round2"]
    first = json.loads((tmp_path / "1_round1" / "metrics.json").read_text())
    second = json.loads((tmp_path / "2_round2" / "metrics.json").read_text())
    start, half = macs(first)
    assert macs(second)[0] == half  # round 2 prunes round 1's network
    assert macs(second)[1] <= 0.25 * start * 1.08  # a quarter of the teacher's MACs remain
    assert rows[1]["student_params"] < rows[0]["student_params"]
    assert result["test_acc1_best"] > 0.3  # 4 classes


def test_prune_needs_a_trained_network_and_a_prunable_task(tiny, tmp_path):
    with pytest.raises(ValueError, match="init_from=<checkpoint of the network to prune>"):
        train.run(compose(tiny("prune=structured", "distiller=none")), tmp_path)
    cfg = compose(tiny("prune=structured", "init_from=x.ckpt"))
    detection = SimpleNamespace(name="detection")
    with pytest.raises(ValueError, match="not task=detection"):
        build.shape_student(cfg, create_model("resnet8", 4, 3), detection, None)
    with pytest.raises(ValueError, match="rounds >= 1"):
        pipeline.parse_stages(
            compose(["pipeline=prune_kd", "pipeline.rounds=0"]).pipeline,
            compose(["pipeline=prune_kd", "pipeline.rounds=0"]),
        )


def test_prune_kd_serves_segmentation(teacher_store, tmp_path):
    overrides = [
        "task=segmentation",
        "data.num_train=32",
        "data.num_val=16",
        "data.num_test=16",
        "data.batch_size=16",
        "data.image_size=32",
        "trainer=cpu",
        "logger=csv",
        "callbacks=none",
        "report_compression=false",
        f"teacher_store={teacher_store}",
        "pipeline=prune_kd",
        "pipeline.ratio=0.5",
        "epochs=1",
    ]
    result = pipeline.run(compose(overrides), tmp_path, overrides)
    before, after = macs(json.loads((tmp_path / "1_round1" / "metrics.json").read_text()))
    assert after <= 0.5 * before * 1.05
    assert "test_miou_best" in result
