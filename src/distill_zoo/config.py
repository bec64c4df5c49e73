"""Where the Hydra config tree lives, the resolvers it uses, and composing it from code."""

from __future__ import annotations

import hashlib
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
"""The repository's ``conf/`` folder (the package is installed editable from the repo)."""

MAX_NAME_BYTES = 200

_STARTED = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def folder_name(override_dirname: str) -> str:
    """A folder name for a run's overrides: paths in them (teacher.ckpt=/a/b.ckpt) must not
    nest folders, and file systems refuse names over 255 bytes: long override lists keep
    their start plus a hash."""
    name = override_dirname.replace("/", "_") or "default"
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: MAX_NAME_BYTES - 11].decode(errors="ignore") + "-" + digest
    return name


def run_dir(root: str, override_dirname: str, resume: bool) -> str:
    """Output folder of a single run: ``<root>/<overrides or 'default'>/<start time>``.

    Runs are grouped by their command-line overrides so that ``resume=true`` with the same
    command can find the newest earlier run of that command and continue it in place; a run
    without ``resume`` always gets a new folder, so nothing saved earlier is overwritten.
    """
    group = Path(root) / folder_name(override_dirname)
    if resume and group.is_dir():
        earlier = sorted(p for p in group.iterdir() if _resumable(p))
        if earlier:
            return str(earlier[-1])
    return str(group / _STARTED)


def _resumable(folder: Path) -> bool:
    """A run with a checkpoint to continue, or a pipeline whose stages can be continued."""
    return (folder / "checkpoints" / "last.ckpt").is_file() or (folder / "pipeline.json").is_file()


def register_resolvers() -> None:
    """Registers the ``dz_*`` resolvers used in ``conf/`` (idempotent)."""
    if not OmegaConf.has_resolver("dz_run_dir"):
        OmegaConf.register_new_resolver("dz_run_dir", run_dir)
    if not OmegaConf.has_resolver("dz_folder_name"):
        OmegaConf.register_new_resolver("dz_folder_name", folder_name)
    if not OmegaConf.has_resolver("dz_interactive"):
        OmegaConf.register_new_resolver("dz_interactive", lambda: sys.stdout.isatty())


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Composes the config tree as the command line would, for tests, scripts and notebooks.

    Args:
        overrides: Hydra overrides, e.g. ``["distiller=kd", "distiller.temperature=2"]``.
        config_name: Top-level config in ``conf/``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        # Inside the running CLI app (a pipeline composing its stages): reuse its search path.
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
