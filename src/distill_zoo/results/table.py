"""The sweep table's model: runs grouped by their overrides over seeds, mean +- std of each
metric of their task (:data:`TASK_TABLES`: fractions in %, errors in the data's units), and
the paired gain over the matching vanilla student (positive when the student improved)."""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from distill_zoo.results.runs import (
    CLASSIFICATION,
    CRASHED,
    FINISHED,
    RUNNING,
    STALE_AFTER_S,
    Run,
    config_differences,
    find_pipelines,
    find_runs,
    is_distillation_key,
    override_key,
    read_run,
)


@dataclass(frozen=True)
class TaskTable:
    """What the table shows for the runs of one task.

    Attributes:
        task: The task's name.
        monitor: The metric that picked the best checkpoint (``val/<monitor>``), whose test
            values the gains compare.
        title: The monitor's name for people (``top-1``, ``mIoU``, ``MAE``).
        columns: Keys of ``metrics.json`` in the table, and their column titles.
        gains: Keys whose gain over the vanilla student is shown, and the gain columns' titles.
        errors: Keys that are errors in the data's units (lower is better), shown as numbers;
            every other key is a fraction, shown in %.
        lower_is_better: Whether a smaller monitor is better: the gain is then vanilla minus
            student, so that a positive gain still means the student improved.
        negative_is_missing: Whether a negative value means "undefined" (torchmetrics' mAP
            is -1 where there was nothing to detect, say no confident teacher box for the
            agreement): such values are left out like missing ones.
    """

    task: str
    monitor: str
    title: str
    columns: dict[str, str]
    gains: dict[str, str]
    errors: frozenset[str] = frozenset()
    lower_is_better: bool = False
    negative_is_missing: bool = False

    def value(self, metrics: dict, key: str) -> float | None:
        """``key`` of a run's ``metrics.json`` (see :func:`metric_value`), ``None`` where it
        is missing or undefined."""
        value = metric_value(metrics, key)
        if value is not None and self.negative_is_missing and value < 0:
            return None
        return value

    def is_error(self, key: str) -> bool:
        """Whether ``key`` is an error in the data's units (else a fraction shown in %)."""
        return key in self.errors or (self.lower_is_better and key not in self.columns)

    def scale(self, key: str) -> float:
        """What a value of ``key`` is multiplied by in the table: 100 for fractions."""
        return 1.0 if self.is_error(key) else 100.0


def task_table(
    task: str,
    monitor: str,
    summary: tuple[str, ...],
    teacher: tuple[str, ...],
    titles: dict[str, str],
    agreement: str,
    lower_is_better: bool = False,
    agreement_is_error: bool = False,
    negative_is_missing: bool = False,
    error_metrics: tuple[str, ...] | None = None,
) -> TaskTable:
    """The :class:`TaskTable` of a task whose ``metrics.json`` has ``best_val_<monitor>``,
    ``test_<m>_best``/``_last`` for each ``summary`` metric, ``teacher_test_<m>`` for each
    ``teacher`` metric and ``test_agreement_best`` (see ``distill_zoo.train.task_metrics``).

    ``error_metrics`` names the metrics shown as numbers in their own units (perplexity
    beside a language model's accuracy in %); ``None``: every metric when
    ``lower_is_better`` (a regression's MAE and RMSE), none otherwise. The agreement is an
    error only with ``agreement_is_error``."""
    name = titles.get(monitor, monitor)
    columns = {f"best_val_{monitor}": f"best val {name}"}
    metric_of = {f"best_val_{monitor}": monitor}
    for metric in summary:
        title = titles.get(metric, metric)
        columns[f"test_{metric}_best"] = f"test {title} (best val)"
        columns[f"test_{metric}_last"] = f"test {title} (last)"
        metric_of[f"test_{metric}_best"] = metric_of[f"test_{metric}_last"] = metric
    for metric in teacher:
        columns[f"teacher_test_{metric}"] = f"teacher {titles.get(metric, metric)}"
        metric_of[f"teacher_test_{metric}"] = metric
    columns["test_agreement_best"] = agreement
    if lower_is_better:
        gains = {
            f"test_{monitor}_best": f"{name} gain = vanilla - student (best val)",
            f"test_{monitor}_last": f"{name} gain = vanilla - student (last)",
        }
    elif task == CLASSIFICATION:
        gains = {f"test_{monitor}_best": "gain (best val)", f"test_{monitor}_last": "gain (last)"}
    else:
        gains = {
            f"test_{monitor}_best": f"gain {name} (best val)",
            f"test_{monitor}_last": f"gain {name} (last)",
        }
    if error_metrics is None:
        error_metrics = tuple(metric_of.values()) if lower_is_better else ()
    errors = {key for key, metric in metric_of.items() if metric in error_metrics}
    if agreement_is_error:
        errors.add("test_agreement_best")
    return TaskTable(
        task,
        monitor,
        name,
        columns,
        gains,
        frozenset(errors),
        lower_is_better=lower_is_better,
        negative_is_missing=negative_is_missing,
    )


