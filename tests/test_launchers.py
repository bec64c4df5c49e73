"""Sweeps through Hydra's launchers (joblib, submitit): each job's run folder, metrics.json and
returned value; the GPU each job of a local parallel sweep trains on; Lightning's environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

from distill_zoo.config import CONF_DIR, compose, register_resolvers
from distill_zoo.engine import launch
from distill_zoo.models import create_model

TESTS = Path(__file__).resolve().parent
RETURN_FILE = "return_value.json"


class RecordReturn:
    """A Hydra callback that writes each job's returned value into its run folder (what a
    sweeper such as Optuna receives)."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        folder = Path(config.hydra.runtime.output_dir)
        (folder / RETURN_FILE).write_text(json.dumps(job_return.return_value))


# ---------------------------------------------------------------- GPU pinning (pure)


@pytest.mark.parametrize(
    "job, count, expected", [(0, 4, [0]), (1, 4, [1]), (3, 4, [3]), (4, 4, [0]), (5, 2, [1])]
)
def test_job_k_trains_on_gpu_k_mod_n(job, count, expected):
    assert launch.pinned_devices(job, count, {"accelerator": "gpu", "devices": 1}) == expected
    assert launch.pinned_devices(job, count, {"accelerator": "auto", "devices": 1}) == expected


@pytest.mark.parametrize(
    "count, trainer",
    [
        (0, {"accelerator": "auto", "devices": 1}),  # a CPU machine
        (1, {"accelerator": "gpu", "devices": 1}),  # one GPU: nothing to spread
        (4, {"accelerator": "cpu", "devices": 1}),  # trainer=cpu
        (4, {"accelerator": "gpu", "devices": [2]}),  # the user's own choice
        (4, {"accelerator": "gpu", "devices": 2}),  # several devices per job
        (4, {"accelerator": "gpu", "devices": "auto"}),
    ],
)
def test_pinning_leaves_single_gpu_cpu_and_chosen_devices_alone(count, trainer):
    assert launch.pinned_devices(3, count, trainer) is None


def test_pinning_reads_the_composed_trainer_configs():
    for name, pinned in (("gpu", [1]), ("default", [1]), ("cpu", None), ("ddp", None)):
        trainer = compose([f"trainer={name}"]).trainer
        assert launch.pinned_devices(5, 4, trainer) == pinned, name


# ---------------------------------------------------------------- Lightning's environment

JOBLIB = {"_target_": launch.JOBLIB, "n_jobs": 2}
SLURM = {"_target_": launch.SUBMITIT_SLURM, "tasks_per_node": 1, "nodes": 1}
PLAIN = [{"_target_": launch.LIGHTNING_ENVIRONMENT}]


@pytest.mark.parametrize(
    "launcher, trainer, plain",
    [
        (JOBLIB, {"devices": 1}, True),
        (JOBLIB, {"devices": [3]}, True),  # pinned
        (SLURM, {"devices": 1}, True),
        (SLURM, {"devices": 2}, False),  # DDP in one task: Lightning refuses, as it should
        ({**SLURM, "tasks_per_node": 4}, {"devices": 4}, False),  # DDP across SLURM tasks
        ({**SLURM, "nodes": 2}, {"devices": 1}, False),
        (JOBLIB, {"devices": 1, "plugins": ["x"]}, False),  # the user's plugins
        ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, {}, False),
    ],
)
def test_one_process_jobs_use_lightnings_plain_environment(launcher, trainer, plain):
    expected = {"plugins": PLAIN} if plain else None
    assert launch.one_process_environment(launcher, trainer) == expected


def test_settings_become_overrides_that_compose():
    overrides = launch.trainer_overrides({"devices": [1], "plugins": PLAIN})
    assert overrides == [
        "++trainer.devices=[1]",
        f"++trainer.plugins=[{{_target_:{launch.LIGHTNING_ENVIRONMENT}}}]",
    ]
    trainer = compose(overrides).trainer
    assert list(trainer.devices) == [1]
    assert OmegaConf.to_container(trainer.plugins) == PLAIN


@pytest.mark.parametrize(
    "rank, node, leads", [(0, None, True), (1, None, False), (0, "1", False), (0, "0", True)]
)
def test_rank_zero_of_node_zero_leads_its_job(monkeypatch, rank, node, leads):
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank)
    monkeypatch.delenv("GROUP_RANK", raising=False)
    if node is None:
        monkeypatch.delenv("NODE_RANK", raising=False)
    else:
        monkeypatch.setenv("NODE_RANK", node)
    assert launch.leads_its_job() is leads


def test_slurm_gpu_preset_asks_one_gpu_per_job():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `launch` extra")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(
            "train", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == launch.SUBMITIT_SLURM
    assert launcher.gpus_per_node == launcher.tasks_per_node == launcher.nodes == 1
    for key in ("partition", "timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"):
        assert key in launcher, key
    assert launch.one_process_environment(launcher, compose(["trainer=gpu"]).trainer)


# ---------------------------------------------------------------- sweeps through the launchers


def write_teacher(folder: Path) -> Path:
    """A random resnet14 for the synthetic data: the sweeps test launchers, not teachers."""
    torch.manual_seed(0)
    path = folder / "teacher.pt"
    torch.save(create_model("resnet14", num_classes=4, in_channels=3).state_dict(), path)
    return path


def sweep(tmp_path: Path, *launcher: str, env: dict | None = None) -> Path:
    """Runs a 2-job seed sweep through ``launcher`` and returns its folder."""
    folder = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_zoo",
            "-m",
            *launcher,
            *TINY,
            "epochs=1",
            "report_compression=false",
            f"teacher.ckpt={write_teacher(tmp_path)}",
            f"hydra.sweep.dir={folder}",
            f"+hydra.callbacks.returns._target_={__name__}.RecordReturn",
            "seed=0,1",
        ],
        cwd=tmp_path,
        env={
            **os.environ,
            **(env or {}),
            "HYDRA_FULL_ERROR": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return folder


def check_jobs(folder: Path) -> list[dict]:
    """Each job ran in its own override-named folder of the sweep, wrote its metrics and
    returned its best validation top-1; returns the jobs' configs."""
    configs = []
    for seed in (0, 1):
        (run,) = [p for p in folder.iterdir() if p.is_dir() and f"seed={seed}" in p.name]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["epochs"] == 1
        assert json.loads((run / RETURN_FILE).read_text()) == metrics["best_val_acc1"]
        assert metrics["best_checkpoint"].startswith(str(run))
        configs.append(OmegaConf.load(run / "config.yaml"))
        assert configs[-1].seed == seed
    return configs


# An allocation of several tasks (sbatch --ntasks=2) around a local sweep: Lightning's SLURM
# detection would refuse to build even a one-GPU Trainer ("--ntasks=2 ... is not supported").
ALLOCATION = {
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "sweep",
}


def test_submitit_local_sweep_inside_a_slurm_allocation(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `launch` extra")
    folder = sweep(tmp_path, "hydra/launcher=submitit_local", env=ALLOCATION)
    for config in check_jobs(folder):
        assert OmegaConf.to_container(config.trainer.plugins) == PLAIN
    assert list(folder.glob(".submitit/*/*_result.pkl"))  # submitit ran them


@pytest.mark.slow
def test_joblib_sweep_inside_a_slurm_allocation(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs the `launch` extra")
    folder = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", env=ALLOCATION)
    for config in check_jobs(folder):
        assert OmegaConf.to_container(config.trainer.plugins) == PLAIN
