"""Teachers: load a checkpoint safely, or train one on demand and cache it by config hash."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from distill_zoo.quantize import is_range_key

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.pt"


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model weights inside a loaded checkpoint, whatever its common layout.

    Understands this project's Lightning checkpoints (the ``student.`` weights of the run),
    other Lightning checkpoints (``state_dict``), plain state dicts, and the ``{"model": ...}``
    / ``{"net": ...}`` files that published KD code bases ship. A ``module.`` prefix left by
    ``DataParallel``/DDP is removed.
    """
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, Tensor) for v in obj.values())
    ):
        raise ValueError(
            f"{source} holds no state dict: expected a Lightning checkpoint, a plain state dict, "
            "or a dict with a 'model', 'net' or 'state_dict' entry"
        )
    if any(k.startswith("student.") for k in obj):
        obj = {k.removeprefix("student."): v for k, v in obj.items() if k.startswith("student.")}
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def read_checkpoint(
    path: str | os.PathLike, role: str = "teacher", config_key: str | None = None
) -> dict:
    """The object in the checkpoint file at ``path``, read with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names ``config_key``).
        RuntimeError: the file cannot be read (corrupt, truncated, not a torch file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        key = config_key or f"{role}.ckpt"
        hint = f", or {key}=null to train the {role} on demand" if role == "teacher" else ""
        raise FileNotFoundError(
            f"{role} checkpoint {path} does not exist: pass {key}=<path to a .ckpt/.pt file>{hint}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"cannot read {role} checkpoint {path}: the file is corrupt, truncated or not a "
            f"PyTorch checkpoint of tensors ({type(err).__name__}: {err})"
        ) from err


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    role: str = "teacher",
    config_key: str | None = None,
    loaded: object | None = None,
) -> nn.Module:
    """Loads the checkpoint at ``path`` into ``model`` (``weights_only=True``), strictly.

    ``loaded`` is the file's content when the caller has already read it
    (:func:`read_checkpoint`); ``path`` then only names it in errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the file cannot be read (corrupt, truncated, not a torch file).
        ValueError: the weights do not fit ``model`` (other architecture or class count).
    """
    path = Path(path).expanduser()
    obj = read_checkpoint(path, role, config_key) if loaded is None else loaded
    state = extract_state_dict(obj, source=f"{role} checkpoint {path}")
    own = model.state_dict()
    # A quantized student's input ranges are absent from float checkpoints and vice versa.
    missing = sorted(k for k in set(own) - set(state) if not is_range_key(k))
    unexpected = sorted(k for k in set(state) - set(own) if not is_range_key(k))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", wrong_shape),
            )
            if items
        )
        raise ValueError(
            f"{role} checkpoint {path} does not fit {type(model).__name__}: {details}. "
            f"Check that {role.split()[0]}=<arch> names the architecture the checkpoint was "
            "trained as, and that the data set has the same number of classes"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model


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


def cached_teacher(cfg: DictConfig) -> Path:
    """The file of the teacher ``cfg.teacher`` trained on ``cfg``'s data and recipe, trained
    now (with ``distiller=none``) unless an earlier run cached it.

    Teachers live under ``<teacher_store>/<arch>-<hash>/teacher.pt``; an interrupted teacher
    training resumes from its last checkpoint.
    """
    from distill_zoo import train  # late import: train uses this module

    run_cfg = teacher_training_config(cfg)
    run_dir = Path(cfg.teacher_store).expanduser() / teacher_key(run_cfg)
    cached = run_dir / TEACHER_FILE
    if not cached.is_file():
        log.info(
            "No teacher.ckpt given: training teacher %s once, cached in %s",
            run_cfg.student.name,
            run_dir,
        )
        metrics = train.run(run_cfg, run_dir)
        best = extract_state_dict(
            torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
        )
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")  # one per DDP process
        torch.save(best, tmp)
        tmp.replace(cached)  # atomic: a crash never leaves a half-written teacher
    else:
        log.info("Using cached teacher %s", cached)
    return cached


def train_or_load_cached(cfg: DictConfig, model: nn.Module) -> nn.Module:
    """Fills ``model`` with the teacher of :func:`cached_teacher`, training it once."""
    return load_weights(model, cached_teacher(cfg))