TASK_TABLES = {
    # Exactly the table of runs made before tasks existed: top-1 only (top-5 is in the CSV).
    CLASSIFICATION: task_table(
        CLASSIFICATION, "acc1", ("acc1",), ("acc1",), {"acc1": "top-1"}, "agreement"
    ),
    "segmentation": task_table(
        "segmentation",
        "miou",
        ("miou", "pixel_acc"),
        ("miou", "pixel_acc"),
        {"miou": "mIoU", "pixel_acc": "pixel acc"},
        "agreement (pixels)",
    ),
    "detection": task_table(
        "detection",
        "map",
        ("map", "map_50", "map_75"),
        ("map", "map_50", "map_75"),
        {"map": "mAP", "map_50": "mAP@50", "map_75": "mAP@75"},
        "agreement (mAP@50 vs teacher boxes)",
        negative_is_missing=True,
    ),
    "regression": task_table(
        "regression",
        "mae",
        ("mae", "rmse"),
        ("mae", "rmse"),
        {"mae": "MAE", "rmse": "RMSE"},
        "agreement: mean abs(student - teacher)",
        lower_is_better=True,
        agreement_is_error=True,
    ),
    # Perplexity is lower-is-better (the gain is vanilla minus student) and a number;
    # next-token accuracy and agreement are fractions, higher is better, shown in %.
    "language_modeling": task_table(
        "language_modeling",
        "perplexity",
        ("perplexity", "acc"),
        ("perplexity", "acc"),
        {"perplexity": "perplexity", "acc": "next-token acc"},
        "agreement (same top-1 token)",
        lower_is_better=True,
        error_metrics=("perplexity",),
    ),
}
"""The table of each task: its monitor, summary and teacher metrics (as
``distill_zoo.tasks``' ``monitor``, ``summary_metrics`` and ``teacher_metrics`` say; a test
holds them equal), their titles and units, and the direction of the gain."""

COLUMNS = TASK_TABLES[CLASSIFICATION].columns
"""Classification's metrics of ``metrics.json`` in the table (fractions, shown in %)."""
GAIN_METRICS = TASK_TABLES[CLASSIFICATION].gains
"""Classification's metrics whose gain over the vanilla student is shown."""
ERROR_NAMES = ("mae", "rmse", "mse", "loss")
"""Metric names (or their start) that are errors, for tasks this table does not know."""


def table_of(task: str, metrics: dict | None = None) -> TaskTable:
    """The :class:`TaskTable` of ``task``; for a task this module does not know, one read
    from a run's ``metrics.json`` (its ``monitor`` and ``test_<m>_best`` keys)."""
    if task in TASK_TABLES:
        return TASK_TABLES[task]
    metrics = metrics or {}
    monitor = str(metrics.get("monitor", "val/score")).split("/", 1)[-1]
    summary = tuple(
        key[len("test_") : -len("_best")]
        for key in metrics
        if key.startswith("test_") and key.endswith("_best") and key != "test_agreement_best"
    ) or (monitor,)
    teacher = tuple(
        key[len("teacher_test_") :] for key in metrics if key.startswith("teacher_test_")
    )
    lower = monitor.startswith(ERROR_NAMES)
    table = task_table(task, monitor, summary, teacher, {}, "agreement", lower_is_better=lower)
    # Unknown units: every value as it is.
    return TaskTable(
        task,
        table.monitor,
        table.title,
        table.columns,
        table.gains,
        frozenset([*table.columns, *table.gains]),
        lower_is_better=lower,
    )


