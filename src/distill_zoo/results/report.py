"""Tabulate and plot runs: ``python -m distill_zoo.report <run, sweep or pipeline dir>``.

Finds every run folder below the given one (a folder with ``config.yaml``, or a Hydra job
folder with ``.hydra/``), groups the runs by their command-line overrides without ``seed``,
and shows mean +- std over seeds of the task's metrics: the metric that picks the best
checkpoint on validation (top-1, mIoU, mAP, MAE, perplexity), each summary metric on the test
split for the best-on-val checkpoint and the last epoch (papers report either), the teacher's,
the teacher-student agreement, and the gain over the matching vanilla student
(``distiller=none`` with the same other overrides), paired by seed. Fractions (accuracy, mIoU,
mAP, agreement) are shown in %, errors (a regression's MAE, RMSE and agreement, mean
|student - teacher|) in the data's units, a language model's perplexity as a number (its
next-token accuracy and agreement in %); where lower is better (an error, perplexity) the gain
is vanilla minus student, so a positive gain is an improvement whatever the task. Runs of
several tasks under one folder get one table per task.
Writes ``report.md`` and ``report.csv`` and, unless ``--no-plots``, the figures of
:mod:`distill_zoo.results.plots` into ``plots/``. Trials of an architecture search
(``hparams_search=arch_kd``) also get each teacher's Pareto front of accuracy against MACs
(:mod:`distill_zoo.results.search_report`).

A run without ``metrics.json`` is never dropped: it is *running* if anything in its folder
was written in the last ``--stale-minutes`` (10), else *crashed*. Pipeline folders
(``pipeline.json``) are not runs themselves: each of their stages is grouped as
``stage=<i>_<name>`` plus the stage's overrides, so a sweep over pipeline seeds averages each
stage over the seeds.

``python -m distill_zoo.report --softmax <checkpoint or run dir>`` instead draws one real
test image's softened teacher prediction at T = 1, 2, 4, 8, 16
(:mod:`distill_zoo.results.softened`; classification runs only).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from distill_zoo.results import search_report
from distill_zoo.results.runs import (
    CRASHED,
    FINISHED,
    PIPELINE_SUMMARY,
    PLOTS,
    RUNNING,
    STALE_AFTER_S,
    training_curve,
)
from distill_zoo.results.table import (
    CLASSIFICATION,
    Report,
    TaskTable,
    collect,
    table_of,
    table_rows,
)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no runs)"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(row[h]) for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def _shown(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _age(seconds: float) -> str:
    minutes = max(0, round(seconds / 60))
    return f"{minutes} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def unfinished_lines(report: Report, now: float | None = None) -> list[str]:
    """One line per unfinished run: status, folder, group, last logged epoch, last write."""
    now = time.time() if now is None else now
    lines = []
    for run in report.unfinished:
        curve = training_curve(run.path, f"val/{table_of(run.task).monitor}")
        epoch = f"last logged epoch {curve[-1][0]}, " if curve else "no epoch logged, "
        what = [" ".join(run.overrides)] * bool(run.overrides)
        what += [f"seed {run.seed}"] * (run.seed is not None)
        lines.append(
            f"- {run.status}: {_shown(run.path, report.root)} ({', '.join(what) or 'defaults'}; "
            f"no metrics.json; {epoch}last write {_age(now - run.last_write)} ago)"
        )
    return lines


def pipeline_lines(report: Report) -> list[str]:
    """One line per pipeline folder: how many stages are done, which are not."""
    lines = []
    for folder in report.pipelines:
        stages = json.loads((folder / PIPELINE_SUMMARY).read_text())["stages"]
        done = sum(row.get("status") == "done" for row in stages)
        pending = [r.get("folder") or r.get("stage") for r in stages if r.get("status") != "done"]
        tail = f" (not done: {', '.join(map(str, pending))})" if pending else ""
        lines.append(f"pipeline {folder}: {done} of {len(stages)} stages done{tail}")
    return lines


CLASSIFICATION_TEXT = (
    "Top-1 and agreement in %, mean +- std over the finished seeds of each group; test top-1 "
    "of the checkpoint best on validation and of the last epoch. Gain: test top-1 minus that of "
    "the vanilla student (distiller=none, same other overrides), mean +- std of the per-seed "
    "differences where every seed has a vanilla run of its seed, else the difference of the "
    "means (unpaired)."
)
"""The explanation above a classification table (as before tasks existed)."""

TASK_TEXTS = {
    "segmentation": "mIoU (mean intersection over union of the classes), pixel accuracy and "
    "agreement (share of labelled pixels where student and teacher predict the same class) "
    "in %",
    "detection": "mAP (COCO: IoU 0.5:0.95), mAP@50, mAP@75 and agreement (mAP@50 of the "
    "student's boxes against the teacher's boxes of score >= 0.5) in %",
    "regression": "MAE, RMSE (over all targets; per-target MAE in report.csv) and agreement "
    "(mean |student - teacher|: lower is closer) in the data's units, lower is better",
    "language_modeling": "Perplexity (exp of the mean next-token cross-entropy over the test "
    "tokens) as a number, lower is better; next-token accuracy and agreement (share of "
    "tokens where student and teacher rank the same next token first) in %, higher is better",
}
"""What a table's numbers are, per task."""


