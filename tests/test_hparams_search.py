"""conf/hparams_search/: Optuna sweeper presets that maximise the best validation top-1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distill_zoo.config import CONF_DIR, register_resolvers

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `search` extra")

PRESETS = {
    "kd_optuna": ("kd", ["distiller.temperature", "distiller.kd_weight", "distiller.ce_weight"]),
    "fitnets_optuna": (
        "fitnets",
        ["distiller.kd_temperature", "distiller.kd_weight", "distiller.weight"],
    ),
}


def choose(preset: str) -> str:
    return f"hparams_search={preset}"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_sweeps_existing_keys_with_seeded_tpe_maximising(preset):
    distiller, keys = PRESETS[preset]
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[choose(preset)], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 0 and sweeper.direction == "maximize"
    assert sweeper.n_trials == 20 and sweeper.n_jobs == 1
    assert sorted(sweeper.params) == sorted(keys)
    assert cfg.distiller._target_.lower().endswith(distiller)
    for key in keys:  # a typo in a swept key would make every trial fail
        assert OmegaConf.select(cfg, key) is not None, key
    assert sweeper.params[keys[0]] == "interval(1.0, 16.0)"  # float temperatures
    if preset == "fitnets_optuna":
        assert sweeper.params["distiller.weight"].startswith("tag(log, interval(")


@pytest.mark.slow
def test_two_trial_search_writes_best_params(tmp_path, teacher_store):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_zoo",
            "-m",
            choose("kd_optuna"),
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
            *TINY,
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
    assert sorted(results["best_params"]) == sorted(PRESETS["kd_optuna"][1])
    assert 1.0 <= results["best_params"]["distiller.temperature"] <= 16.0
    trials = sorted(p.name for p in sweep.glob("trial_*") if (p / "metrics.json").is_file())
    assert trials == ["trial_0", "trial_1"]
    best = max(
        json.loads(Path(sweep, t, "metrics.json").read_text())["best_val_acc1"] for t in trials
    )
    assert results["best_value"] == pytest.approx(best)  # the objective: best val top-1
