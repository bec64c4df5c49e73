"""The objective of an architecture search, and the Pareto front of its trials.

MnasNet: Platform-Aware Neural Architecture Search for Mobile (Mingxing Tan, Bo Chen, Ruoming
Pang, Vijay Vasudevan, Mark Sandler, Andrew Howard, Quoc V. Le, CVPR 2019),
https://arxiv.org/abs/1807.11626, Eq. 2 with alpha = beta = w (its soft constraint): a trial
scores ``accuracy * (cost / target) ** w``, ``w < 0``, so a student twice the target's cost
must be ``2 ** -w`` times as accurate (w = -0.07: about 5 % more) to score the same.

``conf/hparams_search/arch_kd.yaml`` sets the top-level ``search`` node; with it,
``python -m distill_zoo`` returns :func:`record`'s value to the Optuna sweeper instead of the
plain accuracy, and writes :data:`SEARCH_FILE` beside the run's ``metrics.json`` for the
report (:mod:`distill_zoo.results.search_report`). The accuracy is the run's best
validation metric: test accuracy never steers the search.

Here rather than in ``engine/``: it is arithmetic on a finished run's results, which the
report reads back; nothing in it trains.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from distill_zoo.results.table import table_of

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
"""A search trial's record, in its run folder."""

OBJECTIVES = ("accuracy", "mnas")
COSTS = {
    "macs": ("macs_per_image", "target_macs"),
    "latency": ("cpu_latency_ms_batch1", "target_latency_ms"),
}
"""Cost name -> its key in the compression report's ``student`` row, and the ``search`` key
of its target."""


def mnas_objective(accuracy: float, cost: float, target: float, w: float) -> float:
    """``accuracy * (cost / target) ** w`` (MnasNet's soft-constrained reward).

    Args:
        accuracy: The trial's accuracy (a fraction, or any score where higher is better).
        cost: Its MACs per image, or CPU latency in ms.
        target: The cost at which the reward equals the accuracy, in the cost's unit.
        w: The exponent, ``<= 0`` (MnasNet: -0.07); 0 scores accuracy alone.

    Raises:
        ValueError: For a cost or target that is not positive, or a positive ``w`` (it would
            reward the costlier student).
    """
    if cost <= 0 or target <= 0:
        raise ValueError(f"cost and target must be positive, got cost={cost}, target={target}")
    if w > 0:
        raise ValueError(
            f"search.w={w} would reward a costlier student: use w <= 0 (MnasNet: -0.07)"
        )
    return accuracy * (cost / target) ** w


def search_value(settings: Mapping, metrics: Mapping) -> dict:
    """The objective of a finished run and what it was made of.

    Args:
        settings: The ``search`` node: ``objective`` (accuracy | mnas), ``cost``
            (macs | latency), ``target_macs``, ``target_latency_ms``, ``w``.
        metrics: The run's ``metrics.json`` content (``monitor``, ``best_val_<m>``, and
            ``compression.student`` where the run measured it).

    Returns:
        ``value`` (what the sweeper maximises), ``accuracy`` and its ``accuracy_key``,
        ``macs_per_image``, ``cpu_latency_ms_batch1`` and ``params`` of the student (``None``
        where not measured), and the settings used (``objective``, ``cost``, ``target``,
        ``w``).

    Raises:
        ValueError: For an unknown objective or cost, a run without a best validation value,
            ``mnas`` on a lower-is-better metric, or ``mnas`` without the compression report.
    """
    objective, cost = settings.get("objective", "mnas"), settings.get("cost", "macs")
    if objective not in OBJECTIVES:
        raise ValueError(f"search.objective={objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if cost not in COSTS:
        raise ValueError(f"search.cost={cost!r}: choose one of {', '.join(COSTS)}")
    name = str(metrics["monitor"]).split("/", 1)[1]
    key = f"best_val_{name}"
    accuracy = metrics.get(key)
    if accuracy is None:
        raise ValueError(f"the run has no {key}: it never validated, so it cannot be scored")
    student = (metrics.get("compression") or {}).get("student") or {}
    cost_key, target_key = COSTS[cost]
    record = {
        "objective": objective,
        "cost": cost,
        "target": settings.get(target_key),
        "w": settings.get("w"),
        "accuracy_key": key,
        "accuracy": accuracy,
        "macs_per_image": student.get("macs_per_image"),
        "cpu_latency_ms_batch1": student.get("cpu_latency_ms_batch1"),
        "params": student.get("params"),
        "value": accuracy,
    }
    if objective == "mnas":
        if table_of(str(metrics.get("task", "classification")), dict(metrics)).lower_is_better:
            raise ValueError(
                f"search.objective=mnas multiplies an accuracy, but val/{name} is an error "
                "(lower is better): use search.objective=accuracy with direction minimize"
            )
        if student.get(cost_key) is None:
            raise ValueError(
                f"search.objective=mnas with cost={cost} needs the student's {cost_key} from "
                "the compression report: set report_compression=true"
            )
        record["value"] = mnas_objective(
            accuracy, student[cost_key], float(settings[target_key]), float(settings["w"])
        )
    return record


def architecture_of(student: Mapping) -> str:
    """A student config's architecture: the canonical name of a searchable student
    (``wrn_16_2``; a fixed model's own name), else the config's ``name`` or ``_target_``."""
    if str(student.get("_target_", "")).endswith("searchable_model"):
        from distill_zoo.models.search_space import architecture_name  # builds on torch

        return architecture_name(
            student["family"], student.get("depth"), student.get("blocks"), student["width"]
        )
    return str(student.get("name") or student.get("_target_", "model"))


def record(
    cfg: Mapping, metrics: Mapping, run_dir: str | Path, write: bool | None = None
) -> float:
    """Scores a finished run for the search (:func:`search_value` of ``cfg.search``), writes
    the record (plus ``architecture``, ``family`` and ``teacher``) into
    ``<run_dir>/search.json`` when ``write`` (``None``: on the global rank zero, as
    ``metrics.json``; another rank returns the best validation value unscored), and returns
    the value. A pipeline is scored on its last stage, whose folder gets the record."""
    if write is None:
        from lightning.pytorch.utilities import rank_zero_only

        write = rank_zero_only.rank == 0
    if not write:
        # Another DDP rank: only rank 0 measures the compression report (the cost), and only
        # rank 0's value reaches the sweeper.
        monitor = str(metrics.get("monitor", "val/acc1")).split("/", 1)[1]
        return float(metrics["best_val_" + monitor])
    if metrics.get("stages"):  # a pipeline: the report reads its last stage's folder
        run_dir = Path(run_dir) / metrics["stages"][-1]["folder"]
    result = search_value(cfg["search"], metrics)
    teacher = cfg.get("teacher") or {}
    result.update(
        architecture=architecture_of(cfg["student"]),
        family=cfg["student"].get("family"),
        teacher=teacher.get("name"),
    )
    if write:
        path = Path(run_dir) / SEARCH_FILE
        path.write_text(json.dumps(result, indent=2) + "\n")
    log.info(
        "search: %s scores %.4f (%s; %s %.4f)",
        result["architecture"],
        result["value"],
        result["objective"],
        result["accuracy_key"],
        result["accuracy"],
    )
    return float(result["value"])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: ``(cost, accuracy)`` pairs, lower cost
    and higher accuracy better. A point is left out only if another is at least as good in
    both and better in one; equal points are all kept. Indices in order of cost, then of
    accuracy (best first), then of position."""
    front = [
        i
        for i, (cost, accuracy) in enumerate(points)
        if not any(c <= cost and a >= accuracy and (c < cost or a > accuracy) for c, a in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))
