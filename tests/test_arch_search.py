"""hparams_search=arch_kd: the searchable student, the MnasNet objective, the Pareto front,
the report's search figure, and a 2-trial search end to end."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_plots import assert_png
from test_report import acc, make_run

from distill_zoo.config import CONF_DIR, register_resolvers
from distill_zoo.config import compose as compose_run
from distill_zoo.models import ZOO_NAMES, create_model
from distill_zoo.models.search_space import architecture_name, searchable_model
from distill_zoo.results import objective
from distill_zoo.results.objective import mnas_objective, pareto_front, search_value
from distill_zoo.results.report import main as report_main
from distill_zoo.results.search_plot import search_figure
from distill_zoo.results.search_report import front, search_trials
from distill_zoo.results.table import collect


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def student(*overrides):
    return compose_run(["student=searchable", *overrides]).student


# --- the searchable student ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, name, same_as",
    [
        ([], "resnet20", "resnet20"),  # the config's default: depth 20, width 1
        (["student.depth=null", "student.blocks=1", "student.width=4"], "resnet8x4", "resnet8x4"),
        (["student.family=wrn", "student.depth=16", "student.width=2"], "wrn_16_2", "wrn_16_2"),
        (["student.family=wrn", "student.depth=null", "student.blocks=6"], "wrn_40_1", "wrn_40_1"),
        (["student.family=mobilenetv2", "student.width=4"], "mobilenetv2", "mobilenetv2"),
        (["student.family=shufflenetv2"], "shufflenetv2", "shufflenetv2"),
    ],
)
def test_families_build_the_zoo_network_with_its_feature_layers(overrides, name, same_as):
    node = student(*overrides)
    assert architecture_name(node.family, node.depth, node.blocks, node.width) == name
    model = searchable_model(
        node.family, 10, 3, depth=node.depth, blocks=node.blocks, width=node.width
    )
    assert n_params(model) == n_params(create_model(same_as, 10))
    zoo = OmegaConf.load(CONF_DIR / "student" / f"{same_as}.yaml")
    assert list(node.feature_layers) == list(zoo.feature_layers)
    for layer in node.feature_layers:
        model.get_submodule(layer)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_resnet_widths_scale_with_a_32_channel_stem_cap():
    model = searchable_model("cifar_resnet", 10, blocks=1, width=0.5)
    assert model.conv1.out_channels == 8 and model.fc.in_features == 32
    assert architecture_name("cifar_resnet", blocks=1, width=0.5) == "resnet8x0.5"
    wide = searchable_model("cifar_resnet", 10, depth=8, width=2)
    assert wide.conv1.out_channels == 32 and wide.fc.in_features == 128


def test_torchvision_family_and_its_feature_layers():
    node = student("student.family=resnet18")
    assert list(node.feature_layers) == ["layer1", "layer2", "layer3", "layer4"]
    model = searchable_model("resnet18", 10, 1).eval()  # a 1-channel stem, random weights
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
    assert student("student.family=squeezenet1_0").feature_layers is None  # outside the table


def test_every_zoo_model_has_its_feature_layers_in_the_table():
    table = OmegaConf.load(CONF_DIR / "student" / "searchable.yaml").searchable_feature_layers
    for name in ZOO_NAMES:
        zoo = OmegaConf.load(CONF_DIR / "student" / f"{name}.yaml")
        assert list(table[name]) == list(zoo.feature_layers), name


@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        ("resnet", {"depth": 20}, "Unknown student family 'resnet'. Choose cifar_resnet or wrn"),
        ("cifar_resnet", {"depth": 21}, "depth of the form 6n+2"),
        ("cifar_resnet", {"depth": 2}, "depth of the form 6n+2"),
        ("wrn", {"depth": 20}, "depth of the form 6n+4"),
        ("wrn", {"depth": 16, "blocks": 2}, "not both"),
        ("cifar_resnet", {}, "not neither"),
        ("wrn", {"blocks": 0}, "blocks must be a whole number >= 1"),
        ("wrn", {"depth": 16, "width": 1.5}, "whole widen factor"),
        ("cifar_resnet", {"depth": 20, "width": 0.3}, "16*w a whole number"),
    ],
)
def test_bad_settings_fail_naming_the_fix(family, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        searchable_model(family, 10, **kwargs)


# --- the objective ---------------------------------------------------------------------------


def test_mnas_objective_by_hand():
    assert mnas_objective(0.7, 40e6, 40e6, -0.07) == pytest.approx(0.7)
    assert mnas_objective(0.7, 80e6, 40e6, -0.07) == pytest.approx(0.7 * 2**-0.07)  # 0.6667
    assert mnas_objective(0.7, 10e6, 40e6, -0.07) == pytest.approx(0.7 * 4**0.07)  # 0.7703
    assert mnas_objective(0.5, 123.0, 1.0, 0.0) == 0.5
    with pytest.raises(ValueError, match="use w <= 0"):
        mnas_objective(0.7, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="must be positive"):
        mnas_objective(0.7, 0.0, 1.0, -0.07)


SETTINGS = {"objective": "mnas", "cost": "macs", "target_macs": 40e6, "target_latency_ms": 2.0}
METRICS = {
    "task": "classification",
    "monitor": "val/acc1",
    "best_val_acc1": 0.8,
    "test_acc1_best": 0.1,  # never used
    "compression": {
        "student": {"params": 5, "macs_per_image": 20e6, "cpu_latency_ms_batch1": 4.0}
    },
}


def test_search_value_scores_best_val_against_macs_or_latency():
    by_macs = search_value({**SETTINGS, "w": -0.07}, METRICS)
    assert by_macs["value"] == pytest.approx(0.8 * 0.5**-0.07)
    assert by_macs["accuracy"] == 0.8 and by_macs["accuracy_key"] == "best_val_acc1"
    assert by_macs["macs_per_image"] == 20e6 and by_macs["target"] == 40e6
    by_latency = search_value({**SETTINGS, "cost": "latency", "w": -0.1}, METRICS)
    assert by_latency["value"] == pytest.approx(0.8 * 2.0**-0.1)
    assert by_latency["target"] == 2.0
    plain = search_value(
        {"objective": "accuracy", "cost": "macs"}, {**METRICS, "compression": None}
    )
    assert plain["value"] == 0.8 and plain["macs_per_image"] is None


@pytest.mark.parametrize(
    "settings, metrics, message",
    [
        ({"objective": "flops"}, METRICS, "choose one of accuracy, mnas"),
        ({"cost": "energy"}, METRICS, "choose one of macs, latency"),
        ({**SETTINGS, "w": -0.07}, {**METRICS, "compression": None}, "report_compression=true"),
        ({**SETTINGS, "w": -0.07}, {**METRICS, "best_val_acc1": None}, "never validated"),
        (
            {**SETTINGS, "w": -0.07},
            {"task": "regression", "monitor": "val/mae", "best_val_mae": 0.1},
            "val/mae is an error",
        ),
    ],
)
def test_search_value_refuses_what_it_cannot_score(settings, metrics, message):
    with pytest.raises(ValueError, match=message):
        search_value(settings, metrics)


def test_record_writes_the_trial_and_returns_its_value(tmp_path):
    cfg = OmegaConf.create(
        {
            "search": {**SETTINGS, "w": -0.07},
            "student": {**student("student.family=wrn", "student.depth=16")},
            "teacher": {"name": "resnet56"},
        }
    )
    value = objective.record(cfg, METRICS, tmp_path)
    saved = json.loads((tmp_path / "search.json").read_text())
    assert value == pytest.approx(saved["value"]) and saved["architecture"] == "wrn_16_1"
    assert saved["teacher"] == "resnet56" and saved["family"] == "wrn"


# --- the Pareto front ------------------------------------------------------------------------


def test_pareto_front_by_hand_with_ties():
    points = [
        (10, 0.50),  # 0: front (tied with 6)
        (20, 0.60),  # 1: front (tied with 2)
        (20, 0.60),  # 2: front
        (15, 0.50),  # 3: no: 0 has fewer MACs and the same accuracy
        (30, 0.55),  # 4: no: 1 is cheaper and better
        (5, 0.40),  # 5: front: the cheapest
        (10, 0.50),  # 6: front
        (10, 0.45),  # 7: no: 0 has the same MACs and a higher accuracy
        (40, 0.70),  # 8: front: the most accurate
    ]
    assert pareto_front(points) == [5, 0, 6, 1, 2, 8]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.1)]) == [0]


# --- the report ------------------------------------------------------------------------------


def make_trial(root, name, teacher, arch, macs, val, *, teacher_val=None):
    """A finished search trial as arch_kd leaves it (search.json beside metrics.json)."""
    overrides = ["hparams_search=arch_kd", f"teacher={teacher}", f"student.family={arch}"]
    metrics = {**acc(val, teacher=0.9), "compression": {"student": {"macs_per_image": macs}}}
    run = make_run(root, name, overrides, metrics, curve=[val])
    if teacher_val is not None:  # as the CSV logger writes val/teacher_acc1
        csv = run / "logs" / "csv" / "metrics.csv"
        csv.write_text(f"epoch,step,val/acc1,val/teacher_acc1\n0,4,{val},{teacher_val}\n")
    record = {"architecture": arch, "teacher": teacher, "accuracy": val}
    record.update(accuracy_key="best_val_acc1", macs_per_image=macs, objective="mnas")
    record.update(cost="macs", target=40e6, w=-0.07, value=val * (macs / 40e6) ** -0.07)
    (run / "search.json").write_text(json.dumps(record))
    return run


@pytest.fixture
def two_searches(tmp_path):
    """Two teachers' searches under one folder; resnet56's front: resnet8, resnet20 (tied
    with a second resnet20), wrn_16_2; wrn_40_2's: wrn_16_1."""
    root = tmp_path / "arch_kd"
    for name, arch, macs, val in [
        ("trial_0", "resnet8", 12e6, 0.60),
        ("trial_1", "resnet20", 41e6, 0.68),
        ("trial_2", "resnet20", 41e6, 0.68),
        ("trial_3", "resnet32", 70e6, 0.66),
        ("trial_4", "wrn_16_2", 101e6, 0.71),
    ]:
        make_trial(root / "resnet56", name, "resnet56", arch, macs, val, teacher_val=0.73)
    make_trial(root / "wrn_40_2", "trial_0", "wrn_40_2", "wrn_16_1", 27e6, 0.69)
    make_trial(root / "wrn_40_2", "trial_1", "wrn_40_2", "resnet32", 70e6, 0.65)
    make_run(root / "other", "plain_kd", ["distiller=kd"], acc(0.5))  # no search.json
    return root


