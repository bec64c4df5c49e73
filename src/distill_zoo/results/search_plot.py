"""The architecture-search figure: validation top-1 against MACs per image, every trial a
point, the Pareto front highlighted and the teacher's accuracy as a line, per teacher (Liu
et al., "Search to Distill", CVPR 2020, https://arxiv.org/abs/1911.09074). Drawn with
matplotlib's object API, as :mod:`distill_zoo.results.plots`."""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from distill_zoo.results.search_report import by_teacher, front, search_trials, teacher_accuracy
from distill_zoo.results.table import Report

DPI = 120


def search_figure(report: Report, path: Path) -> Path | None:
    """Writes the accuracy-vs-MACs cloud of the report's search trials to ``path``; ``None``
    (nothing written) where no trial recorded both values."""
    teachers = {
        teacher: [t for t in trials if t.macs is not None and t.accuracy is not None]
        for teacher, trials in by_teacher(search_trials(report)).items()
    }
    teachers = {teacher: trials for teacher, trials in teachers.items() if trials}
    if not teachers:
        return None
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    ax = figure.subplots()
    for i, (teacher, trials) in enumerate(teachers.items()):
        colour = colormaps["tab10"](i % 10)
        ax.scatter(
            [t.macs / 1e6 for t in trials],
            [100 * t.accuracy for t in trials],
            color=colour,
            alpha=0.45,
            label=f"teacher={teacher}: {len(trials)} trials",
        )
        best = front(trials)
        xs, ys = [t.macs / 1e6 for t in best], [100 * t.accuracy for t in best]
        ax.step(xs, ys, where="post", color=colour, linewidth=1.5)
        label = "Pareto front" + (f", teacher={teacher}" if len(teachers) > 1 else "")
        ax.scatter(xs, ys, color=colour, edgecolor="black", s=70, zorder=3, label=label)
        for trial, x, y in zip(best, xs, ys, strict=True):
            name = str(trial.record.get("architecture", trial.name))
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        value, split = teacher_accuracy(trials)
        if value is not None:
            ax.axhline(
                100 * value,
                color=colour,
                linestyle="--",
                label=f"teacher {teacher} ({split} top-1 {100 * value:.2f}%)",
            )
    macs = [t.macs for trials in teachers.values() for t in trials]
    if max(macs) >= 4 * min(macs):
        ax.set_xscale("log")
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(
        "Architecture search: every trial, and its Pareto front (no trial has fewer MACs and "
        "a higher val top-1)",
        fontsize="medium",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
