"""Pipelines: stage specs checked up front, every conf/pipeline preset end to end on tiny data,
hand-overs of weights between stages, and a pipeline cut between and within stages."""

import csv
import json
import logging

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

from distill_zoo import build
from distill_zoo.config import CONF_DIR, compose
from distill_zoo.distillers.base import DistillContext
from distill_zoo.distillers.ft import FT
from distill_zoo.models import create_model
from distill_zoo.module import DistillationModule
from distill_zoo.pipelines import runner as pipeline

PIPELINES = sorted(p.stem for p in (CONF_DIR / "pipeline").glob("*.yaml"))
REGRESSION_PIPELINES = ("aht_2stage",)
"""Run on regression data by tests/test_attentive_regression.py; the rest on classification."""
CLASSIFICATION_PIPELINES = [name for name in PIPELINES if name not in REGRESSION_PIPELINES]


@pytest.fixture
def tiny_overrides(teacher_store):
    def make(*extra: str) -> list[str]:
        return [*TINY, "report_compression=false", f"teacher_store={teacher_store}", *extra]

    return make


def run_pipeline(overrides: list[str], run_dir, callbacks=None) -> dict:
    return pipeline.run(compose(overrides), run_dir, overrides, callbacks)


def stages(spec: dict):
    return pipeline.parse_stages(OmegaConf.create({"stages": spec}))


def test_stage_specs_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="no stages"):
        pipeline.parse_stages(OmegaConf.create({}))
    with pytest.raises(ValueError, match=r"unknown keys \['teachr'\]"):
        stages({"a": {"teachr": "b"}})
    with pytest.raises(ValueError, match="'b', which is not an earlier stage"):
        stages({"a": {"init": "b"}, "b": {}})
    with pytest.raises(ValueError, match="teacher_ckpt must be one of"):
        stages({"a": {}, "b": {"teacher": "a", "teacher_ckpt": "first"}})
    parsed = stages({"a": {"overrides": ["epochs=1"]}, "b": {"teacher": "a"}})
    assert [(s.name, s.folder, s.teacher, s.teacher_ckpt) for s in parsed] == [
        ("a", "1_a", None, "best"),
        ("b", "2_b", "a", "best"),
    ]


def test_a_stage_that_does_not_compose_is_named(tiny_overrides, tmp_path):
    overrides = tiny_overrides(
        "pipeline=fitnets_2stage", 'pipeline.stages.train.overrides=["distiller=nope"]'
    )
    with pytest.raises(ValueError, match="stage 'train' does not compose"):
        run_pipeline(overrides, tmp_path)
    assert not (tmp_path / "1_hints").exists()


def test_stages_inherit_the_command_but_not_its_pipeline_keys():
    base = pipeline.stage_base_overrides(
        ["pipeline=ab_2stage", "pipeline.init_epochs=3", "resume=true", "seed=2", "+x.y=1"]
    )
    assert base == ["seed=2", "+x.y=1"]


TINY_KEYS = {
    "takd": ["pipeline.assistants=[resnet8]"],
    "ban": ["pipeline.generations=2"],
    "rco": ["pipeline.anchors=2"],
    "eskd": ["pipeline.teacher_epoch=1", "pipeline.kd_epochs=2"],
    "prune_kd": ["pipeline.ratio=0.5"],
}
"""Pipeline keys that keep each preset to a few seconds."""

EPOCHS = {"takd": 4}
"""A chain of two 3-epoch distillations sometimes stays at chance (seed 0 does): one more."""


@pytest.mark.parametrize("name", CLASSIFICATION_PIPELINES)
def test_every_pipeline_preset_runs_end_to_end(tiny_overrides, tmp_path, name):
    extra = TINY_KEYS.get(name, ["pipeline.init_epochs=1"])
    epochs = EPOCHS.get(name, 3)
    overrides = tiny_overrides(f"pipeline={name}", *extra, f"epochs={epochs}")
    result = run_pipeline(overrides, tmp_path)
    summary = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
    assert [row["status"] for row in summary] == ["done"] * len(summary)
    for row in summary:
        assert (tmp_path / row["folder"] / "metrics.json").is_file()
    assert result["epochs"] == epochs
    # 4 classes: chance is 0.25; chains of 3-epoch models teach weakly, so only "above chance"
    # on the 64 test images (26 validation images are too few for a threshold).
    assert result["test_acc1_best"] > 0.35, summary
    if name.endswith("_2stage"):
        assert summary[1]["init"] == f"stage {summary[0]['stage']} (last)"
        first = json.loads((tmp_path / summary[0]["folder"] / "metrics.json").read_text())
        assert first["epochs"] == 1  # the initialisation stage's own length


