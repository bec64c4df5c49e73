"""The sweep table's model: runs grouped by their overrides over seeds, mean +- std of each
metric, and the paired gain over the matching vanilla student."""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from distill_zoo.results.runs import (
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

COLUMNS = {
    "best_val_acc1": "best val top-1",
    "test_acc1_best": "test top-1 (best val)",
    "test_acc1_last": "test top-1 (last)",
    "teacher_test_acc1": "teacher top-1",
    "test_agreement_best": "agreement",
}
"""Metrics of ``metrics.json`` in the table (all fractions, shown in %), and their titles."""
GAIN_METRICS = {
    "test_acc1_best": "gain (best val)",
    "test_acc1_last": "gain (last)",
}
"""Metrics whose gain over the vanilla student is shown, and the gain columns' titles."""
# --- statistics ------------------------------------------------------------------------------


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

    def text(self, sign: bool = False) -> str:
        """``72.00 +- 2.83``, ``72.00`` for one value, ``-`` for none."""
        if self.mean is None:
            return "-"
        mean = f"{self.mean:+.2f}" if sign else f"{self.mean:.2f}"
        return mean if self.std is None else f"{mean} +- {self.std:.2f}"


@dataclass
class Gain:
    """A method's gain over the vanilla student, in percentage points.

    Attributes:
        difference: Method mean minus vanilla mean.
        paired: Mean +- std of the per-seed differences, over the seeds both have.
        complete: Whether every seed of the method has a vanilla run of that seed.
    """

    difference: float
    paired: Stat
    complete: bool

    def text(self) -> str:
        if self.complete:
            return self.paired.text(sign=True)
        return f"{self.difference:+.2f} (unpaired)"


def _by_seed(runs: list[Run], key: str) -> dict[int, float]:
    values = defaultdict(list)
    for run in runs:
        if run.seed is not None and run.metrics.get(key) is not None:
            values[run.seed].append(100 * run.metrics[key])
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

    def count(self, status: str) -> int:
        return sum(run.status == status for run in self.runs)

    def settings(self) -> dict[str, str]:
        """``{key: value}`` of the group's ``key=value`` overrides."""
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)

    def values(self, key: str) -> list[float]:
        """``key`` of each finished run, in % (runs where it is missing left out)."""
        return [100 * r.metrics[key] for r in self.finished if r.metrics.get(key) is not None]

    def stat(self, key: str) -> Stat:
        return Stat.of(self.values(key))

    def gain(self, key: str) -> Gain | None:
        """Gain in ``key`` over the matching vanilla runs; ``None`` without any."""
        vanilla = [run for group in self.vanilla_groups for run in group.finished]
        own = self.stat(key)
        base = Stat.of([100 * r.metrics[key] for r in vanilla if r.metrics.get(key) is not None])
        if own.mean is None or base.mean is None:
            return None
        mine, theirs = _by_seed(self.finished, key), _by_seed(vanilla, key)
        shared = sorted(mine.keys() & theirs.keys())
        paired = Stat.of([mine[s] - theirs[s] for s in shared])
        seeded = sum(r.seed is not None for r in self.finished if r.metrics.get(key) is not None)
        complete = bool(shared) and len(shared) == len(mine) and seeded == own.n
        return Gain(own.mean - base.mean, paired, complete)

    def gain_text(self, key: str) -> str:
        if self.vanilla:
            return "(vanilla)"
        if not self.vanilla_groups:
            return "no vanilla run"
        gain = self.gain(key)
        return "-" if gain is None else gain.text()


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
    """

    root: Path
    groups: list[Group]
    common: list[str]
    pipelines: list[Path]

    @property
    def runs(self) -> list[Run]:
        return [run for group in self.groups for run in group.runs]

    @property
    def unfinished(self) -> list[Run]:
        return [run for run in self.runs if run.status != FINISHED]


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
    common = (
        sorted(set.intersection(*(set(g.overrides) for g in groups))) if len(groups) > 1 else []
    )
    for group in groups:
        varying = [o for o in group.overrides if o not in common]
        group.label = " ".join(varying) or " ".join(group.overrides) or "(defaults)"
    match_vanilla(groups)
    return Report(Path(root), groups, common, find_pipelines(root))


def match_vanilla(groups: list[Group]) -> None:
    """Sets each non-vanilla group's ``vanilla_groups``: the vanilla groups whose overrides
    agree with it once the distillation keys (distiller, teacher, ...) are left out."""

    def base(group: Group) -> tuple[str, ...]:
        return tuple(o for o in group.overrides if not is_distillation_key(override_key(o)))

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


def table_rows(report: Report) -> list[dict]:
    """One dict per group: its label, finished runs, each metric as ``mean +- std`` in %,
    the gains, and (where any run is unfinished) how many are running or crashed."""
    any_unfinished = bool(report.unfinished)
    rows = []
    for group in report.groups:
        row = {"overrides": group.label, "runs": len(group.finished)}
        for key, title in COLUMNS.items():
            row[title] = group.stat(key).text()
        for key, title in GAIN_METRICS.items():
            row[title] = group.gain_text(key)
        if any_unfinished:
            counts = [f"{group.count(s)} {s}" for s in (RUNNING, CRASHED) if group.count(s)]
            row["unfinished"] = ", ".join(counts)
        rows.append(row)
    return rows