def task_text(table: TaskTable) -> str:
    """The explanation above a task's table."""
    if table.task == CLASSIFICATION:
        return CLASSIFICATION_TEXT
    units = TASK_TEXTS.get(table.task, "values as metrics.json holds them")
    if table.lower_is_better:
        gain = (
            f"Gain: the vanilla student's test {table.title} minus this group's (positive: "
            f"the distilled student's {table.title} is lower)"
        )
    else:
        gain = f"Gain: test {table.title} minus that of the vanilla student, in percentage points"
    return (
        f"{units}; mean +- std over the finished seeds of each group; test metrics of the "
        f"checkpoint best on validation {table.title} and of the last epoch. {gain} "
        "(vanilla: distiller=none, same other overrides), mean +- std of the per-seed "
        "differences where every seed has a vanilla run of its seed, else the difference of "
        "the means (unpaired)."
    )


def markdown(report: Report, plots: list[Path] = (), out: Path | None = None) -> str:
    """The whole ``report.md``: one table per task, unfinished runs, pipelines, and links
    to ``plots``."""
    finished = sum(len(g.finished) for g in report.groups)
    counts = ", ".join(
        f"{n} {status}"
        for status, n in (
            (FINISHED, finished),
            (RUNNING, sum(g.count(RUNNING) for g in report.groups)),
            (CRASHED, sum(g.count(CRASHED) for g in report.groups)),
        )
        if n or status == FINISHED
    )
    tasks = report.tasks
    summary = f"{len(report.runs)} runs in {len(report.groups)} groups ({counts})."
    if len(tasks) > 1:
        summary += f" Tasks: {', '.join(tasks)}: one table each."
    parts = [f"# Runs in {report.root}"]
    if len(tasks) <= 1:
        table = report.groups[0].table if report.groups else table_of(CLASSIFICATION)
        parts.append(f"{summary} {task_text(table)}")
    else:
        parts.append(summary)
    if report.common:
        parts.append(f"common overrides: {' '.join(report.common)}")
    if len(tasks) <= 1:
        parts.append(markdown_table(table_rows(report)))
    else:
        for task in tasks:
            table = report.groups_of(task)[0].table
            shared = [o for o in report.common_of(task) if o not in report.common]
            common = f"common overrides of these runs: {' '.join(shared)}\n\n" if shared else ""
            parts.append(
                f"## task={task}\n\n{task_text(table)}\n\n{common}"
                + markdown_table(table_rows(report, task))
            )
    if report.unfinished:
        parts.append("## Unfinished runs\n\n" + "\n".join(unfinished_lines(report)))
    search = search_report.markdown_section(report, markdown_table)  # hparams_search=arch_kd
    if search:
        parts.append(search)
    if report.pipelines:
        parts.append(
            "## Pipelines\n\n" + "\n".join(f"- {line}" for line in pipeline_lines(report))
        )
    if plots:
        where = out or report.root
        parts.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({_shown(p, where)})" for p in plots))
    return "\n\n".join(parts) + "\n"


def csv_keys(report: Report) -> tuple[list[str], list[str]]:
    """The metric and gain keys of the CSV: every task's table columns (in the order of
    :meth:`Report.tasks`), and a regression's per-target MAE (``test_mae_<target>_best``
    and ``_last``, read from ``metrics.json``'s ``test_best``/``test_last``)."""
    metrics, gains = {}, {}
    for task in report.tasks:
        groups = report.groups_of(task)
        table = groups[0].table
        metrics.update(dict.fromkeys(table.columns))
        gains.update(dict.fromkeys(table.gains))
        per_target = {
            name
            for group in groups
            for run in group.finished
            for name in (run.metrics.get("test_best") or {})
            if table.lower_is_better and name.startswith(f"{table.monitor}_")
        }
        for name in sorted(per_target):
            metrics.update(dict.fromkeys([f"test_{name}_best", f"test_{name}_last"]))
    return list(metrics), list(gains)


