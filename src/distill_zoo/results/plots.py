"""Figures of a sweep report, as PNG: the task's metric (top-1, mIoU, mAP, MAE: the one
that picks the best checkpoint) against each swept numeric key, validation curves of that
metric, teacher vs. student, and a teacher's prediction softened at several temperatures.

Drawn with matplotlib's object API (a :class:`~matplotlib.figure.Figure` rendered by the Agg
canvas), never through ``pyplot``: no GUI backend is touched and no figure outlives its
function, whatever backend the caller (a notebook) has chosen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from distill_zoo.results.runs import (
    CRASHED,
    FINISHED,
    is_distillation_key,
    override_key,
    training_curve,
)
from distill_zoo.results.search_plot import search_figure
from distill_zoo.results.table import CLASSIFICATION, Group, Report, TaskTable, table_of

DPI = 120


def unit(table: TaskTable, key: str) -> str:
    """`` (%)`` for a fraction, nothing for an error in the data's units."""
    return "" if table.is_error(key) else " (%)"


def panels(table: TaskTable) -> dict[str, str]:
    """The two test values of the task's monitor a sweep figure draws, and their titles."""
    metric = table.monitor
    return {
        f"test_{metric}_best": f"test {table.title}, checkpoint best on val"
        + unit(table, f"test_{metric}_best"),
        f"test_{metric}_last": f"test {table.title}, last epoch"
        + unit(table, f"test_{metric}_last"),
    }


ACCURACY_PANELS = panels(table_of(CLASSIFICATION))
"""Classification's panels: test top-1 of the best-on-val checkpoint and of the last epoch."""


def _table(report: Report) -> TaskTable:
    """The task table of ``report``'s groups (all of one task: see :func:`write_all`)."""
    return report.groups[0].table if report.groups else table_of(CLASSIFICATION)


def task_report(report: Report, task: str) -> Report:
    """``report`` narrowed to the groups of ``task``."""
    groups, common = report.groups_of(task), report.common_of(task)
    return Report(report.root, groups, common, report.pipelines, {task: common})


def write_all(report: Report, folder: Path) -> list[Path]:
    """Every figure the report's runs allow, written into ``folder``; returns their paths.

    Per task, on its monitor metric ``<m>`` (``acc`` for classification's top-1):
    ``<m>_vs_<key>.png`` for each swept numeric key, ``training_curves.png`` where runs
    logged ``val/<m>``, ``teacher_vs_student.png`` where finished runs had a teacher. Where
    the folder holds runs of several tasks, the figures of each task but classification end
    in ``_<task>``. ``search_pareto.png`` where runs are architecture-search trials
    (:mod:`distill_zoo.results.search_plot`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    tasks = report.tasks
    for task in tasks:
        part = task_report(report, task)
        metric = "acc" if task == CLASSIFICATION else _table(part).monitor
        tail = f"_{task}" if len(tasks) > 1 and task != CLASSIFICATION else ""
        for key in swept_keys(part):
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
            written.append(sweep_figure(part, key, folder / f"{metric}_vs_{name}{tail}.png"))
        written.append(curves_figure(part, folder / f"training_curves{tail}.png"))
        written.append(teacher_student_figure(part, folder / f"teacher_vs_student{tail}.png"))
    written.append(search_figure(report, folder / "search_pareto.png"))  # hparams_search=arch_kd
    return [path for path in written if path is not None]


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if np.isfinite(number) else None


def _measured(group: Group) -> bool:
    return any(group.stat(key).n for key in panels(group.table))


def swept_keys(report: Report) -> list[str]:
    """Override keys that take two or more numeric values over the measured groups (and
    no value that is not a number)."""
    values: dict[str, set] = {}
    for group in filter(_measured, report.groups):
        for key, value in group.settings().items():
            values.setdefault(key, set()).add(_number(value))
    return sorted(k for k, v in values.items() if None not in v and len(v) > 1)


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _colours(n: int) -> list:
    """``n`` distinct colours: tab10, or beyond 10 tab20's dark shades before its light ones
    (tab20 pairs shades of one hue, which side by side look like one group)."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [colormaps["tab20"](order[i % 20]) for i in range(n)]