def metric_value(metrics: dict, key: str) -> float | None:
    """``key`` of a run's ``metrics.json``; ``test_<m>_best``/``test_<m>_last`` not among its
    top-level keys (a regression's per-target ``mae_<target>``) are read from its ``test_best``
    and ``test_last`` dicts of every test metric."""
    value = metrics.get(key)
    if value is None and key.startswith("test_"):
        for suffix, part in (("_best", "test_best"), ("_last", "test_last")):
            if key.endswith(suffix):
                value = (metrics.get(part) or {}).get(key[len("test_") : -len(suffix)])
    return None if value is None else float(value)


# --- statistics ------------------------------------------------------------------------------


def decimals_for(values: list[float | None], error: bool) -> int:
    """Decimals a column is shown with: 2 for percentages; for errors, at least 2 and enough
    for 3 significant digits of the largest value (``47.15``, ``0.0123``)."""
    if not error:
        return 2
    largest = max((abs(v) for v in values if v is not None), default=0.0)
    if not largest or not math.isfinite(largest):
        return 2
    return max(2, 2 - math.floor(math.log10(largest)))


class Stat(NamedTuple):
    """Mean and sample standard deviation (``None`` below 2 values) of ``n`` values."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if not values:
            return cls(None, None, 0)
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def text(self, sign: bool = False, decimals: int = 2) -> str:
        """``72.00 +- 2.83``, ``72.00`` for one value, ``-`` for none."""
        if self.mean is None:
            return "-"
        mean = f"{self.mean:+.{decimals}f}" if sign else f"{self.mean:.{decimals}f}"
        return mean if self.std is None else f"{mean} +- {self.std:.{decimals}f}"


@dataclass
class Gain:
    """A method's gain over the vanilla student: in percentage points for fractions, in the
    data's units for errors; positive when the student improved (for an error, lower).

    Attributes:
        difference: Method mean minus vanilla mean (vanilla minus method for an error).
        paired: Mean +- std of the per-seed differences, over the seeds both have.
        complete: Whether every seed of the method has a vanilla run of that seed.
    """

    difference: float
    paired: Stat
    complete: bool

    def text(self, decimals: int = 2) -> str:
        if self.complete:
            return self.paired.text(sign=True, decimals=decimals)
        return f"{self.difference:+.{decimals}f} (unpaired)"


def _by_seed(runs: list[Run], key: str, table: TaskTable) -> dict[int, float]:
    values = defaultdict(list)
    scale = table.scale(key)
    for run in runs:
        value = table.value(run.metrics, key)
        if run.seed is not None and value is not None:
            values[run.seed].append(scale * value)
    return {seed: statistics.fmean(v) for seed, v in values.items()}


@dataclass
class Group:
    """The runs that share their overrides (all seeds of one setting)."""

    overrides: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)
    label: str = ""
    vanilla_groups: list[Group] = field(default_factory=list)

    @property
    def finished(self) -> list[Run]:
        return [run for run in self.runs if run.status == FINISHED]

    @property
    def vanilla(self) -> bool:
        return all(run.vanilla for run in self.runs)

    @property
    def task(self) -> str:
        """The task of the group's runs (the most common one, finished runs first)."""
        tasks = [run.task for run in self.finished] or [run.task for run in self.runs]
        return Counter(tasks).most_common(1)[0][0] if tasks else CLASSIFICATION

    @property
    def table(self) -> TaskTable:
        """The columns, units and gain direction of the group's task."""
        return table_of(self.task, next((r.metrics for r in self.finished), None))

    def count(self, status: str) -> int:
        return sum(run.status == status for run in self.runs)

    def settings(self) -> dict[str, str]:
        """``{key: value}`` of the group's ``key=value`` overrides."""
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)

    def values(self, key: str) -> list[float]:
        """``key`` of each finished run, as the table shows it: fractions in %, errors in the
        data's units (runs where it is missing left out)."""
        table = self.table
        found = (table.value(r.metrics, key) for r in self.finished)
        return [table.scale(key) * value for value in found if value is not None]

    def stat(self, key: str) -> Stat:
        return Stat.of(self.values(key))

    def gain(self, key: str) -> Gain | None:
        """Gain in ``key`` over the matching vanilla runs (vanilla minus this group for an
        error, so a positive gain is an improvement); ``None`` without any."""
        table = self.table
        scale, sign = table.scale(key), -1.0 if table.lower_is_better else 1.0
        vanilla = [run for group in self.vanilla_groups for run in group.finished]
        own = self.stat(key)
        base = Stat.of(
            [scale * v for v in (table.value(r.metrics, key) for r in vanilla) if v is not None]
        )
        if own.mean is None or base.mean is None:
            return None
        mine, theirs = _by_seed(self.finished, key, table), _by_seed(vanilla, key, table)
        shared = sorted(mine.keys() & theirs.keys())
        paired = Stat.of([sign * (mine[s] - theirs[s]) for s in shared])
        seeded = sum(
            r.seed is not None for r in self.finished if table.value(r.metrics, key) is not None
        )
        complete = bool(shared) and len(shared) == len(mine) and seeded == own.n
        return Gain(sign * (own.mean - base.mean), paired, complete)

    def gain_text(self, key: str, decimals: int = 2) -> str:
        if self.vanilla:
            return "(vanilla)"
        if not self.vanilla_groups:
            return "no vanilla run"
        gain = self.gain(key)
        return "-" if gain is None else gain.text(decimals)


