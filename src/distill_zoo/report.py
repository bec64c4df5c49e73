"""Tabulate runs: ``python -m distill_zoo.report <run or sweep dir>``.

Finds every run folder below the given one (a folder with ``config.yaml``), groups the runs
by their command-line overrides without ``seed``, and prints mean +- std over seeds of the
metrics in each run's ``metrics.json``. Runs without ``metrics.json`` (still running, or
crashed) are listed as unfinished, never dropped. Pipeline folders (``pipeline.json``) are
not runs themselves: each of their stages is grouped as ``stage=<i>_<name>`` plus the
stage's overrides, so a sweep over pipeline seeds averages each stage over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

COLUMNS = {
    "best_val_acc1": "best val top-1",
    "test_acc1_best": "test top-1 (best val)",
    "test_acc1_last": "test top-1 (last)",
    "teacher_test_acc1": "teacher top-1",
    "test_agreement_best": "agreement",
}
IGNORED_OVERRIDES = ("seed", "resume", "ckpt_path", "output_root", "teacher_store")


PIPELINE_SUMMARY = "pipeline.json"


def find_runs(root: Path) -> list[Path]:
    """Run folders below ``root`` (itself included), in path order; pipeline folders are
    left out (their stages are runs)."""
    return sorted(
        p.parent
        for p in root.rglob("config.yaml")
        if not {".hydra", "checkpoints"} & set(p.parts)
        and not (p.parent / PIPELINE_SUMMARY).is_file()
    )


def find_pipelines(root: Path) -> list[Path]:
    """Pipeline folders below ``root`` (itself included)."""
    return sorted(p.parent for p in root.rglob(PIPELINE_SUMMARY))


def stage_of(run: Path) -> list[str]:
    """``["stage=<folder>"]`` for a stage of a pipeline, else ``[]``."""
    return [f"stage={run.name}"] if (run.parent / PIPELINE_SUMMARY).is_file() else []


def _flatten(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else str(node)}


def config_differences(runs: list[Path]) -> dict[Path, list[str]]:
    """``key=value`` for each config key whose value differs between ``runs``: the
    overrides of runs started from code (``train.run``), which Hydra did not record."""
    flat = {run: _flatten(yaml.safe_load((run / "config.yaml").read_text()) or {}) for run in runs}
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if len({f.get(k) for f in flat.values()}) > 1]
    return {run: [f"{k}={f[k]}" for k in varying if k in f] for run, f in flat.items()}


def overrides_of(run: Path, fallback: list[str] | None = None) -> list[str]:
    """The run's command-line overrides that define its group (seed and resume left out);
    ``fallback`` where Hydra recorded none."""
    path = run / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.is_file() else fallback
    return sorted(
        o for o in items or [] if o.split("=", 1)[0].lstrip("+~") not in IGNORED_OVERRIDES
    )


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    scale = 100 if all(0 <= v <= 1 for v in values) else 1  # accuracies are stored as fractions
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} +- {statistics.stdev(values) * scale:.2f}"


def summarise(root: Path) -> tuple[list[dict], list[Path], list[str]]:
    """Rows of the table (one per override group), the unfinished runs, and the overrides
    shared by every group (left out of the rows' labels to keep them short)."""
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    unfinished = []
    runs = find_runs(root)
    differences = config_differences(runs)
    for run in runs:
        metrics_file = run / "metrics.json"
        if not metrics_file.is_file():
            unfinished.append(run)
            continue
        overrides = stage_of(run) + overrides_of(run, fallback=differences[run])
        groups[tuple(overrides)].append(json.loads(metrics_file.read_text()))
    common = sorted(set.intersection(*map(set, groups))) if len(groups) > 1 else []
    rows = []
    for overrides, runs in sorted(groups.items()):
        varying = [o for o in overrides if o not in common]
        label = " ".join(varying) or ("(defaults)" if not overrides else " ".join(overrides))
        row = {"overrides": label, "runs": len(runs)}
        for key, title in COLUMNS.items():
            row[title] = mean_std([r[key] for r in runs if r.get(key) is not None])
        rows.append(row)
    return rows, unfinished, common


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no finished runs)"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(row[h]) for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill_zoo.report", description=__doc__)
    parser.add_argument("directory", type=Path, help="a run, sweep (multirun) or outputs folder")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a folder")
    rows, unfinished, common = summarise(args.directory)
    if common:
        print(f"common overrides: {' '.join(common)}\n")
    print(markdown_table(rows))
    for run in unfinished:
        print(f"unfinished (no metrics.json: still running or crashed): {run}")
    for folder in find_pipelines(args.directory):
        stages = json.loads((folder / PIPELINE_SUMMARY).read_text())["stages"]
        done = sum(row["status"] == "done" for row in stages)
        print(f"pipeline {folder}: {done} of {len(stages)} stages done")


if __name__ == "__main__":
    main()
