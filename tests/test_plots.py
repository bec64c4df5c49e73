"""Report figures on hand-made run folders, and a teacher's softened prediction on a tiny run."""

import math

import pytest
import torch
from matplotlib.image import imread
from test_report import acc, make_run

from distill_zoo import teachers, train
from distill_zoo.results import plots, softened
from distill_zoo.results.report import main
from distill_zoo.results.table import collect

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=10_000):
    """A real PNG with something drawn on it (a blank figure compresses to a few KB)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))
    height, width = imread(path).shape[:2]
    assert height > 200 and width > 200


@pytest.fixture
def sweep(tmp_path):
    """KD at T = 1, 2, 4 over seeds 0, 1 (T=2 with one seed), DKD at T = 4, a vanilla
    student over seeds 0, 1, a crashed KD run at T = 8; every run logs val/acc1."""
    root = tmp_path / "sweep"
    for seed in (0, 1):
        for t, (a, b) in {1: (0.60, 0.62), 2: (0.66, None), 4: (0.70, 0.74)}.items():
            if seed == 1 and b is None:
                continue
            value = (a, b)[seed]
            make_run(
                root,
                f"kd_T{t}_s{seed}",
                ["distiller=kd", f"distiller.temperature={t}", f"seed={seed}"],
                acc(value, value - 0.01, teacher=0.8, agreement=0.9),
                curve=[value / 2, value],
            )
        make_run(
            root,
            f"van_s{seed}",
            ["distiller=none", "teacher=none", f"seed={seed}"],
            acc((0.55, 0.57)[seed]),
            curve=[0.3, 0.55],
        )
    make_run(
        root,
        "dkd_T4_s0",
        ["distiller=dkd", "distiller.temperature=4", "seed=0"],
        acc(0.72, teacher=0.8),
        curve=[0.4, 0.72],
    )
    make_run(
        root,
        "kd_T8_s0",
        ["distiller=kd", "distiller.temperature=8", "seed=0"],
        curve=[0.2],
        age_s=3600,
    )
    return root


def test_every_report_figure_is_written_as_a_png(sweep, capsys):
    main([str(sweep)])
    printed, md = capsys.readouterr().out, (sweep / "report.md").read_text()
    folder = sweep / "plots"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "acc_vs_distiller.temperature.png",
        "teacher_vs_student.png",
        "training_curves.png",
    ]
    for name in names:
        assert_png(folder / name)
        assert f"![{name[:-4]}](plots/{name})" in md
        assert f"plot: {folder / name}" in printed


def test_sweep_series_has_one_line_per_distiller_and_the_vanilla_baseline(sweep):
    report = collect(sweep)
    assert plots.swept_keys(report) == ["distiller.temperature"]  # distiller=kd is no number
    lines, baselines = plots.sweep_series(report, "distiller.temperature")
    assert list(lines) == ["distiller=dkd", "distiller=kd"]
    kd = lines["distiller=kd"]
    assert [x for x, _ in kd] == [1.0, 2.0, 4.0]  # the crashed T=8 run has no point
    means = [group.stat("test_acc1_best") for _, group in kd]
    assert [s.mean for s in means] == pytest.approx([61.0, 66.0, 72.0])
    assert [s.n for s in means] == [2, 1, 2]
    assert means[0].std == pytest.approx(math.sqrt(2))
    assert [g.label for g in baselines] == ["distiller=none teacher=none"]
    assert baselines[0].stat("test_acc1_best").mean == pytest.approx(56.0)


def test_a_swept_key_that_vanilla_runs_share_draws_them_as_a_line(tmp_path):
    for epochs in (5, 10):
        for distiller in ("kd", "none"):
            make_run(
                tmp_path,
                f"{distiller}_{epochs}",
                [f"distiller={distiller}", f"epochs={epochs}", "seed=0"],
                acc(0.5 + epochs / 100),
            )
    report = collect(tmp_path)
    assert plots.swept_keys(report) == ["epochs"]
    lines, baselines = plots.sweep_series(report, "epochs")
    assert list(lines) == ["distiller=kd", "distiller=none"] and baselines == []
    assert_png(plots.sweep_figure(report, "epochs", tmp_path / "epochs.png"))


def test_figures_without_their_data_are_skipped(tmp_path):
    make_run(tmp_path, "a", ["distiller=none", "seed=0"], acc(0.5))  # no teacher, no logs
    assert plots.write_all(collect(tmp_path), tmp_path / "plots") == []


def test_softened_probabilities_match_hand_values():
    logits = torch.tensor([0.0, math.log(2.0)])
    probs = softened.softened(logits, [1, 2])
    # T = 1: (1, 2) / 3; T = 2: (1, sqrt 2) / (1 + sqrt 2).
    expected = [1 / 3, 2 / 3, 1 / (1 + math.sqrt(2)), math.sqrt(2) / (1 + math.sqrt(2))]
    assert probs.flatten().tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="positive"):
        softened.softened(logits, [0])


def test_shown_classes_keep_the_true_class():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    assert softened.shown_classes(probs, 0, top_k=10) == [0, 1, 2, 3, 4]
    assert softened.shown_classes(probs, 3, top_k=2) == [1, 3]
    assert softened.shown_classes(probs, 4, top_k=3) == [1, 3, 4]


def test_softmax_figure_of_a_trained_network(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    metrics = train.run(tiny_config("distiller=none", "teacher=none", "epochs=1"), run)
    checkpoint, found_run = softened.find_checkpoint(run)
    assert (checkpoint, found_run) == (run / "checkpoints" / "best-000.ckpt", run)

    main(["--softmax", str(run), "--index", "3"])
    figure = run / "plots" / "softmax_T_test3.png"
    assert f"softened predictions: {figure}" in capsys.readouterr().out
    assert_png(figure)

    # A checkpoint file, and a cached teacher (teacher.pt next to the run's config.yaml).
    out = tmp_path / "elsewhere"
    path = softened.softmax_figure_for(metrics["last_checkpoint"], out=out, top_k=2)
    assert path == out / "plots" / "softmax_T_test0.png"
    assert_png(path)
    state = teachers.extract_state_dict(torch.load(metrics["best_checkpoint"], weights_only=True))
    torch.save(state, run / "teacher.pt")
    assert softened.find_checkpoint(run)[0] == run / "teacher.pt"
    assert softened.find_checkpoint(run / "teacher.pt") == (run / "teacher.pt", run)

    with pytest.raises(IndexError, match="outside the test set"):
        softened.softmax_figure_for(run, index=10_000)


def test_softmax_of_a_checkpoint_without_its_run_is_a_clear_error(tmp_path, capsys):
    stray = tmp_path / "a" / "b" / "model.ckpt"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.yaml next to"):
        softened.find_checkpoint(stray)
    with pytest.raises(FileNotFoundError, match="holds no teacher.pt"):
        softened.find_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        softened.find_checkpoint(tmp_path / "nothing")
    with pytest.raises(SystemExit):
        main(["--softmax", str(stray)])
    assert "--softmax: no config.yaml next to" in capsys.readouterr().err