def _pm(stat) -> str:
    """``72.00 ± 2.83`` (``72.00`` for one value)."""
    return stat.text().replace("+-", "±")


def sweep_series(report: Report, key: str) -> tuple[dict[str, list[tuple[float, Group]]], list]:
    """What :func:`sweep_figure` draws for ``key``.

    Returns:
        The lines: the label of each setting of the other overrides (those not shared by all
        groups) mapped to its ``(value of key, group)`` points, by value; and the baselines:
        where ``key`` is a distillation key (a vanilla student has none), the vanilla groups
        that match the lines' groups.
    """
    lines: dict[str, list[tuple[float, Group]]] = {}
    for group in filter(_measured, report.groups):
        value = group.settings().get(key)
        if value is None:
            continue
        rest = [o for o in group.overrides if o not in report.common and override_key(o) != key]
        lines.setdefault(" ".join(rest) or "runs", []).append((float(value), group))
    baselines: dict[int, Group] = {}
    if is_distillation_key(key):
        for points in lines.values():
            for _, group in points:
                baselines.update((id(v), v) for v in group.vanilla_groups)
    lines = {label: sorted(points, key=lambda p: p[0]) for label, points in sorted(lines.items())}
    return lines, list(baselines.values())


def sweep_figure(report: Report, key: str, path: Path) -> Path | None:
    """The task's test metric (top-1, mIoU, mAP, MAE; best-val checkpoint, and last epoch)
    against ``key``: mean with std error bars over seeds, one line per setting of the other
    overrides; where ``key`` is a distillation key, the matching vanilla students as dashed
    horizontal lines with a band of one std. ``report``'s groups are of one task."""
    lines, baselines = sweep_series(report, key)
    if not lines:
        return None
    table = _table(report)
    shown = panels(table)
    xs = sorted({x for points in lines.values() for x, _ in points})
    counts = sorted({g.stat(m).n for p in lines.values() for _, g in p for m in shown} - {0})
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    colours = _colours(len(lines) + len(baselines))
    log_axis = _log_axis(xs)
    for ax, (metric, title) in zip(axes, shown.items(), strict=True):
        for i, (colour, (label, points)) in enumerate(zip(colours, lines.items(), strict=False)):
            stats = [(x, g.stat(metric)) for x, g in points]
            stats = [(x, s) for x, s in stats if s.n]
            if not stats:
                continue
            # Lines side by side at the same x: nudge each a little so error bars stay apart.
            nudge = (i - (len(lines) - 1) / 2) * 0.025
            ax.errorbar(
                [_nudged(x, nudge, log_axis, xs) for x, _ in stats],
                [s.mean for _, s in stats],
                yerr=[s.std or 0.0 for _, s in stats],
                marker="o",
                capsize=4,
                color=colour,
                label=label,
            )
        for colour, group in zip(colours[len(lines) :], baselines, strict=True):
            stat = group.stat(metric)
            if not stat.n:
                continue
            label = f"vanilla (band: ± std): {group.label}"
            ax.axhline(stat.mean, color=colour, linestyle="--", label=label)
            if stat.std:
                ax.axhspan(stat.mean - stat.std, stat.mean + stat.std, color=colour, alpha=0.12)
        _numeric_axis(ax, xs, log_axis)
        ax.set_xlabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    monitor = f"test_{table.monitor}_best"
    lower = " (lower is better)" if table.lower_is_better else ""
    axes[0].set_ylabel(f"test {table.title}{unit(table, monitor)}{lower}")
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    figure.suptitle(
        f"Test {table.title} vs. {key} (mean and std over seeds; seeds per point: {seeds})"
    )
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)))
    return _save(figure, path)


