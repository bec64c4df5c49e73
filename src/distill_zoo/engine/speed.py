"""The fast paths of ``conf/speed/``: the teacher-output cache, torch.compile, peak memory."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from distill_zoo.teachers.cache import TeacherOutputCache
from distill_zoo.teachers.ensemble import TeacherRoute

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags of native bfloat16 arithmetic; without them a CPU emulates bf16, slowly."""


def native_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The native-bf16 flags this CPU reports (empty without them, or without ``cpuinfo``)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for flag in NATIVE_BF16_FLAGS if f" {flag}" in text}


def warn_if_bf16_is_emulated(cfg: DictConfig, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Warns when ``cfg`` asks for bf16 (``trainer.precision=bf16*``, ``speed.teacher_bf16``)
    on a CPU run whose CPU has no native bf16: there it runs at a fraction of fp32's speed
    (0.3-0.9x measured on a 2-core Xeon without AVX512-BF16/AMX), not faster. Returns whether
    it warned."""
    precision = str(cfg.trainer.get("precision", ""))
    asked = [f"trainer.precision={precision}"] if "bf16" in precision else []
    if (cfg.get("speed") or {}).get("teacher_bf16"):
        asked.append("speed.teacher_bf16=true")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not asked or not on_cpu or native_bf16_flags(cpuinfo):
        return False
    log.warning(
        "%s asked for on a CPU without native bf16 (no %s in /proc/cpuinfo): bf16 is emulated "
        "here and runs slower than fp32. Drop it on this machine, or use a CPU with "
        "AVX512-BF16/AMX or a GPU",
        " and ".join(asked),
        "/".join(NATIVE_BF16_FLAGS),
    )
    return True


def build_teacher_cache(
    speed: DictConfig, datamodule, teacher: nn.Module | None, num_classes: int
) -> TeacherOutputCache | None:
    """The teacher-output cache ``speed.teacher_cache`` asks for, checked against the data.

    Raises:
        ValueError: If the data does not replay augmentations (``data.augment_rounds``) or
            the teacher changes during the run (a route of checkpoints).
    """
    if not speed.get("teacher_cache"):
        return None
    rounds = getattr(datamodule, "augment_rounds", None)
    if not getattr(datamodule, "on_device", False) or not rounds:
        raise ValueError(
            "speed.teacher_cache=true needs training batches that replay a fixed set of "
            "augmentations: set data.on_device=true and data.augment_rounds=K (e.g. 4); "
            f"{type(datamodule).__name__} has on_device="
            f"{getattr(datamodule, 'on_device', None)}, augment_rounds={rounds}"
        )
    if isinstance(teacher, TeacherRoute):
        raise ValueError(
            "speed.teacher_cache=true cannot serve a route of teachers (the teacher changes "
            "during the run): set speed.teacher_cache=false"
        )
    return TeacherOutputCache(datamodule.num_train_samples, rounds, num_classes)


def compile_models(*models: nn.Module | None) -> None:
    """Compiles each model in place (``nn.Module.compile``: parameter names, and so
    checkpoints, stay as they were; forward hooks of feature taps are traced along)."""
    for model in models:
        if model is not None:
            model.compile()


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    """Peak memory of this process so far: resident set size, and the accelerator's allocator
    peak when the run used a CUDA device."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # macOS: bytes; Linux: KiB
    peak = {"peak_rss_mb": round(max_rss * bytes_per_unit / 2**20, 1)}
    if device is not None and device.type == "cuda":
        peak["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak
