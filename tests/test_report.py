"""The run table: grouping by overrides, mean +- std over seeds, gains over the vanilla
student, running and crashed runs listed, report.md and report.csv."""

import csv
import json
import os
import statistics
import time

import pytest

from distill_zoo.config import compose, folder_name
from distill_zoo.results.report import main
from distill_zoo.results.runs import evaluation_data, find_runs, training_curve
from distill_zoo.results.table import collect, summarise

VANILLA = "distill_zoo.distillers.CrossEntropyOnly"
KD = "distill_zoo.distillers.KD"


def make_run(root, name, overrides, metrics=None, *, curve=None, age_s=None, config=True):
    """A run folder as a Hydra job leaves it.

    Args:
        overrides: Its ``.hydra/overrides.yaml``; ``seed=<n>`` sets the config's seed and
            ``distiller=none`` makes it a vanilla run.
        metrics: ``metrics.json``; ``None``: the run did not finish.
        curve: ``val/acc1`` per epoch (from epoch 0) for ``logs/csv/metrics.csv``.
        age_s: Backdate every file by this many seconds.
        config: Whether to write ``config.yaml`` (a job that crashed at once has none).
    """
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    seed = next((o.split("=")[1] for o in overrides if o.startswith("seed=")), "0")
    target = VANILLA if "distiller=none" in overrides else KD
    if config:
        (run / "config.yaml").write_text(f"seed: {seed}\ndistiller:\n  _target_: {target}\n")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if curve is not None:
        (run / "logs" / "csv").mkdir(parents=True)
        rows = ["epoch,step,train/loss,val/acc1"]
        for epoch, value in enumerate(curve):
            rows += [f"{epoch},{epoch * 5 + 4},,{value}", f"{epoch},{epoch * 5 + 4},0.5,"]
        (run / "logs" / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    if age_s is not None:
        then = time.time() - age_s
        for folder, _, files in os.walk(run):
            for file in files:
                os.utime(os.path.join(folder, file), (then, then))
    return run


def acc(best, last=None, teacher=None, agreement=None):
    return {
        "best_val_acc1": best,
        "test_acc1_best": best,
        "test_acc1_last": best if last is None else last,
        "teacher_test_acc1": teacher,
        "test_agreement_best": agreement,
    }


@pytest.fixture
def sweep(tmp_path):
    """Vanilla and KD students with hand-picked test top-1 (fractions):

    vanilla seeds 0, 1: best 0.60, 0.64, last 0.58, 0.62
    kd T=4  seeds 0, 1: best 0.65, 0.71, last 0.66, 0.68 (teacher 0.80, agreement 0.7, 0.8)
    kd T=1  seed 0:     best 0.66                  (pairs with vanilla seed 0)
    kd T=8  seed 2:     best 0.70                  (no vanilla of seed 2: unpaired)
    kd T=8 student=resnet14 seed 0: 0.5            (no vanilla of that student)
    """
    root = tmp_path / "sweep"
    for seed, (best, last) in enumerate(((0.60, 0.58), (0.64, 0.62))):
        make_run(
            root, f"van{seed}", ["distiller=none", "teacher=none", f"seed={seed}"], acc(best, last)
        )
    for seed, (best, last, agreement) in enumerate(((0.65, 0.66, 0.7), (0.71, 0.68, 0.8))):
        make_run(
            root,
            f"kd4_{seed}",
            ["distiller=kd", "distiller.temperature=4", f"seed={seed}"],
            acc(best, last, teacher=0.80, agreement=agreement),
        )
    make_run(root, "kd1_0", ["distiller=kd", "distiller.temperature=1", "seed=0"], acc(0.66))
    make_run(root, "kd8_2", ["distiller=kd", "distiller.temperature=8", "seed=2"], acc(0.70))
    make_run(
        root,
        "kd8_r14",
        ["distiller=kd", "distiller.temperature=8", "student=resnet14", "seed=0"],
        acc(0.5),
    )
    return root


def by_label(report):
    return {group.label: group for group in report.groups}


def test_groups_by_overrides_without_seed_and_averages(tmp_path):
    for seed, value in ((0, 0.70), (1, 0.74)):
        make_run(
            tmp_path,
            f"T4_s{seed}",
            ["distiller.temperature=4", f"seed={seed}"],
            {"best_val_acc1": value, "test_acc1_best": value - 0.01, "test_acc1_last": value},
        )
    make_run(
        tmp_path,
        "T1_s0",
        ["distiller.temperature=1", "seed=0"],
        {"best_val_acc1": 0.60, "test_acc1_best": 0.59, "test_acc1_last": 0.6},
    )
    crashed = make_run(tmp_path, "T8_s0", ["distiller.temperature=8", "seed=0"], age_s=3600)
    rows, unfinished, common = summarise(tmp_path)
    assert common == []
    assert [r["overrides"] for r in rows] == [
        "distiller.temperature=1",
        "distiller.temperature=4",
        "distiller.temperature=8",
    ]
    t4 = rows[1]
    assert t4["runs"] == 2
    std = statistics.stdev([70.0, 74.0])
    assert t4["best val top-1"] == f"72.00 +- {std:.2f}"
    assert t4["test top-1 (best val)"] == f"71.00 +- {std:.2f}"
    assert rows[0]["best val top-1"] == "60.00"
    assert rows[0]["teacher top-1"] == "-"
    # The crashed run keeps its row (no finished run) and is listed as unfinished.
    assert (rows[2]["runs"], rows[2]["best val top-1"], rows[2]["unfinished"]) == (
        0,
        "-",
        "1 crashed",
    )
    assert unfinished == [crashed]


def test_groups_sort_numbers_as_numbers(tmp_path):
    for t in (16, 2, 4):
        make_run(tmp_path, f"T{t}", [f"distiller.temperature={t}", "seed=0"], acc(0.5))
    labels = [g.label for g in collect(tmp_path).groups]
    assert labels == [f"distiller.temperature={t}" for t in (2, 4, 16)]


def test_overrides_shared_by_all_groups_are_printed_once(tmp_path, capsys):
    for t in (1, 4):
        make_run(
            tmp_path,
            f"T{t}",
            ["data=synthetic", f"distiller.temperature={t}", "seed=0"],
            {"best_val_acc1": 0.5},
        )
    rows, _, common = summarise(tmp_path)
    assert common == ["data=synthetic"]
    assert [r["overrides"] for r in rows] == ["distiller.temperature=1", "distiller.temperature=4"]
    main([str(tmp_path), "--no-plots"])
    assert "common overrides: data=synthetic" in capsys.readouterr().out


def test_main_prints_table_and_unfinished(tmp_path, capsys):
    make_run(tmp_path, "a", ["seed=0"], {"best_val_acc1": 0.5})
    make_run(tmp_path, "b", ["seed=1"])
    main([str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert "| (defaults) | 1 | 50.00 |" in out
    assert "## Unfinished runs" in out and "- running: b (seed 1; no metrics.json" in out


def test_gain_over_vanilla_is_paired_by_seed(sweep):
    groups = by_label(collect(sweep))
    assert groups["distiller=none teacher=none"].vanilla
    kd4 = groups["distiller=kd distiller.temperature=4"]
    assert [g.label for g in kd4.vanilla_groups] == ["distiller=none teacher=none"]
    gain = kd4.gain("test_acc1_best")
    # (65 - 60, 71 - 64) = (5, 7); the means differ by 68 - 62 = 6.
    assert gain.difference == pytest.approx(6.0)
    assert gain.paired.mean == pytest.approx(6.0)
    assert gain.paired.std == pytest.approx(statistics.stdev([5.0, 7.0]))
    assert gain.complete and kd4.gain_text("test_acc1_best") == "+6.00 +- 1.41"
    # Last epoch: (66 - 58, 68 - 62) = (8, 6).
    assert kd4.gain_text("test_acc1_last") == "+7.00 +- 1.41"
    # One seed, paired with vanilla seed 0: 66 - 60.
    assert groups["distiller=kd distiller.temperature=1"].gain_text("test_acc1_best") == "+6.00"
    # Seed 2 has no vanilla run: the difference of the means, said to be unpaired.
    t8 = groups["distiller=kd distiller.temperature=8"]
    assert t8.gain_text("test_acc1_best") == "+8.00 (unpaired)"
    assert t8.gain("test_acc1_best").paired.n == 0
    other = groups["distiller=kd distiller.temperature=8 student=resnet14"]
    assert other.gain("test_acc1_best") is None
    assert other.gain_text("test_acc1_best") == "no vanilla run"
    assert groups["distiller=none teacher=none"].gain_text("test_acc1_best") == "(vanilla)"


def test_report_md_and_csv_are_written_with_the_numbers(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    main([str(sweep), "--out", str(out), "--no-plots"])
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert md in printed
    assert not (sweep / "report.md").exists() and not (out / "plots").exists()
    header = (
        "| overrides | runs | best val top-1 | test top-1 (best val) | test top-1 (last) "
        "| teacher top-1 | agreement | gain (best val) | gain (last) |"
    )
    assert header in md
    std = statistics.stdev([65.0, 71.0])
    assert (
        f"| distiller=kd distiller.temperature=4 | 2 | 68.00 +- {std:.2f} | 68.00 +- {std:.2f} "
        f"| 67.00 +- 1.41 | 80.00 +- 0.00 | 75.00 +- 7.07 | +6.00 +- 1.41 | +7.00 +- 1.41 |"
    ) in md
    assert "| no vanilla run | no vanilla run |" in md

    with (out / "report.csv").open() as handle:
        rows = {row["group"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 5
    kd4 = rows["distiller=kd distiller.temperature=4"]
    assert (kd4["distiller"], kd4["distiller.temperature"], kd4["student"]) == ("kd", "4", "")
    assert (kd4["vanilla"], kd4["vanilla_group"], kd4["n_finished"]) == (
        "0",
        "distiller=none teacher=none",
        "2",
    )
    assert float(kd4["test_acc1_best_mean"]) == pytest.approx(68.0)
    assert float(kd4["test_acc1_best_std"]) == pytest.approx(std)
    assert kd4["test_acc1_best_n"] == "2"
    assert float(kd4["teacher_test_acc1_mean"]) == pytest.approx(80.0)
    assert float(kd4["test_agreement_best_mean"]) == pytest.approx(75.0)
    assert float(kd4["gain_test_acc1_best"]) == pytest.approx(6.0)
    assert float(kd4["gain_test_acc1_best_paired_std"]) == pytest.approx(statistics.stdev([5, 7]))
    assert float(kd4["gain_test_acc1_last_paired_mean"]) == pytest.approx(7.0)
    assert kd4["gain_test_acc1_best_paired_n"] == "2"
    t1 = rows["distiller=kd distiller.temperature=1"]
    assert t1["test_acc1_best_std"] == "" and t1["gain_test_acc1_best_paired_std"] == ""
    t8 = rows["distiller=kd distiller.temperature=8"]
    assert float(t8["gain_test_acc1_best"]) == pytest.approx(8.0)
    assert t8["gain_test_acc1_best_paired_n"] == "0"
    lonely = rows["distiller=kd distiller.temperature=8 student=resnet14"]
    assert lonely["gain_test_acc1_best"] == "" and lonely["vanilla_group"] == ""
    vanilla = rows["distiller=none teacher=none"]
    assert vanilla["vanilla"] == "1" and vanilla["gain_test_acc1_best"] == ""
    assert float(vanilla["test_acc1_last_mean"]) == pytest.approx(60.0)


def test_running_and_crashed_runs_are_listed_never_dropped(tmp_path, capsys):
    make_run(tmp_path, "done", ["distiller=kd", "seed=0"], acc(0.5), curve=[0.3, 0.5])
    make_run(tmp_path, "live", ["distiller=kd", "seed=1"], curve=[0.3, 0.4, 0.45], age_s=60)
    make_run(tmp_path, "dead", ["distiller=kd", "seed=2"], curve=[0.2], age_s=3 * 3600)
    # A Hydra job that failed before its run wrote config.yaml.
    make_run(tmp_path, "early", ["distiller=at", "seed=0"], config=False, age_s=3600)
    report = collect(tmp_path)
    status = {run.path.name: run.status for run in report.runs}
    assert status == {"done": "finished", "live": "running", "dead": "crashed", "early": "crashed"}
    main([str(tmp_path), "--no-plots"])
    md = (tmp_path / "report.md").read_text()
    assert "4 runs in 2 groups (1 finished, 1 running, 2 crashed)" in md
    assert "| distiller=at | 0 | - |" in md and "| 1 crashed |" in md
    assert "| distiller=kd | 1 | 50.00 |" in md and "| 1 running, 1 crashed |" in md
    assert "- running: live (distiller=kd, seed 1; no metrics.json; last logged epoch 3, " in md
    assert "- crashed: dead (distiller=kd, seed 2; no metrics.json; last logged epoch 1, " in md
    assert "last write 3.0 h ago)" in md
    assert "- crashed: early (distiller=at, seed 0; no metrics.json; no epoch logged, " in md
    # A longer patience turns the 3-hour-old run into a running one.
    patient = collect(tmp_path, stale_after_s=4 * 3600)
    assert {run.path.name: run.status for run in patient.unfinished}["dead"] == "running"


def test_training_curve_reads_one_value_per_epoch_from_the_csv_logs(tmp_path):
    logs = tmp_path / "logs" / "csv"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(
        "epoch,step,train/loss,val/acc1\n0,3,,0.5\n0,3,0.9,\n1,7,,0.6\n1,7,0.8,\n1,7,,0.65\n"
        "2,9,0.7,\n"
    )
    assert training_curve(tmp_path) == [(1, 0.5), (2, 0.65)]
    assert training_curve(tmp_path, "train/loss") == [(1, 0.9), (2, 0.8), (3, 0.7)]
    assert training_curve(tmp_path / "nothing") == []


def test_vanilla_runs_elsewhere_give_the_gain(tmp_path, capsys):
    methods, baseline = tmp_path / "methods", tmp_path / "baseline"
    make_run(methods, "kd", ["distiller=kd", "student=resnet8", "seed=0"], acc(0.7))
    make_run(baseline, "van", ["distiller=none", "student=resnet8", "seed=0"], acc(0.6))
    make_run(baseline, "kd_there", ["distiller=kd", "student=resnet8", "seed=0"], acc(0.1))
    (alone,) = collect(methods).groups
    assert alone.gain_text("test_acc1_best") == "no vanilla run"
    report = collect(methods, [baseline])
    groups = by_label(report)
    assert list(groups) == ["distiller=kd", "distiller=none"]  # kd_there is not vanilla
    assert groups["distiller=kd"].gain_text("test_acc1_best") == "+10.00"
    main([str(methods), "--vanilla", str(baseline), "--no-plots"])
    assert "| distiller=kd | 1 | 70.00 |" in capsys.readouterr().out


def test_runs_started_from_code_are_grouped_by_their_config_differences(tmp_path):
    def code_run(name, temperature, seed, value):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(
            f"seed: {seed}\ndistiller:\n  temperature: {temperature}\n  kd_weight: 0.9\n"
        )
        (run / "metrics.json").write_text(json.dumps({"best_val_acc1": value}))

    code_run("a", 4, 0, 0.70)
    code_run("b", 4, 1, 0.74)
    code_run("c", 1, 0, 0.60)
    rows, unfinished, _ = summarise(tmp_path)
    assert [(r["overrides"], r["runs"]) for r in rows] == [
        ("distiller.temperature=1", 1),
        ("distiller.temperature=4", 2),
    ]
    assert rows[1]["best val top-1"].startswith("72.00 +- ")


def test_pipeline_stages_are_grouped_by_stage_across_seeds(tmp_path, capsys):
    for seed, accs in ((0, (0.50, 0.70)), (1, (0.60, 0.80))):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        (folder / "config.yaml").write_text("seed: 0\n")
        (folder / "pipeline.json").write_text(
            json.dumps({"stages": [{"status": "done"}, {"status": "done"}]})
        )
        # Generations of born-again networks share their overrides: only the stage differs.
        for i, value in enumerate(accs, start=1):
            make_run(
                folder, f"{i}_gen{i}", ["pipeline=ban", f"seed={seed}"], {"best_val_acc1": value}
            )
    rows, unfinished, common = summarise(tmp_path)
    assert unfinished == []  # the pipeline folders themselves are not runs
    assert common == ["pipeline=ban"]
    assert [(r["overrides"], r["runs"], r["best val top-1"]) for r in rows] == [
        ("stage=1_gen1", 2, f"55.00 +- {statistics.stdev([50.0, 60.0]):.2f}"),
        ("stage=2_gen2", 2, f"75.00 +- {statistics.stdev([70.0, 80.0]):.2f}"),
    ]
    main([str(tmp_path), "--no-plots"])
    assert f"pipeline {tmp_path / 'seed0'}: 2 of 2 stages done" in capsys.readouterr().out


def test_unfinished_pipeline_stages_are_named(tmp_path, capsys):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "pipeline.json").write_text(
        json.dumps(
            {
                "stages": [
                    {"folder": "1_hints", "status": "done"},
                    {"folder": "2_train", "status": "pending"},
                ]
            }
        )
    )
    make_run(folder, "1_hints", ["distiller=fitnets", "seed=0"], acc(0.3))
    main([str(tmp_path), "--no-plots"])
    assert f"pipeline {folder}: 1 of 2 stages done (not done: 2_train)" in capsys.readouterr().out


def test_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
    assert "--softmax" in capsys.readouterr().err


def test_the_reports_own_files_do_not_make_a_crashed_run_look_alive(tmp_path, capsys):
    run = make_run(tmp_path, "run", ["distiller=kd", "seed=0"], curve=[0.3], age_s=3600)
    for _ in range(2):  # the second report must not take the first one's files for activity
        main([str(run), "--no-plots"])
        (run / "plots").mkdir(exist_ok=True)
        (run / "plots" / "softmax_T_test0.png").write_bytes(b"")
        assert "- crashed: . (distiller=kd, seed 0;" in capsys.readouterr().out


def test_runs_below_folders_named_after_checkpoint_paths_are_found(tmp_path):
    # Sweeps before dz_folder_name nested a job's folder under the path of teacher.ckpt=.
    nested = "teacher.ckpt=out/teacher/checkpoints/best-013.ckpt,seed=0"
    run = make_run(tmp_path, nested, ["seed=0"], acc(0.5))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "config.yaml").write_text("not a run\n")
    assert find_runs(tmp_path) == [run]


def test_sweep_job_folders_do_not_nest_on_paths_and_stay_short():
    assert folder_name("teacher.ckpt=a/b/c.ckpt,seed=1") == "teacher.ckpt=a_b_c.ckpt,seed=1"
    assert folder_name("") == "default"
    long = ",".join(f"distiller.w{i}=0.123456789" for i in range(40))
    assert len(folder_name(long).encode()) <= 200
    assert folder_name(long) != folder_name(long[:-1])  # the hash tells them apart


def test_evaluation_data_serves_images_even_for_runs_that_replayed_augmentations():
    # softened.py had its own copy that kept augment_rounds, which needs on_device: it failed.
    cfg = compose(["data=synthetic", "data.on_device=true", "data.augment_rounds=2"])
    data = evaluation_data(cfg)
    images, targets, _ = next(iter(data.test_dataloader()))
    assert not data.on_device and images.dim() == 4 and len(images) == len(targets)
