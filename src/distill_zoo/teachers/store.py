"""The on-demand teacher store: teachers trained once per (architecture, data, recipe), kept
under ``<teacher_store>/<arch>-<hash>/teacher.pt``.

The store only names, finds and saves teachers; training one on a miss is the training side's
job (:func:`distill_zoo.train.ensure_teacher`), so this module never imports the training loop.
Jobs of a sweep that need the same teacher at once take turns through :func:`lock`: the first
trains it, the others wait and then load it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
        # Teachers usually train longer than their students; null: the students' epochs.
        epochs=cfg.get("teacher_epochs") or cfg.epochs,
        resume=True,
        ckpt_path=None,
        init_from=None,
        pipeline=None,
        quantize=None,  # a teacher trained on demand is a float network
        prune=None,  # ... and an unpruned one
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


LOCK_SUFFIX = ".lock"
UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}
"""``flock`` errors of file systems without locks (some NFS and Lustre mounts)."""


def lock_file(store_entry: StoreEntry) -> Path:
    """``<teacher_store>/.<arch>-<hash>.lock``: beside the entry's run folder, not in it, and
    hidden, so that listing the store's entries (``<arch>-*``) lists teachers only."""
    return store_entry.run_dir.with_name(f".{store_entry.run_dir.name}{LOCK_SUFFIX}")


@contextmanager
def lock(store_entry: StoreEntry) -> Iterator[None]:
    """Holds the entry's lock while the teacher is trained, so that of several processes that
    need it at once (the jobs of a sweep) one trains it and the others wait, then re-check
    :attr:`StoreEntry.cached`.

    An exclusive ``flock`` on :func:`lock_file`: the operating system releases it when its
    holder exits or dies, so a crashed training never blocks the store (the next process
    continues that training from its ``last.ckpt``). The lock file itself stays, empty. On a
    file system without ``flock`` (some NFS or Lustre mounts) it warns and locks nothing.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; processes may each train the teacher
        yield
        return
    path = lock_file(store_entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        locked = _flock(handle, path, store_entry)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _flock(handle, path: Path, store_entry: StoreEntry) -> bool:
    """Takes the exclusive lock of ``handle``, saying so while another process holds it;
    ``False`` where the file system cannot lock."""
    import fcntl

    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(
                "Waiting for another process that trains teacher %s (it holds %s)",
                store_entry.run_dir.name,
                path,
            )
            began = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("Teacher lock %s acquired after %.0f s", path, time.perf_counter() - began)
    except OSError as err:
        if err.errno not in UNSUPPORTED:
            raise
        log.warning(
            "The file system of %s cannot lock files (%s): processes that need this teacher "
            "at the same time may each train it",
            path,
            err,
        )
        return False
    return True