def test_report_lists_each_teachers_front_and_draws_the_cloud(two_searches, capsys):
    report = collect(two_searches)
    trials = search_trials(report)
    assert len(trials) == 7
    by_teacher = {}
    for trial in trials:
        by_teacher.setdefault(trial.teacher, []).append(trial)
    assert [t.run.path.name for t in front(by_teacher["resnet56"])] == [
        "trial_0",
        "trial_1",
        "trial_2",
        "trial_4",
    ]
    assert [t.record["architecture"] for t in front(by_teacher["wrn_40_2"])] == ["wrn_16_1"]
    path = search_figure(report, two_searches / "cloud.png")
    assert_png(path)

    report_main([str(two_searches)])
    text = (two_searches / "report.md").read_text()
    section = text.split("## Architecture search", 1)[1]
    assert "### teacher=resnet56 (val top-1 73.00%)" in section
    assert "### teacher=wrn_40_2 (test top-1 90.00%)" in section  # no logged val: its test
    assert "| resnet56/trial_4 | wrn_16_2 | 101.00M |" in section
    assert "resnet56/trial_3" not in section.split("Architectures trained")[0]
    assert "Architectures trained more than once: resnet20 (resnet56/trial_1, " in section
    assert (two_searches / "plots" / "search_pareto.png").is_file()


