"""Reading run folders: which folders below a directory are runs, their overrides, status
(finished, running, crashed), seed, validation curve and metrics, and a finished run's config
and evaluation data (for export, the compression report and the softened-prediction plot).
:mod:`distill_zoo.results.report` tabulates what this reads; :mod:`distill_zoo.results.plots`
draws it."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

IGNORED_OVERRIDES = ("seed", "resume", "ckpt_path", "output_root", "teacher_store")
DISTILLATION_KEYS = ("distiller", "teacher", "teacher_seed", "distill_epochs")
"""Override keys (and their sub-keys, ``distiller.temperature``) that say how a student is
taught: a method's group is compared with the vanilla group that agrees on all the others."""
VANILLA_DISTILLER = "CrossEntropyOnly"
STALE_AFTER_S = 600.0
PIPELINE_SUMMARY = "pipeline.json"
REPORT_FILES = ("report.md", "report.csv")
PLOTS = "plots"
FINISHED, RUNNING, CRASHED = "finished", "running", "crashed"
CLASSIFICATION = "classification"
"""The task of runs whose ``metrics.json`` and config name none (made before tasks existed)."""


# --- finding runs ----------------------------------------------------------------------------


def find_runs(root: Path) -> list[Path]:
    """Run folders below ``root`` (itself included), in path order: folders with a
    ``config.yaml`` or a ``.hydra/`` (a Hydra job that crashed before writing its config);
    pipeline folders are left out (their stages are runs)."""
    root = Path(root)
    found = set()
    for marker in ("config.yaml", ".hydra"):
        for path in root.rglob(marker):
            inside = path.relative_to(root).parts[:-1]
            # Not Hydra's copy, nor anything kept inside a run (checkpoints, export); a run
            # folder's own name may well contain "checkpoints" (teacher.ckpt=.../x.ckpt).
            if ".hydra" in inside or "checkpoints" in inside[-1:]:
                continue
            if marker == ".hydra" and not path.is_dir():
                continue
            found.add(path.parent)
    return sorted(p for p in found if not (p / PIPELINE_SUMMARY).is_file())


def find_pipelines(root: Path) -> list[Path]:
    """Pipeline folders below ``root`` (itself included)."""
    return sorted(p.parent for p in Path(root).rglob(PIPELINE_SUMMARY))


def stage_of(run: Path) -> list[str]:
    """``["stage=<folder>"]`` for a stage of a pipeline, else ``[]``."""
    return [f"stage={run.name}"] if (run.parent / PIPELINE_SUMMARY).is_file() else []


def _flatten(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else str(node)}


def _read_config(run: Path) -> dict:
    path = run / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def config_differences(runs: list[Path]) -> dict[Path, list[str]]:
    """``key=value`` for each config key whose value differs between ``runs``: the
    overrides of runs started from code (``train.run``), which Hydra did not record."""
    flat = {run: _flatten(_read_config(run)) for run in runs}
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if len({f.get(k) for f in flat.values()}) > 1]
    return {run: [f"{k}={f[k]}" for k in varying if k in f] for run, f in flat.items()}


def _recorded_overrides(run: Path) -> list[str] | None:
    path = run / ".hydra" / "overrides.yaml"
    return (yaml.safe_load(path.read_text()) or []) if path.is_file() else None


def overrides_of(run: Path, fallback: list[str] | None = None) -> list[str]:
    """The run's command-line overrides that define its group (seed and resume left out);
    ``fallback`` where Hydra recorded none."""
    items = _recorded_overrides(run)
    items = fallback if items is None else items
    kept = [o for o in items or [] if override_key(o) not in IGNORED_OVERRIDES]
    return sorted(kept, key=lambda o: (override_key(o).split("."), o))


def override_key(override: str) -> str:
    """``distiller.temperature`` of ``distiller.temperature=4`` (``+``/``~`` prefixes off)."""
    return override.split("=", 1)[0].lstrip("+~")


def is_distillation_key(key: str) -> bool:
    """Whether an override key says how a student is taught (see :data:`DISTILLATION_KEYS`)."""
    return key.split(".", 1)[0] in DISTILLATION_KEYS or key.startswith("speed.teacher")


def last_write(run: Path) -> float:
    """The newest modification time of any file the run wrote in ``run`` (the folder's own
    if none): this report's own outputs (``report.*``, ``plots/``) do not count."""
    newest = None
    for folder, subfolders, files in os.walk(run):
        if Path(folder) == run:
            subfolders[:] = [d for d in subfolders if d != PLOTS]
            files = [f for f in files if f not in REPORT_FILES]
        for name in files:
            try:
                written = os.stat(os.path.join(folder, name)).st_mtime
            except OSError:  # removed while we look (a checkpoint being replaced)
                continue
            newest = written if newest is None else max(newest, written)
    return run.stat().st_mtime if newest is None else newest


def training_curve(run: Path, column: str = "val/acc1") -> list[tuple[int, float]]:
    """``(epoch, value)`` pairs of ``column`` in the run's CSV logs (``logs/**/metrics.csv``),
    one per epoch (the last value logged in it), epochs counted from 1, sorted."""
    by_epoch: dict[int, float] = {}
    for path in sorted((run / "logs").rglob("metrics.csv")):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                value, epoch = row.get(column), row.get("epoch")
                if value in (None, "") or epoch in (None, ""):
                    continue
                number = float(value)
                if not math.isnan(number):
                    by_epoch[int(float(epoch)) + 1] = number
    return sorted(by_epoch.items())


