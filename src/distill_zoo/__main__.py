"""Command line: ``python -m distill_zoo [overrides]`` (Hydra; ``--help`` lists the groups)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distill_zoo.config import CONF_DIR, register_resolvers

register_resolvers()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Runs one training, or the stages of ``pipeline=<name>`` (with ``-m``, one job of a
    sweep); returns the best value of the run's monitored metric (val top-1 for
    classification), of a pipeline's last stage."""
    from distill_zoo import train
    from distill_zoo.engine import launch
    from distill_zoo.pipelines import runner as pipeline

    _route_lightning_logs_through_hydra()
    launch.prepare_job(cfg)  # a joblib/submitit job: its own GPU, Lightning's environment
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.get("pipeline"):
        metrics = pipeline.run(cfg, run_dir, list(hydra_cfg.overrides.task))
    else:
        metrics = train.run(cfg, run_dir)
    if cfg.get("search"):  # hparams_search=arch_kd: accuracy traded against MACs or latency
        from distill_zoo.results import objective

        return objective.record(cfg, metrics, run_dir)
    # The monitored metric (best val top-1 for classification): what an Optuna search optimises.
    return metrics["best_val_" + metrics["monitor"].split("/", 1)[1]]


def _route_lightning_logs_through_hydra() -> None:
    # Lightning may attach its own console handler at import; Hydra's root handler already
    # prints and writes the run's log file, so every message would appear twice.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


if __name__ == "__main__":
    main()