def _log_axis(xs: Sequence[float]) -> bool:
    """Whether the swept values span a factor of 8 or more (temperatures 1..16, weights
    1..1000): they are then drawn on a log2 axis."""
    return len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8


def _nudged(x: float, nudge: float, log_axis: bool, xs: Sequence[float]) -> float:
    """``x`` moved by ``nudge`` of the axis span (of its log2 span on a log axis)."""
    if log_axis:
        return x * 2 ** (nudge * np.log2(max(xs) / min(xs)))
    return x + nudge * ((max(xs) - min(xs)) or 1.0)


def _numeric_axis(ax, xs: Sequence[float], log_axis: bool) -> None:
    """The swept values as ticks, on a log2 axis where :func:`_log_axis` says so."""
    if log_axis:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(xs), [f"{x:g}" for x in xs])


def curves_figure(report: Report, path: Path) -> Path | None:
    """The task's validation metric (``val/acc1``, ``val/miou``, ...) per epoch of every run,
    one colour per group; unfinished runs dotted. ``report``'s groups are of one task."""
    table = _table(report)
    column, key = f"val/{table.monitor}", f"best_val_{table.monitor}"
    scale = table.scale(key)
    curves = [
        (group, run, training_curve(run.path, column))
        for group in report.groups
        for run in group.runs
    ]
    curves = [(g, r, c) for g, r, c in curves if c]
    if not curves:
        return None
    groups = list(dict.fromkeys(id(g) for g, _, _ in curves))
    colour_of = dict(zip(groups, _colours(len(groups)), strict=True))
    figure = Figure(figsize=(10, 5), layout="constrained")
    ax = figure.subplots()
    labelled = set()
    for group, run, curve in curves:
        label = None
        if id(group) not in labelled:
            labelled.add(id(group))
            label = f"{group.label} ({len(group.runs)} run{'s' * (len(group.runs) > 1)})"
        ax.plot(
            [epoch for epoch, _ in curve],
            [scale * value for _, value in curve],
            color=colour_of[id(group)],
            linestyle="-" if run.status == FINISHED else ":",
            linewidth=1.5 if run.status == FINISHED else 2.5,
            marker="X" if run.status == CRASHED else "o" if len(curve) == 1 else None,
            markersize=9,
            markevery=[len(curve) - 1],
            alpha=0.85,
            label=label,
        )
    ax.set_xlabel("epoch")
    lower = " (lower is better)" if table.lower_is_better else ""
    ax.set_ylabel(f"val {table.title}{unit(table, key)}{lower}")
    ax.grid(alpha=0.3)
    unfinished = any(run.status != FINISHED for _, run, _ in curves)
    note = " (dotted: unfinished; X: crashed)" if unfinished else ""
    ax.set_title(f"Validation {table.title} per epoch, every run{note}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    figure.legend(loc="outside right upper", fontsize="small")
    return _save(figure, path)


def teacher_student_figure(report: Report, path: Path) -> Path | None:
    """Horizontal bars per group: the teacher's test metric (top-1, mIoU, mAP, MAE) and the
    student's (checkpoint best on validation), mean with std error bars, values written at
    the bars' ends. ``report``'s groups are of one task."""
    table = _table(report)
    student_key, teacher_key = f"test_{table.monitor}_best", f"teacher_test_{table.monitor}"
    groups = [g for g in report.groups if g.stat(student_key).n]
    if not any(g.stat(teacher_key).n for g in groups):
        return None
    values = [
        s.mean + (s.std or 0.0)
        for g in groups
        for s in (g.stat(student_key), g.stat(teacher_key))
        if s.n
    ]
    pad = 0.008 * max(values) if table.is_error(student_key) else 0.8
    height = 0.38
    figure = Figure(figsize=(9, 1.2 + 0.55 * len(groups)), layout="constrained")
    ax = figure.subplots()
    top = 0.0
    for offset, key, colour, label in (
        (-height / 2, teacher_key, "0.55", "teacher"),
        (height / 2, student_key, "tab:blue", "student"),
    ):
        for i, group in enumerate(groups):
            stat = group.stat(key)
            if not stat.n:
                continue
            ax.barh(
                i + offset,
                stat.mean,
                height=height,
                xerr=stat.std or 0.0,
                color=colour,
                capsize=3,
                label=label if i == 0 or label not in ax.get_legend_handles_labels()[1] else None,
            )
            end = stat.mean + (stat.std or 0.0)
            ax.text(end + pad, i + offset, _pm(stat), va="center", fontsize="small")
            top = max(top, end)
    for i, group in enumerate(groups):
        if not group.stat(teacher_key).n:
            ax.text(pad, i - height / 2, "no teacher", va="center", fontsize="small", color="0.4")
    ax.set_yticks(range(len(groups)), [g.label for g in groups])
    ax.invert_yaxis()
    if table.is_error(student_key):
        ax.set_xlim(0, top * 1.18 or 1.0)
    else:
        ax.set_xlim(0, min(100, top) * 1.18 + 1)
    lower = ", lower is better" if table.lower_is_better else ""
    ax.set_xlabel(f"test {table.title}{unit(table, student_key)}{lower}")
    ax.set_title(
        f"Teacher vs. student: test {table.title} (student: checkpoint best on val)", loc="left"
    )
    ax.grid(axis="x", alpha=0.3)
    figure.legend(loc="outside upper right", ncols=2)
    return _save(figure, path)


def softmax_figure(
    probabilities: np.ndarray,
    temperatures: Sequence[float],
    class_names: Sequence[str],
    path: Path,
    *,
    image: np.ndarray | None = None,
    true_class: int | None = None,
    title: str = "",
    note: str = "",
    num_classes: int | None = None,
) -> Path:
    """Grouped bars of ``softmax(z / T)`` over classes, one colour per temperature (Hinton,
    Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015), beside the image.

    Args:
        probabilities: ``[len(temperatures), len(class_names)]``, rows summing to 1 over
            all classes (the classes shown may be a subset).
        temperatures: The temperature of each row.
        class_names: Names of the classes shown, in the columns' order.
        path: The PNG to write.
        image: The input, ``[H, W]`` or ``[H, W, 3]`` with values in [0, 1], drawn on the left.
        true_class: Column of the true class (its name is marked), if shown.
        title: Figure title.
        note: A line under the bars (e.g. which classes of how many are shown).
        num_classes: Number of classes in all; draws the uniform distribution's level.
    """
    probabilities = np.asarray(probabilities)
    count, classes = probabilities.shape
    figure = Figure(figsize=(3 + max(6.0, 0.45 * classes * (1 + count / 5)), 4.6))
    figure.set_layout_engine("constrained")
    if image is not None:
        image_ax, ax = figure.subplots(1, 2, width_ratios=[1, 4])
        image_ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        image_ax.set_axis_off()
        caption = "input" if true_class is None else f"input (true: {class_names[true_class]})"
        image_ax.set_title(caption, fontsize="medium")
    else:
        ax = figure.subplots()
    width = 0.8 / count
    colours = colormaps["viridis"](np.linspace(0.0, 0.9, count))
    positions = np.arange(classes)
    for row, (temperature, colour) in enumerate(zip(temperatures, colours, strict=True)):
        ax.bar(
            positions - 0.4 + width * (row + 0.5),
            probabilities[row],
            width=width,
            color=colour,
            label=f"T = {temperature:g}",
        )
    if num_classes:
        ax.axhline(1 / num_classes, color="0.3", linestyle=":", label=f"uniform (1/{num_classes})")
    names = [
        f"{name}\n(true)" if i == true_class else str(name) for i, name in enumerate(class_names)
    ]
    rotate = max(len(str(n)) for n in class_names) > 4
    ax.set_xticks(
        positions, names, rotation=45 if rotate else 0, ha="right" if rotate else "center"
    )
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("softmax(z / T)")
    ax.set_xlabel(note or "class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="temperature", ncols=1, fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)