def _natural(overrides: tuple[str, ...]) -> list:
    """Sort key: numbers in values compare as numbers (``T=2`` before ``T=10``)."""
    parts = []
    for override in overrides:
        for piece in re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", override):
            try:
                parts.append((0, float(piece), ""))
            except ValueError:
                parts.append((1, 0.0, piece))
        parts.append((2, 0.0, ""))
    return parts


@dataclass
class Report:
    """What a run, sweep or pipeline folder holds.

    Attributes:
        root: The folder.
        groups: One per override group, in natural order of their overrides.
        common: Overrides every group shares (left out of the labels).
        pipelines: Pipeline folders below ``root``.
        task_common: Per task, the overrides every group of that task shares: with runs of
            several tasks, labels leave these out too (each task has its own table).
    """

    root: Path
    groups: list[Group]
    common: list[str]
    pipelines: list[Path]
    task_common: dict[str, list[str]] = field(default_factory=dict)

    def common_of(self, task: str) -> list[str]:
        """The overrides every group of ``task`` shares."""
        return self.task_common.get(task, self.common)

    @property
    def runs(self) -> list[Run]:
        return [run for group in self.groups for run in group.runs]

    @property
    def unfinished(self) -> list[Run]:
        return [run for run in self.runs if run.status != FINISHED]

    @property
    def tasks(self) -> list[str]:
        """The tasks of the groups, classification first, then in order of appearance."""
        found = dict.fromkeys(group.task for group in self.groups)
        return sorted(found, key=lambda task: task != CLASSIFICATION)

    def groups_of(self, task: str) -> list[Group]:
        return [group for group in self.groups if group.task == task]


