"""Tabulate and plot runs: ``python -m distill_zoo.report <run, sweep or pipeline dir>``.

Finds every run folder below the given one (a folder with ``config.yaml``, or a Hydra job
folder with ``.hydra/``), groups the runs by their command-line overrides without ``seed``,
and shows mean +- std over seeds of best val top-1, test top-1 of the best-on-val checkpoint
and of the last epoch (papers report either), teacher top-1, teacher-student agreement, and
the gain over the matching vanilla student (``distiller=none`` with the same other
overrides), paired by seed. Writes ``report.md`` and ``report.csv`` and, unless
``--no-plots``, the figures of :mod:`distill_zoo.results.plots` into ``plots/``.

A run without ``metrics.json`` is never dropped: it is *running* if anything in its folder
was written in the last ``--stale-minutes`` (10), else *crashed*. Pipeline folders
(``pipeline.json``) are not runs themselves: each of their stages is grouped as
``stage=<i>_<name>`` plus the stage's overrides, so a sweep over pipeline seeds averages each
stage over the seeds.

``python -m distill_zoo.report --softmax <checkpoint or run dir>`` instead draws one real
test image's softened teacher prediction at T = 1, 2, 4, 8, 16
(:mod:`distill_zoo.results.softened`).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from distill_zoo.results.runs import (
    CRASHED,
    FINISHED,
    PIPELINE_SUMMARY,
    PLOTS,
    RUNNING,
    STALE_AFTER_S,
    training_curve,
)
from distill_zoo.results.table import COLUMNS, GAIN_METRICS, Report, collect, table_rows


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
        curve = training_curve(run.path)
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


def markdown(report: Report, plots: list[Path] = (), out: Path | None = None) -> str:
    """The whole ``report.md``: table, unfinished runs, pipelines, and links to ``plots``."""
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
    parts = [
        f"# Runs in {report.root}",
        f"{len(report.runs)} runs in {len(report.groups)} groups ({counts}). Top-1 and "
        "agreement in %, mean +- std over the finished seeds of each group; test top-1 of the "
        "checkpoint best on validation and of the last epoch. Gain: test top-1 minus that of "
        "the vanilla student (distiller=none, same other overrides), mean +- std of the "
        "per-seed differences where every seed has a vanilla run of its seed, else the "
        "difference of the means (unpaired).",
    ]
    if report.common:
        parts.append(f"common overrides: {' '.join(report.common)}")
    parts.append(markdown_table(table_rows(report)))
    if report.unfinished:
        parts.append("## Unfinished runs\n\n" + "\n".join(unfinished_lines(report)))
    if report.pipelines:
        parts.append(
            "## Pipelines\n\n" + "\n".join(f"- {line}" for line in pipeline_lines(report))
        )
    if plots:
        where = out or report.root
        parts.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({_shown(p, where)})" for p in plots))
    return "\n\n".join(parts) + "\n"


def csv_rows(report: Report) -> list[dict]:
    """One row per group, numbers unrounded: ``<metric>_mean``, ``_std``, ``_n`` in %, the
    gains in percentage points, and one column per override key."""
    keys = sorted({k for g in report.groups for k in g.settings()})
    rows = []
    for group in report.groups:
        row = {
            "group": group.label,
            "overrides": " ".join(group.overrides),
            "vanilla": int(group.vanilla),
            "vanilla_group": "; ".join(g.label for g in group.vanilla_groups),
            "n_finished": len(group.finished),
            "n_running": group.count(RUNNING),
            "n_crashed": group.count(CRASHED),
        }
        settings = group.settings()
        row.update({key: settings.get(key, "") for key in keys})
        for key in COLUMNS:
            stat = group.stat(key)
            row.update({f"{key}_mean": stat.mean, f"{key}_std": stat.std, f"{key}_n": stat.n})
        for key in GAIN_METRICS:
            gain = None if group.vanilla else group.gain(key)
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
