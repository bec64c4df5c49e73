"""Tabulate and plot runs: ``python -m distill_zoo.report <run, sweep or pipeline dir>``.

Finds every run folder below the given one (a folder with ``config.yaml``, or a Hydra job
folder with ``.hydra/``), groups the runs by their command-line overrides without ``seed``,
and shows mean +- std over seeds of best val top-1, test top-1 of the best-on-val checkpoint
and of the last epoch (papers report either), teacher top-1, teacher-student agreement, and
the gain over the matching vanilla student (``distiller=none`` with the same other
overrides), paired by seed. Writes ``report.md`` and ``report.csv`` and, unless
``--no-plots``, the figures of :mod:`distill_zoo.plots` into ``plots/``.

A run without ``metrics.json`` is never dropped: it is *running* if anything in its folder
was written in the last ``--stale-minutes`` (10), else *crashed*. Pipeline folders
(``pipeline.json``) are not runs themselves: each of their stages is grouped as
``stage=<i>_<name>`` plus the stage's overrides, so a sweep over pipeline seeds averages each
stage over the seeds.

``python -m distill_zoo.report --softmax <checkpoint or run dir>`` instead draws one real
test image's softened teacher prediction at T = 1, 2, 4, 8, 16 (:mod:`distill_zoo.softened`).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from distill_zoo.runs import (
    CRASHED,
    FINISHED,
    PIPELINE_SUMMARY,
    PLOTS,
    RUNNING,
    STALE_AFTER_S,
    Run,
    config_differences,
    find_pipelines,
    find_runs,
    is_distillation_key,
    override_key,
    read_run,
    training_curve,
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
        from distill_zoo import plots as plotting  # matplotlib only where figures are asked

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
        from distill_zoo import softened

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


if __name__ == "__main__":
    main()