def collect(
    root: Path,
    vanilla_roots: Sequence[Path] = (),
    now: float | None = None,
    stale_after_s: float = STALE_AFTER_S,
) -> Report:
    """Reads every run below ``root`` and groups them; vanilla runs found below
    ``vanilla_roots`` join as groups of their own, to compare ``root``'s methods with.

    Args:
        root: A run, sweep (multirun), pipeline or outputs folder.
        vanilla_roots: Folders holding vanilla runs (``distiller=none``) run elsewhere.
        now: The time runs' last writes are compared with (default: now).
        stale_after_s: A run without ``metrics.json`` that wrote nothing for this long is
            reported as crashed, else as running.
    """
    now = time.time() if now is None else now
    own = find_runs(root)
    extra = [run for folder in vanilla_roots for run in find_runs(folder) if run not in own]
    differences = config_differences(own + extra)
    runs = [read_run(run, differences[run], now, stale_after_s) for run in own]
    runs += [
        run
        for run in (read_run(r, differences[r], now, stale_after_s) for r in extra)
        if run.vanilla
    ]
    by_overrides: dict[tuple[str, ...], Group] = {}
    for run in runs:
        by_overrides.setdefault(run.overrides, Group(run.overrides)).runs.append(run)
    groups = sorted(by_overrides.values(), key=lambda g: _natural(g.overrides))
    common = _shared(groups)
    by_task = defaultdict(list)
    for group in groups:
        by_task[group.task].append(group)
    task_common = {task: _shared(members) for task, members in by_task.items()}
    for group in groups:
        shared = task_common[group.task] if len(by_task) > 1 else common
        varying = [o for o in group.overrides if o not in shared]
        group.label = " ".join(varying) or " ".join(group.overrides) or "(defaults)"
    match_vanilla(groups)
    return Report(Path(root), groups, common, find_pipelines(root), task_common)


def _shared(groups: list[Group]) -> list[str]:
    """The overrides all of ``groups`` share (none for a single group)."""
    if len(groups) < 2:
        return []
    return sorted(set.intersection(*(set(g.overrides) for g in groups)))


def match_vanilla(groups: list[Group]) -> None:
    """Sets each non-vanilla group's ``vanilla_groups``: the vanilla groups of its task whose
    overrides agree with it once the distillation keys (distiller, teacher, ...) are left
    out."""

    def base(group: Group) -> tuple:
        kept = tuple(o for o in group.overrides if not is_distillation_key(override_key(o)))
        return (group.task, kept)

    vanilla = defaultdict(list)
    for group in groups:
        if group.vanilla:
            vanilla[base(group)].append(group)
    for group in groups:
        group.vanilla_groups = [] if group.vanilla else vanilla.get(base(group), [])


def summarise(root: Path) -> tuple[list[dict], list[Path], list[str]]:
    """Rows of the table (one per override group), the unfinished runs, and the overrides
    shared by every group (left out of the rows' labels to keep them short)."""
    report = collect(root)
    return table_rows(report), [run.path for run in report.unfinished], report.common


# --- writing ---------------------------------------------------------------------------------


def table_rows(report: Report, task: str | None = None) -> list[dict]:
    """One dict per group of ``task`` (``None``: every group, each with its task's columns):
    its label, finished runs, each metric as ``mean +- std`` (fractions in %, errors in the
    data's units), the gains, and (where any run is unfinished) how many are running or
    crashed."""
    any_unfinished = bool(report.unfinished)
    groups = report.groups if task is None else report.groups_of(task)
    decimals = _column_decimals(groups)
    rows = []
    for group in groups:
        table = group.table
        row = {"overrides": group.label, "runs": len(group.finished)}
        for key, title in table.columns.items():
            row[title] = group.stat(key).text(decimals=decimals[table.task, key])
        for key, title in table.gains.items():
            row[title] = group.gain_text(key, decimals[table.task, key])
        if any_unfinished:
            counts = [f"{group.count(s)} {s}" for s in (RUNNING, CRASHED) if group.count(s)]
            row["unfinished"] = ", ".join(counts)
        rows.append(row)
    return rows


def _column_decimals(groups: list[Group]) -> dict[tuple[str, str], int]:
    """Decimals of each ``(task, key)`` column: the same for every row of a column."""
    means: dict[tuple[str, str], list] = defaultdict(list)
    errors = {}
    for group in groups:
        table = group.table
        for key in (*table.columns, *table.gains):
            means[table.task, key].append(group.stat(key).mean)
            errors[table.task, key] = table.is_error(key)
    return {column: decimals_for(values, errors[column]) for column, values in means.items()}