def test_builders_write_the_published_chains():
    from distill_zoo.pipelines import recipes as chains

    cfg = compose(["pipeline=takd", "pipeline.assistants=[resnet56,resnet32]"])
    takd = chains.build(cfg.pipeline, cfg)
    assert list(takd) == ["assistant1_resnet56", "assistant2_resnet32", "student"]
    assert "teacher" not in takd["assistant1_resnet56"]  # the command's teacher
    assert takd["student"]["teacher"] == "assistant2_resnet32"
    cfg = compose(
        [
            "pipeline=takd",
            "pipeline.assistants=[resnet56,resnet32]",
            "pipeline.distillation_path=true",
        ]
    )
    path = chains.build(cfg.pipeline, cfg)
    assert path["student"]["teacher"] == ["assistant1_resnet56", "assistant2_resnet32"]
    assert path["student"]["with_command_teacher"] is True
    cfg = compose(["pipeline=ban", "pipeline.generations=3"])
    ban = chains.build(cfg.pipeline, cfg)
    assert list(ban) == ["gen0", "gen1", "gen2", "gen3", "ensemble"]
    assert [ban[g].get("seed_offset", 0) for g in ban] == [0, 1, 2, 3, 4]
    assert ban["ensemble"]["teacher"] == ["gen1", "gen2", "gen3"]
    cfg = compose(["pipeline=rco", "pipeline.anchors=4", "epochs=12", "teacher=resnet56"])
    rco = chains.build(cfg.pipeline, cfg)
    assert rco["teacher"]["overrides"][:2] == ["student=resnet56", "distiller=none"]
    assert rco["student"]["teacher_ckpt"] == ["epoch=2", "epoch=5", "epoch=8", "last"]
    assert rco["student"]["route_epochs"] == [0, 3, 6, 9]
    cfg = compose(["pipeline=eskd", "pipeline.teacher_epoch=3", "pipeline.kd_epochs=5"])
    eskd = chains.build(cfg.pipeline, cfg)
    assert eskd["student"]["teacher_ckpt"] == "epoch=3"
    assert "distill_epochs=5" in eskd["student"]["overrides"]


def test_eskd_stops_distilling_after_kd_epochs(tiny_overrides, tmp_path):
    overrides = tiny_overrides(
        "pipeline=eskd", "pipeline.teacher_epoch=0", "pipeline.kd_epochs=1", "epochs=3"
    )
    run_pipeline(overrides, tmp_path)
    assert (tmp_path / "1_teacher" / "checkpoints" / "epoch-000.ckpt").is_file()
    rows = list(csv.DictReader((tmp_path / "2_student" / "logs" / "csv" / "metrics.csv").open()))
    kd = {int(r["epoch"]): r["train/loss_kd"] for r in rows if r.get("train/loss")}
    assert kd[0] != "" and kd[1] == "" and kd[2] == ""  # KD in epoch 0 only


def test_a_student_larger_than_its_teacher_stage_warns(tiny_overrides, tmp_path, caplog):
    overrides = tiny_overrides(
        "pipeline=takd", "pipeline.assistants=[resnet8]", "student=resnet20", "epochs=1"
    )
    with caplog.at_level(logging.WARNING):
        pipeline.compose_stages(compose(overrides), overrides)
    assert "is taught by stage 'assistant1_resnet8', which is smaller" in caplog.text


