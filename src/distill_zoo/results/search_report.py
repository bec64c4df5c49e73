"""The architecture-search part of a report: the trials of ``hparams_search=arch_kd`` (run
folders with ``search.json``), the Pareto front of accuracy against MACs per teacher, and the
section of ``report.md`` that lists it. :mod:`distill_zoo.results.search_plot` draws it.

Search to Distill (Liu et al., CVPR 2020), https://arxiv.org/abs/1911.09074: which students
are best depends on the teacher, so the front is drawn for each teacher apart.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distill_zoo.results.objective import SEARCH_FILE, pareto_front
from distill_zoo.results.runs import FINISHED, Run, training_curve
from distill_zoo.results.table import Report


@dataclass
class Trial:
    """One finished search trial: its run and its ``search.json`` record."""

    run: Run
    record: dict

    @property
    def name(self) -> str:
        return self.run.path.name

    @property
    def teacher(self) -> str:
        return str(self.record.get("teacher") or "no teacher")

    @property
    def macs(self) -> float | None:
        return self.record.get("macs_per_image")

    @property
    def accuracy(self) -> float | None:
        """The accuracy the search saw: the best validation value."""
        return self.record.get("accuracy")

    @property
    def test_accuracy(self) -> float | None:
        """Test value of the best-on-val checkpoint (shown, never searched on)."""
        name = str(self.record.get("accuracy_key", "best_val_acc1")).removeprefix("best_val_")
        return self.run.metrics.get(f"test_{name}_best")


def search_trials(report: Report) -> list[Trial]:
    """The finished runs of ``report`` that recorded a search trial, in report order."""
    trials = []
    for run in report.runs:
        path = run.path / SEARCH_FILE
        if run.status == FINISHED and path.is_file():
            trials.append(Trial(run, json.loads(path.read_text())))
    return trials


def by_teacher(trials: list[Trial]) -> dict[str, list[Trial]]:
    """The trials of each teacher, teachers in order of first appearance."""
    groups: dict[str, list[Trial]] = defaultdict(list)
    for trial in trials:
        groups[trial.teacher].append(trial)
    return dict(groups)


def front(trials: list[Trial]) -> list[Trial]:
    """The trials on the Pareto front of (MACs, accuracy): none has fewer MACs and a higher
    accuracy (ties all kept), by MACs; trials missing either value are left out."""
    measured = [t for t in trials if t.macs is not None and t.accuracy is not None]
    return [measured[i] for i in pareto_front([(t.macs, t.accuracy) for t in measured])]


def teacher_accuracy(trials: list[Trial]) -> tuple[float | None, str]:
    """The teacher's accuracy and where it comes from: its validation value as the trials
    logged it (``val/teacher_<m>``, the split the search scores on), else its test value."""
    key = str(trials[0].record.get("accuracy_key", "best_val_acc1")).removeprefix("best_val_")
    for trial in trials:
        curve = training_curve(trial.run.path, f"val/teacher_{key}")
        if curve:
            return curve[-1][1], "val"
    for trial in trials:
        value = trial.run.metrics.get(f"teacher_test_{key}")
        if value is not None:
            return value, "test"
    return None, ""


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _macs(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f}M"


def _objective_text(record: dict) -> str:
    if record.get("objective") != "mnas":
        return "objective: best val accuracy"
    unit = "MACs" if record.get("cost") == "macs" else "CPU ms"
    target = record.get("target")
    shown = _macs(target) if record.get("cost") == "macs" else f"{target:g} ms"
    return f"objective (MnasNet): val accuracy x ({unit} / {shown}) ^ {record.get('w'):g}"


def front_rows(trials: list[Trial], root: Path) -> list[dict]:
    """One row per trial on the front of ``trials`` (one teacher's); trial folders relative
    to ``root``."""
    return [
        {
            "trial": trial_folder(t, root),
            "architecture": t.record.get("architecture", "?"),
            "MACs": _macs(t.macs),
            "CPU ms (batch 1)": t.record.get("cpu_latency_ms_batch1") or "n/a",
            "val top-1 (%)": _percent(t.accuracy),
            "test top-1 (%)": _percent(t.test_accuracy),
            "objective": f"{t.record['value']:.4f}",
        }
        for t in front(trials)
    ]


def repeated(trials: list[Trial], root: Path) -> dict[str, list[str]]:
    """Architectures trained by more than one trial (a fixed model ignores depth and width),
    with those trials' folders relative to ``root``."""
    seen: dict[str, list[str]] = defaultdict(list)
    for trial in trials:
        seen[str(trial.record.get("architecture"))].append(trial_folder(trial, root))
    return {arch: names for arch, names in seen.items() if len(names) > 1}


def markdown_section(report: Report, render_table: Callable[[list[dict]], str]) -> str | None:
    """``## Architecture search``: per teacher, the trial count, the objective, the best
    trial, the Pareto front as a table (rows rendered by ``render_table``), and repeated
    architectures; ``None`` where the report holds no search trial."""
    trials = search_trials(report)
    if not trials:
        return None
    parts = [
        "## Architecture search\n\nPareto front per teacher: the trials that no other trial "
        "beats on both MACs per image (fewer) and validation top-1 (higher; the accuracy the "
        "search scored). Test top-1 is shown, never searched on."
    ]
    for teacher, own in by_teacher(trials).items():
        best = max(own, key=lambda t: t.record["value"])
        value, split = teacher_accuracy(own)
        known = f" ({split} top-1 {_percent(value)}%)" if value is not None else ""
        lines = [
            f"### teacher={teacher}{known}",
            f"{len(own)} trials; {_objective_text(own[0].record)}. Best: "
            f"{trial_folder(best, report.root)} "
            f"({best.record.get('architecture')}, objective {best.record['value']:.4f}).",
            render_table(front_rows(own, report.root)),
        ]
        again = repeated(own, report.root)
        if again:
            shown = "; ".join(f"{a} ({', '.join(n)})" for a, n in again.items())
            lines.append(f"Architectures trained more than once: {shown}.")
        parts.append("\n\n".join(lines))
    return "\n\n".join(parts)


def trial_folder(trial: Trial, root: Path) -> str:
    """The trial's folder relative to ``root`` (for labels)."""
    try:
        return str(trial.run.path.relative_to(root))
    except ValueError:
        return str(trial.run.path)
