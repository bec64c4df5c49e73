"""One job of a sweep that a Hydra launcher runs (``hydra/launcher=joblib``, ``submitit_local``,
``submitit_slurm``): which GPU it trains on, and which cluster environment Lightning reads.

The launchers are Hydra's plugins; this module only fits each job to them:

- jobs that run side by side on one machine (joblib, submitit's local executor) would all
  take GPU 0: job ``k`` trains on GPU ``k mod n`` of the ``n`` it sees instead;
- a job that is one process on one device uses Lightning's plain ``LightningEnvironment``,
  so SLURM variables (the job's own, or those of the allocation a local sweep runs in) never
  make Lightning treat it as one rank of a multi-process DDP run. Jobs with several devices
  (``tasks_per_node`` > 1: one task per GPU) keep Lightning's SLURM detection, which they need.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
SIDE_BY_SIDE = (JOBLIB, SUBMITIT_LOCAL)
"""Launchers that run several jobs at once on this machine."""

LIGHTNING_ENVIRONMENT = "lightning.fabric.plugins.environments.LightningEnvironment"
GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def pinned_devices(job_num: int, device_count: int, trainer: Mapping) -> list[int] | None:
    """The GPU of job ``job_num`` when jobs run side by side on one machine: ``[k mod n]``.

    Args:
        job_num: The job's number in the sweep (``hydra.job.num``).
        device_count: The GPUs this process sees (``torch.cuda.device_count()``).
        trainer: The run's ``trainer`` config.

    Returns:
        ``trainer.devices`` for this job, or ``None`` to leave the config as it is: one GPU or
        none, a CPU accelerator, or ``devices`` other than 1 (a list the user chose, several
        devices or ``auto``, which are no longer one GPU per job).
    """
    if device_count < 2 or str(trainer.get("accelerator", "auto")) not in GPU_ACCELERATORS:
        return None
    devices = trainer.get("devices", "auto")
    if isinstance(devices, bool) or str(devices) != "1":
        return None
    return [job_num % device_count]


def one_process_environment(launcher: Mapping, trainer: Mapping) -> dict | None:
    """``trainer.plugins`` of a job that is one process on one device: Lightning's plain
    environment, in place of the SLURM environment Lightning would detect.

    Args:
        launcher: The sweep's ``hydra.launcher`` config.
        trainer: The run's ``trainer`` config.

    Returns:
        The plugins to set, or ``None``: not a joblib/submitit job, a job of several tasks or
        nodes (DDP across SLURM tasks needs the SLURM environment), several devices, or
        plugins the user chose.
    """
    target = launcher.get("_target_")
    if target not in (*SIDE_BY_SIDE, SUBMITIT_SLURM) or trainer.get("plugins"):
        return None
    if int(launcher.get("tasks_per_node") or 1) != 1 or int(launcher.get("nodes") or 1) != 1:
        return None
    devices = trainer.get("devices", "auto")
    one_device = str(devices) == "1" or (
        not isinstance(devices, str | int) and len(list(devices)) == 1
    )
    if not one_device or int(trainer.get("num_nodes") or 1) != 1:
        return None
    return {"plugins": [{"_target_": LIGHTNING_ENVIRONMENT}]}


def leads_its_job() -> bool:
    """Whether this process is rank 0 of its run (or the run's only process): the one that
    takes the teacher store's lock. Other ranks train a teacher along with their rank 0."""
    from lightning.pytorch.utilities import rank_zero_only

    node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    return rank_zero_only.rank == 0 and node == 0


def prepare_job(cfg: DictConfig) -> None:
    """Fits ``cfg`` (in place) to the launcher running this job: pins its GPU, and picks
    Lightning's environment (:func:`pinned_devices`, :func:`one_process_environment`).

    A pipeline composes its stages from the command's overrides, so the same settings are
    added to them too. Does nothing outside a joblib/submitit sweep.
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    launcher = hydra_cfg.get("launcher") or {}
    if launcher.get("_target_") not in (*SIDE_BY_SIDE, SUBMITIT_SLURM):
        return
    settings: dict = {}
    if launcher.get("_target_") in SIDE_BY_SIDE:
        import torch

        job = int(hydra_cfg.job.get("num") or 0)
        devices = pinned_devices(job, torch.cuda.device_count(), cfg.trainer)
        if devices is not None:
            settings["devices"] = devices
            log.info(
                "Job %d of the sweep trains on GPU %d of the %d visible",
                job,
                devices[0],
                torch.cuda.device_count(),
            )
    with open_dict(cfg):
        cfg.trainer.update(settings)
        environment = one_process_environment(launcher, cfg.trainer)
        if environment:
            cfg.trainer.update(environment)
            settings.update(environment)
    if settings and cfg.get("pipeline"):
        with read_write(hydra_cfg.overrides), open_dict(hydra_cfg.overrides):
            hydra_cfg.overrides.task.extend(trainer_overrides(settings))


def trainer_overrides(settings: dict) -> list[str]:
    """``settings`` of ``trainer`` as command-line overrides (``++trainer.devices=[1]``)."""
    return [f"++trainer.{key}={_override_value(value)}" for key, value in settings.items()]


def _override_value(value) -> str:
    """A value in Hydra's override syntax (lists and dicts of plain values)."""
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    return str(value)
