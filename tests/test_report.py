"""The run table: grouping by overrides, mean +- std over seeds, unfinished runs listed."""

import json
import statistics

from distill_zoo.report import main, summarise


def make_run(root, name, overrides, metrics=None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_groups_by_overrides_without_seed_and_averages(tmp_path):
    for seed, acc in ((0, 0.70), (1, 0.74)):
        make_run(
            tmp_path,
            f"T4_s{seed}",
            ["distiller.temperature=4", f"seed={seed}"],
            {"best_val_acc1": acc, "test_acc1_best": acc - 0.01, "test_acc1_last": acc},
        )
    make_run(
        tmp_path,
        "T1_s0",
        ["distiller.temperature=1", "seed=0"],
        {"best_val_acc1": 0.60, "test_acc1_best": 0.59, "test_acc1_last": 0.6},
    )
    crashed = make_run(tmp_path, "T8_s0", ["distiller.temperature=8", "seed=0"])
    rows, unfinished, common = summarise(tmp_path)
    assert common == []
    assert [r["overrides"] for r in rows] == ["distiller.temperature=1", "distiller.temperature=4"]
    t4 = rows[1]
    assert t4["runs"] == 2
    std = statistics.stdev([70.0, 74.0])
    assert t4["best val top-1"] == f"72.00 +- {std:.2f}"
    assert t4["test top-1 (best val)"] == f"71.00 +- {std:.2f}"
    assert rows[0]["best val top-1"] == "60.00"
    assert rows[0]["teacher top-1"] == "-"
    assert unfinished == [crashed]


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
    main([str(tmp_path)])
    assert "common overrides: data=synthetic" in capsys.readouterr().out


def test_main_prints_table_and_unfinished(tmp_path, capsys):
    make_run(tmp_path, "a", ["seed=0"], {"best_val_acc1": 0.5})
    make_run(tmp_path, "b", ["seed=1"])
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| (defaults) | 1 | 50.00 |" in out
    assert "unfinished" in out and str(tmp_path / "b") in out


def test_runs_started_from_code_are_grouped_by_their_config_differences(tmp_path):
    def code_run(name, temperature, seed, acc):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(
            f"seed: {seed}\ndistiller:\n  temperature: {temperature}\n  kd_weight: 0.9\n"
        )
        (run / "metrics.json").write_text(json.dumps({"best_val_acc1": acc}))

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
        for i, acc in enumerate(accs, start=1):
            make_run(
                folder, f"{i}_gen{i}", ["pipeline=ban", f"seed={seed}"], {"best_val_acc1": acc}
            )
    rows, unfinished, common = summarise(tmp_path)
    assert unfinished == []  # the pipeline folders themselves are not runs
    assert common == ["pipeline=ban"]
    assert [(r["overrides"], r["runs"], r["best val top-1"]) for r in rows] == [
        ("stage=1_gen1", 2, f"55.00 +- {statistics.stdev([50.0, 60.0]):.2f}"),
        ("stage=2_gen2", 2, f"75.00 +- {statistics.stdev([70.0, 80.0]):.2f}"),
    ]
    main([str(tmp_path)])
    assert f"pipeline {tmp_path / 'seed0'}: 2 of 2 stages done" in capsys.readouterr().out