def test_no_search_trials_no_section_and_no_figure(tmp_path):
    make_run(tmp_path / "sweep", "kd", ["distiller=kd"], acc(0.5))
    report = collect(tmp_path / "sweep")
    assert search_figure(report, tmp_path / "cloud.png") is None
    report_main([str(tmp_path / "sweep")])
    assert "Architecture search" not in (tmp_path / "sweep" / "report.md").read_text()


# --- the preset, and a search end to end -----------------------------------------------------


def test_preset_searches_family_blocks_width_with_seeded_tpe():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `search` extra")
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            "train",
            overrides=["hparams_search=arch_kd", "teacher=wrn_40_2"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 0 and sweeper.direction == "maximize"
    assert (
        sweeper.n_trials == 20
        and OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "trial_${hydra:job.num}"
    )
    assert sorted(sweeper.params) == ["student.blocks", "student.family", "student.width"]
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert cfg.distiller._target_.endswith("KD") and cfg.teacher.name == "wrn_40_2"
    assert cfg.student.depth is None and cfg.student.blocks == 3
    assert dict(cfg.search) == {
        "objective": "mnas",
        "cost": "macs",
        "target_macs": 40818944,
        "target_latency_ms": 3.4,
        "w": -0.07,
    }
    # every combination the sweep can sample builds (no trial fails on its settings)
    for family in ("cifar_resnet", "wrn", "mobilenetv2", "shufflenetv2"):
        for blocks in (1, 5):
            for width in (1, 2, 4):
                architecture_name(family, blocks=blocks, width=width)
    # the target is resnet20's MACs at 32x32 and 100 classes, as counted for the report
    from distill_zoo.shipping.compression import count_macs

    macs = count_macs(create_model("resnet20", 100).eval(), torch.zeros(1, 3, 32, 32))
    assert macs == cfg.search.target_macs


@pytest.mark.slow  # ~35 s: two trials through Optuna and a teacher trained on demand
def test_two_trial_search_scores_trials_and_reports_the_cloud(tmp_path, teacher_store):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `search` extra")
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_zoo",
            "-m",
            "hparams_search=arch_kd",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
            *[o for o in TINY if not o.startswith("student=")],  # the search picks students
            "epochs=1",
            f"teacher_store={teacher_store}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert sorted(results["best_params"]) == ["student.blocks", "student.family", "student.width"]
    records = []
    for trial in ("trial_0", "trial_1"):
        record = json.loads((sweep / trial / "search.json").read_text())
        metrics = json.loads((sweep / trial / "metrics.json").read_text())
        assert record["accuracy"] == metrics["best_val_acc1"]  # validation, never test
        macs = metrics["compression"]["student"]["macs_per_image"]
        assert record["macs_per_image"] == macs
        expected = record["accuracy"] * (macs / 40818944) ** -0.07
        assert math.isclose(record["value"], expected, rel_tol=1e-9)
        records.append(record)
    assert results["best_value"] == pytest.approx(max(r["value"] for r in records))
    report_main([str(sweep)])
    assert_png(sweep / "plots" / "search_pareto.png")
    assert "## Architecture search" in (sweep / "report.md").read_text()