def task_of_config(config) -> str:
    """The task a run config (a dict or DictConfig) trains: ``task.name``, else
    classification (configs written before tasks existed have no ``task``)."""
    node = config.get("task") if config is not None else None
    name = node.get("name") if hasattr(node, "get") else None
    return str(name) if name else CLASSIFICATION


def _task_of(config: dict, overrides: list[str]) -> str:
    """The task of a run without ``metrics.json``: its config's, else its ``task=`` override
    (a job that crashed before writing its config), else classification."""
    if config.get("task"):
        return task_of_config(config)
    named = [o.split("=", 1)[1] for o in overrides if override_key(o) == "task" and "=" in o]
    return named[-1] if named else CLASSIFICATION


@dataclass
class Run:
    """One run folder, read.

    Attributes:
        path: The folder.
        overrides: Its group: stage and command-line overrides, seed left out.
        status: ``finished`` (has ``metrics.json``), ``running`` or ``crashed``.
        metrics: The content of ``metrics.json`` (empty unless finished).
        seed: The run's seed (``None`` where neither its config nor overrides name one).
        vanilla: Whether the student was trained on labels alone (``distiller=none``,
            no label smoothing): the baseline of distillation gains.
        last_write: Newest modification time of anything in the folder (seconds since epoch).
        task: What the run trained for (``classification``, ``segmentation``, ``detection``,
            ``regression``): ``metrics.json``'s ``task``, else its config's ``task.name``,
            else classification (runs made before tasks existed).
    """

    path: Path
    overrides: tuple[str, ...]
    status: str
    metrics: dict
    seed: int | None
    vanilla: bool
    last_write: float
    task: str = CLASSIFICATION


def read_run(
    run: Path, fallback: list[str], now: float, stale_after_s: float = STALE_AFTER_S
) -> Run:
    """Reads one run folder; ``fallback`` are its overrides where Hydra recorded none."""
    config = _read_config(run)
    raw = _recorded_overrides(run) or []
    metrics_file = run / "metrics.json"
    if metrics_file.is_file():
        status, metrics = FINISHED, json.loads(metrics_file.read_text())
        written = metrics_file.stat().st_mtime
    else:
        written = last_write(run)
        status, metrics = (RUNNING if now - written < stale_after_s else CRASHED), {}
    seed = config.get("seed")
    if seed is None:
        seeds = [o.split("=", 1)[1] for o in raw if override_key(o) == "seed" and "=" in o]
        seed = int(seeds[-1]) if seeds and seeds[-1].lstrip("-").isdigit() else None
    distiller = config.get("distiller") or {}
    if "_target_" in distiller:
        vanilla = distiller["_target_"].rsplit(".", 1)[-1] == VANILLA_DISTILLER and not (
            distiller.get("label_smoothing")
        )
    else:
        vanilla = "distiller=none" in raw
    return Run(
        path=run,
        overrides=tuple(stage_of(run) + overrides_of(run, fallback=fallback)),
        status=status,
        metrics=metrics,
        seed=seed,
        vanilla=vanilla,
        last_write=written,
        task=str(metrics.get("task") or _task_of(config, raw)),
    )


# --- rebuilding a run's pieces ------------------------------------------------------------


def load_config(run_dir: Path) -> DictConfig:
    """The resolved config a run saved as ``config.yaml``."""
    return OmegaConf.load(Path(run_dir) / "config.yaml")


def evaluation_data(cfg: DictConfig):
    """The run's data module, set up, serving ready images from its loaders (the on-device
    path, its augmentation replay and loader workers switched off)."""
    from hydra.utils import instantiate

    node = OmegaConf.to_container(cfg.data, resolve=True)
    for key, value in (("on_device", False), ("augment_rounds", None), ("num_workers", 0)):
        if key in node:
            node[key] = value
    data = instantiate(node)
    data.prepare_data()
    data.setup("test")
    return data


def evaluation_batches(data, split: str = "test"):
    """The batches of ``data``'s ``split`` (``test`` or ``val``) as the model sees them, on the
    CPU: ``(inputs, targets, ...)``. In-memory data modules (digit scenes, tabular and pose
    data) load indices and build each batch in ``transfer_batch_to_device``; that is done
    here, so every task's data gives tensors."""
    import torch

    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    transfer = getattr(data, "transfer_batch_to_device", None)
    for batch in loader:
        if transfer is not None:
            batch = transfer(batch, torch.device("cpu"), 0)
        yield batch


def first_inputs(data, count: int, split: str = "test"):
    """The first ``count`` inputs of ``data``'s ``split`` (all of them if it has fewer), as one
    tensor: float images ``[N, C, H, W]`` or rows ``[N, F]`` of tabular data, or the token ids
    ``[N, L]`` of text data (``data.input_dtype``, kept as integers)."""
    import torch

    inputs = []
    for batch in evaluation_batches(data, split):
        inputs.append(batch[0])
        if sum(len(b) for b in inputs) >= count:
            break
    dtype = getattr(data, "input_dtype", torch.float32)
    return torch.cat(inputs)[:count].to(dtype)
