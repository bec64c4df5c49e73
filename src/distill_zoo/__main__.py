"""Command line: ``python -m distill_zoo [overrides]`` (Hydra; ``--help`` lists the groups)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distill_zoo.config import CONF_DIR, register_resolvers

register_resolvers()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Runs one training (or, with ``-m``, one run of a sweep); returns best val top-1."""
    from distill_zoo import train

    metrics = train.run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return metrics["best_val_acc1"]


if __name__ == "__main__":
    main()