def csv_rows(report: Report) -> list[dict]:
    """One row per group, numbers unrounded: ``<metric>_mean``, ``_std``, ``_n`` (fractions
    in %, errors in the data's units), the gains (percentage points, or the data's units for
    an error, positive when the student improved), the group's ``task``, and one column per
    override key. A key of another task than the group's is left empty; a key several tasks
    share (``test_agreement_best``) is in the unit of each row's task."""
    keys = sorted({k for g in report.groups for k in g.settings()})
    metric_keys, gain_keys = csv_keys(report)
    rows = []
    for group in report.groups:
        table = group.table
        row = {
            "group": group.label,
            "task": group.task,
            "overrides": " ".join(group.overrides),
            "vanilla": int(group.vanilla),
            "vanilla_group": "; ".join(g.label for g in group.vanilla_groups),
            "n_finished": len(group.finished),
            "n_running": group.count(RUNNING),
            "n_crashed": group.count(CRASHED),
        }
        settings = group.settings()
        row.update({key: settings.get(key, "") for key in keys})
        row["task"] = group.task  # also where a run's config, not a task= override, says it
        for key in metric_keys:
            stat = group.stat(key)
            n = "" if not stat.n and key not in table.columns else stat.n
            row.update({f"{key}_mean": stat.mean, f"{key}_std": stat.std, f"{key}_n": n})
        for key in gain_keys:
            gain = None if group.vanilla or key not in table.gains else group.gain(key)
            row[f"gain_{key}"] = gain and gain.difference
            row[f"gain_{key}_paired_mean"] = gain and gain.paired.mean
            row[f"gain_{key}_paired_std"] = gain and gain.paired.std
            row[f"gain_{key}_paired_n"] = gain.paired.n if gain else ""
        rows.append({k: "" if v is None else v for k, v in row.items()})
    return rows


def write_csv(report: Report, path: Path) -> None:
    rows = csv_rows(report)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["group"])
        writer.writeheader()
        writer.writerows(rows)


def write_report(report: Report, out: Path, plots: bool = True) -> tuple[str, list[Path]]:
    """Writes ``report.md``, ``report.csv`` and (with ``plots``) ``plots/*.png`` into ``out``;
    returns the markdown and the figures' paths."""
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if plots:
        from distill_zoo.results import (
            plots as plotting,  # matplotlib only where figures are asked
        )

        figures = plotting.write_all(report, out / PLOTS)
    text = markdown(report, figures, out)
    (out / "report.md").write_text(text)
    write_csv(report, out / "report.csv")
    return text, figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distill_zoo.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "directory",
        type=Path,
        nargs="?",
        help="a run, sweep (multirun), pipeline or outputs folder",
    )
    parser.add_argument(
        "--out", type=Path, help="where report.md, report.csv and plots/ go (default: directory)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write no figures")
    parser.add_argument(
        "--vanilla",
        type=Path,
        action="append",
        default=[],
        help="a folder with vanilla runs (distiller=none) to compute gains against (repeatable)",
    )
    parser.add_argument(
        "--stale-minutes",
        type=float,
        default=STALE_AFTER_S / 60,
        help="an unfinished run that wrote nothing for this long is reported as crashed",
    )
    parser.add_argument(
        "--softmax",
        type=Path,
        metavar="CKPT_OR_RUN",
        help="draw one test image's softened prediction of this network at several T",
    )
    parser.add_argument("--index", type=int, default=0, help="--softmax: test image index")
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=None, help="--softmax: T values"
    )
    parser.add_argument("--top-k", type=int, default=10, help="--softmax: classes shown at most")
    args = parser.parse_args(argv)
    if args.softmax is None and args.directory is None:
        parser.error("give a folder to report on, or --softmax <checkpoint or run folder>")
    if args.softmax is not None:
        from distill_zoo.results import softened

        try:
            path = softened.softmax_figure_for(
                args.softmax,
                out=args.out,
                index=args.index,
                temperatures=args.temperatures or softened.TEMPERATURES,
                top_k=args.top_k,
            )
        except (FileNotFoundError, IndexError, ValueError) as err:
            parser.error(f"--softmax: {err}")
        print(f"softened predictions: {path}")
        if args.directory is None:
            return
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a folder")
    for folder in args.vanilla:
        if not folder.is_dir():
            parser.error(f"--vanilla {folder} is not a folder")
    report = collect(args.directory, args.vanilla, stale_after_s=60 * args.stale_minutes)
    out = args.out or args.directory
    text, figures = write_report(report, out, plots=not args.no_plots)
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.csv'}")
    for figure in figures:
        print(f"plot: {figure}")
