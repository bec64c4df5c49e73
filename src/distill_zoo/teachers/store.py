"""The on-demand teacher store: teachers trained once per (architecture, data, recipe), kept
under ``<teacher_store>/<arch>-<hash>/teacher.pt``.

The store only names, finds and saves teachers; training one on a miss is the training side's
job (:func:`distill_zoo.train.ensure_teacher`), so this module never imports the training loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from distill_zoo.teachers.checkpoints import extract_state_dict

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.pt"


def teacher_training_config(cfg: DictConfig) -> DictConfig:
    """The run config that trains ``cfg.teacher`` from scratch on ``cfg``'s data and recipe."""
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    teacher.pop("ckpt", None)
    # Unresolved until the seed is replaced, so nothing derived from the student's seed
    # leaks in: every student seed of a sweep shares one teacher, as in the KD literature.
    run_cfg = OmegaConf.to_container(cfg, resolve=False)
    run_cfg.update(
        student=teacher,
        teacher={},
        distiller={"_target_": "distill_zoo.distillers.CrossEntropyOnly"},
        seed=cfg.teacher_seed,
        resume=True,
        ckpt_path=None,
        init_from=None,
        pipeline=None,
        quantize=None,  # a teacher trained on demand is a float network
    )
    # The teacher cache and its replayed augmentations speed up distillation; the teacher
    # itself trains on fresh augmentations and has no teacher to cache.
    if isinstance(run_cfg.get("speed"), dict):
        run_cfg["speed"] = {**run_cfg["speed"], "teacher_cache": False}
    if isinstance(run_cfg.get("data"), dict) and "augment_rounds" in run_cfg["data"]:
        run_cfg["data"] = {**run_cfg["data"], "augment_rounds": None}
    return OmegaConf.create(run_cfg)


def teacher_key(run_cfg: DictConfig) -> str:
    """Cache key: architecture plus a hash of everything that changes the trained weights."""
    full = OmegaConf.to_container(run_cfg, resolve=True)
    recipe = {
        key: full.get(key) for key in ("student", "data", "optim", "sched", "epochs", "seed")
    }
    recipe["data"].pop("num_workers", None)
    recipe["precision"] = run_cfg.trainer.get("precision")
    digest = hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(recipe)).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(run_cfg.student.get("name", "teacher")))
    return f"{name}-{digest[:12]}"


@dataclass(frozen=True)
class StoreEntry:
    """Where the teacher of a run config lives in the store.

    Attributes:
        run_cfg: The run config that trains the teacher (:func:`teacher_training_config`).
        run_dir: The folder its training runs in (resumable after an interruption).
        file: ``teacher.pt``, the teacher's weights once trained.
    """

    run_cfg: DictConfig
    run_dir: Path
    file: Path

    @property
    def cached(self) -> bool:
        return self.file.is_file()


def entry(cfg: DictConfig) -> StoreEntry:
    """The store entry of the teacher ``cfg.teacher`` trained on ``cfg``'s data and recipe."""
    run_cfg = teacher_training_config(cfg)
    run_dir = Path(cfg.teacher_store).expanduser() / teacher_key(run_cfg)
    return StoreEntry(run_cfg, run_dir, run_dir / TEACHER_FILE)


def save(store_entry: StoreEntry, best_checkpoint: str | os.PathLike) -> Path:
    """Keeps the weights of ``best_checkpoint`` as the entry's ``teacher.pt``, atomically."""
    best = extract_state_dict(
        torch.load(best_checkpoint, map_location="cpu", weights_only=True),
        source=f"teacher checkpoint {best_checkpoint}",
    )
    cached = store_entry.file
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")  # one per DDP process
    torch.save(best, tmp)
    tmp.replace(cached)  # atomic: a crash never leaves a half-written teacher
    return cached
