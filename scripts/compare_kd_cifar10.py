"""Vanilla vs. KD students on real CIFAR-10, under a short CPU budget.

Measures what logit knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge
in a Neural Network", NIPS 2014 Deep Learning Workshop, 2015, https://arxiv.org/abs/1503.02531)
gains a small student on the project's CIFAR-10 JPEG archive. A teacher is trained once with
cross-entropy; then, for each seed, a student with cross-entropy only (vanilla) and the same
student with ``distiller=kd`` reading that teacher. All runs share the data (a class-balanced
training subset, with the same validation split carved from it), epochs, SGD and the cosine
schedule; only the students' seed varies, and a seed's two students start from the same
weights. Printed, and written to ``<out>/summary.{json,md}``: the teacher's test top-1, and for
both students mean +- std over seeds of test top-1 (best-on-val checkpoint and last epoch) and
best val top-1, and the KD gain (paired by seed).

The defaults (vgg8 -> resnet8, 5,000 training images, 15 epochs, seeds 0 1 2) took 31 minutes
on 2 CPU cores with a test suite running beside them (less on an idle machine). vgg8 costs
per image what resnet32 does, but learns far faster in a short schedule: after 8 epochs
resnet32 was below the vanilla resnet8 (46% vs 49% test top-1), vgg8 well above it (62%).

Each run is an ordinary run folder under ``--out`` (``metrics.json``, checkpoints, CSV logs),
so ``python -m distill_zoo.report <out>`` tabulates it too; finished runs are skipped, so a
re-run resumes. From the repository root::

    python scripts/compare_kd_cifar10.py
    python scripts/compare_kd_cifar10.py --methods kd fitnets at crd   # more distillers
    python scripts/compare_kd_cifar10.py --teacher resnet32 --epochs 60 --extra trainer=gpu

Needs ``../shared/data/cifar10-jpeg.tar.gz`` (the data config's ``data.archive``); exits with
code 2 where it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import yaml

from distill_zoo.config import compose

REPO = Path(__file__).resolve().parents[1]
METRICS = {
    "test_acc1_best": "test top-1 (best val)",
    "test_acc1_last": "test top-1 (last)",
    "best_val_acc1": "best val top-1",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the defaults are the settings of the reported run."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subset", type=int, default=5000, help="training images (0: all)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    parser.add_argument("--teacher", default="vgg8", help="teacher architecture")
    parser.add_argument("--student", default="resnet8", help="student architecture")
    parser.add_argument(
        "--methods", nargs="+", default=["kd"], help="distillers to compare with vanilla"
    )
    parser.add_argument("--data", default="cifar10_jpeg", help="data config (tests: synthetic)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare_kd_cifar10"))
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more overrides for every run, e.g. optim.lr=0.1"
    )
    return parser.parse_args(argv)


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """What every run shares: data, subset, split, budget, optimiser, schedule, trainer."""
    overrides = [
        f"data={args.data}",
        "data.seed=0",  # one validation split for all runs; seeds vary only the students
        "data.num_workers=0",  # decoding is ~100x faster than training: workers only compete
        f"epochs={args.epochs}",
        "optim=sgd",
        "sched=cosine",
        "trainer=cpu",
        "logger=csv",
    ]
    if args.subset:
        overrides.append(f"data.subset={args.subset}")
    return [*overrides, *args.extra]


def find_archive(overrides: list[str]) -> Path | None:
    """The data archive the runs will read (relative paths from the repo root), if any."""
    archive = compose(overrides).data.get("archive")
    if archive is None:
        return None
    path = Path(archive).expanduser()
    return path if path.is_absolute() else (REPO / path).resolve()


def train_once(name: str, overrides: list[str], out: Path) -> dict:
    """Runs ``train.run`` in ``out/name`` unless its ``metrics.json`` exists; returns metrics."""
    from distill_zoo import train  # late: after OMP_WAIT_POLICY is set (see main)

    run_dir = out / name
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        print(f"[skip] {name}: finished earlier", flush=True)
        return json.loads(metrics_file.read_text())
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        overrides = [*overrides, "resume=true"]
    # What Hydra records for a command-line run, so that distill_zoo.report groups runs.
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    print(f"[run]  {name}: {' '.join(overrides)}", flush=True)
    started = time.perf_counter()
    metrics = train.run(compose(overrides), run_dir)
    print(
        f"[done] {name} in {time.perf_counter() - started:.0f} s: "
        f"test top-1 {100 * metrics['test_acc1_best']:.2f}",
        flush=True,
    )
    return metrics


def mean_std(values: list[float]) -> dict:
    """Mean and sample std (0 for one value) in percent."""
    pct = [100 * v for v in values]
    std = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return {"mean": statistics.fmean(pct), "std": std, "n": len(pct)}


def summarise(teacher: dict, vanilla: list[dict], methods: dict[str, list[dict]]) -> dict:
    """Per metric, mean +- std over seeds of each student, the teacher, and each method's
    gain over vanilla (keys ``<method>`` and ``<method>_gain``)."""
    summary: dict = {"teacher": {k: mean_std([teacher[k]]) for k in METRICS}}
    summary["vanilla"] = {k: mean_std([r[k] for r in vanilla]) for k in METRICS}
    for method, runs in methods.items():
        summary[method] = {k: mean_std([r[k] for r in runs]) for k in METRICS}
        # Paired by seed: a seed's students all start from the same weights.
        summary[f"{method}_gain"] = {
            k: mean_std([b[k] - a[k] for a, b in zip(vanilla, runs, strict=True)]) for k in METRICS
        }
    return summary


def markdown(summary: dict, args: argparse.Namespace) -> str:
    """The summary as a markdown table, in percent."""
    titles = {"teacher": f"teacher {args.teacher}", "vanilla": f"vanilla {args.student}"}
    for method in args.methods:
        titles[method] = f"{method.upper()} {args.student}"
        titles[f"{method}_gain"] = f"{method.upper()} gain (paired)"
    lines = [
        "| run | " + " | ".join(METRICS.values()) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for role, title in titles.items():
        cells = []
        for key in METRICS:
            stat = summary[role][key]
            sign = "+" if role.endswith("_gain") and stat["mean"] >= 0 else ""
            std = f" +- {stat['std']:.2f}" if stat["n"] > 1 else ""
            cells.append(f"{sign}{stat['mean']:.2f}{std}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs (or resumes) the comparison; returns the exit code (2: no data archive)."""
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "scripts/compare_kd_cifar10.py", *given])
    shared = shared_overrides(args)
    archive = find_archive(shared)
    if archive is not None:
        if not archive.is_file():
            print(
                f"error: the CIFAR-10 JPEG archive is missing: this script needs {archive} "
                "(../shared/data/cifar10-jpeg.tar.gz from the repository root; or pass "
                "--extra data.archive=<path to cifar10-jpeg.tar.gz>)",
                file=sys.stderr,
            )
            return 2
        shared = [*shared, f"data.archive={archive}"]  # so that any working directory works
    # Two OpenMP threads that busy-wait collapse (4-10x slower) when anything else shares the
    # 2 cores; passive waiting costs nothing when the cores are free. Must precede torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = args.out.resolve()
    started = time.perf_counter()

    teacher = train_once(
        f"teacher-{args.teacher}",
        [*shared, "distiller=none", "teacher=none", f"student={args.teacher}", "seed=0"],
        out,
    )
    vanilla, methods = [], {method: [] for method in args.methods}
    for seed in args.seeds:
        student = [*shared, f"student={args.student}", f"seed={seed}"]
        vanilla.append(
            train_once(
                f"vanilla-{args.student}-seed{seed}",
                [*student, "distiller=none", "teacher=none"],
                out,
            )
        )
        for method, runs in methods.items():
            runs.append(
                train_once(
                    f"{method}-{args.student}-seed{seed}",
                    [
                        *student,
                        f"distiller={method}",
                        f"teacher={args.teacher}",
                        f"teacher.ckpt={teacher['best_checkpoint']}",
                    ],
                    out,
                )
            )

    wall = time.perf_counter() - started
    summary = summarise(teacher, vanilla, methods)
    table = markdown(summary, args)
    seeds = " ".join(map(str, args.seeds))
    note = (
        f"{args.teacher} -> {args.student}, data={args.data} subset={args.subset or 'all'}, "
        f"epochs={args.epochs}, seeds {seeds} (mean +- std over seeds, top-1 in %)"
    )
    runs_s = sum(r["wall_time_s"] for r in [teacher, *vanilla, *sum(methods.values(), [])])
    footer = (
        f"command: {command}\nwall time: {wall / 60:.1f} min ({wall:.0f} s; the runs' own "
        f"wall times, earlier sessions included, add up to {runs_s / 60:.1f} min)"
    )
    print(f"\n{note}\n{table}\n\n{footer}")
    meta = {"command": command, "wall_time_s": round(wall, 1), "runs_wall_time_s": runs_s}
    meta["overrides"] = shared
    (out / "summary.json").write_text(json.dumps({**meta, "note": note, **summary}, indent=2))
    (out / "summary.md").write_text(f"{note}\n\n{table}\n\n{footer}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