def test_a_stage_whose_init_does_not_fit_names_the_stage(tiny_overrides, tmp_path):
    overrides = tiny_overrides(
        "pipeline=fitnets_2stage",
        "pipeline.init_epochs=1",
        "epochs=1",
        'pipeline.stages.train.overrides=["distiller=kd","student=resnet14"]',
    )
    with pytest.raises(ValueError, match="pipeline stage 'train'.*does not fit"):
        run_pipeline(overrides, tmp_path)


def test_later_stages_start_from_the_earlier_stage(tiny_overrides, tmp_path):
    """FT's transfer stage starts from the paraphraser the first stage trained."""
    overrides = tiny_overrides("pipeline=ft_2stage", "pipeline.init_epochs=1", "epochs=1")
    result = run_pipeline(overrides, tmp_path)
    stage1 = torch.load(
        tmp_path / "1_paraphraser" / "checkpoints" / "last.ckpt", weights_only=True
    )["state_dict"]
    stage2 = torch.load(result["last_checkpoint"], weights_only=True)["state_dict"]
    paraphraser = [k for k in stage1 if k.startswith("distiller.paraphraser.")]
    assert paraphraser and all(torch.equal(stage1[k], stage2[k]) for k in paraphraser)
    assert stage2["distiller.paraphraser_steps"].item() > 0


def test_initialize_from_takes_the_student_and_matching_parts(tmp_path):
    torch.manual_seed(0)
    context = DistillContext(
        student_stages=["layer1", "layer2", "layer3"],
        teacher_stages=["layer1", "layer2", "layer3"],
        example_input=torch.zeros(2, 3, 16, 16),
        num_classes=4,
    )

    def module(student_arch: str) -> DistillationModule:
        student, teacher = create_model(student_arch, 4), create_model("resnet14", 4)
        distiller = FT(student, teacher, context=context, mode="paraphraser")
        return DistillationModule(student, teacher, distiller, torch.optim.SGD, None, 4)

    source = module("resnet8")
    source.distiller.paraphraser_steps.fill_(7)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = module("resnet8")
    build.initialize_from(target, str(path))
    for key, value in source.state_dict().items():
        if key.startswith(("student.", "distiller.")):
            assert torch.equal(value, target.state_dict()[key]), key
    with pytest.raises(ValueError, match="does not fit CifarResNet.*student=<arch>"):
        build.initialize_from(module("resnet20"), str(path))
    with pytest.raises(FileNotFoundError, match="init_from=<path"):
        build.initialize_from(target, str(tmp_path / "missing.ckpt"))


def test_cut_pipeline_resumes_to_the_uninterrupted_result(tiny_overrides, tmp_path, interrupt):
    overrides = tiny_overrides("pipeline=fitnets_2stage", "pipeline.init_epochs=2", "epochs=3")
    full = run_pipeline(overrides, tmp_path / "full")
    cut = tmp_path / "cut"
    # Killed as the second stage starts (between stages), then half-way through it.
    for at_epoch in (0, 2):
        with pytest.raises(RuntimeError, match="simulated interruption"):
            run_pipeline(overrides, cut, [interrupt(at_epoch, folder="2_train")])
        rows = json.loads((cut / "pipeline.json").read_text())["stages"]
        assert [r["status"] for r in rows] == ["done", "pending"]
    resumed = run_pipeline(overrides, cut)
    for key in ("best_val_acc1", "test_acc1_best", "test_acc1_last", "epochs"):
        assert resumed[key] == full[key], key
    a = torch.load(full["last_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(resumed["last_checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("student."))


def test_takd_distillation_path_teaches_with_all_larger_models(tiny_overrides, tmp_path):
    overrides = tiny_overrides(
        "pipeline=takd",
        "pipeline.assistants=[resnet8]",
        "pipeline.distillation_path=true",
        "epochs=1",
    )
    result = run_pipeline(overrides, tmp_path)
    rows = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
    assert rows[-1]["teacher"] == "ensemble of stages assistant1_resnet8 + teacher (best)"
    resnet8, resnet14 = (
        build.count_parameters(build.build_model(compose([f"student={a}"]).student, 4, 3))
        for a in ("resnet8", "resnet14")
    )
    assert result["teacher_params"] == resnet8 + resnet14  # both members teach
