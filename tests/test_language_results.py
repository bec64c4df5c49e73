"""Language models in the compression report (MACs and decoding latency per token) and in the
results report (perplexity as a number, lower is better; next-token accuracy and agreement
in %): hand-counted MACs of tiny GPT-2 models, and hand-made run folders whose numbers are
known."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch
import yaml
from torch import Tensor, nn

from distill_zoo import train
from distill_zoo.config import compose
from distill_zoo.models.language import causal_lm
from distill_zoo.results import plots
from distill_zoo.results.report import main as report_main
from distill_zoo.results.table import TASK_TABLES, collect
from distill_zoo.shipping import compression
from distill_zoo.tasks import LanguageModelingTask

pytest.importorskip("transformers")

VOCAB = 256  # byte tokens
LENGTH = 16  # tokens of the example sequence


def gpt2_macs_per_token(layers: int, width: int, length: int, vocab: int) -> int:
    """Matrix-product MACs per token of a GPT-2 of ``layers`` blocks of width ``d`` on a
    sequence of ``L`` tokens, as its forward computes them (per token, per block):

    - q, k, v projections (one ``c_attn``, d -> 3d): ``3 d^2``;
    - attention scores, the token's row of ``Q K^T``: ``L`` keys x ``d/h`` per head x ``h``
      heads = ``L d`` (the whole ``L x L`` matrix is multiplied; the causal mask only hides
      half of it afterwards), independent of the number of heads;
    - weighted sum of the values, ``softmax(..) V``: again ``L d``;
    - output projection ``c_proj``: ``d^2``;
    - MLP, d -> 4d -> d: ``2 * d * 4d = 8 d^2``;

    so ``12 d^2 + 2 L d`` per block; then the LM head, d -> V: ``d V`` once. Embedding look-ups,
    LayerNorm, GELU, softmax and residual additions are not matrix products (not counted).
    """
    return layers * (12 * width**2 + 2 * length * width) + width * vocab


@pytest.fixture(scope="module")
def lm_pair():
    torch.manual_seed(0)
    student = causal_lm(VOCAB, family="gpt2", layers=1, width=32, heads=2)
    teacher = causal_lm(VOCAB, family="gpt2", layers=2, width=64, heads=4)
    return student, teacher


@pytest.fixture(scope="module")
def lm_report(lm_pair):
    student, teacher = lm_pair
    example = torch.zeros(2, LENGTH, dtype=torch.long)
    return compression.compression_report(
        student, teacher, example, batch_sizes=(1, 4), repeats=2, warmup=1, new_tokens=6
    )


# --- compression report --------------------------------------------------------------------


def test_hand_count_of_gpt2_macs_per_token():
    # Student, d = 32, L = 16, V = 256: 12 * 32^2 = 12288, 2 * 16 * 32 = 1024, one block
    # 13312; head 32 * 256 = 8192; 13312 + 8192 = 21504.
    assert gpt2_macs_per_token(1, 32, LENGTH, VOCAB) == 21504
    # Teacher, d = 64: 12 * 64^2 = 49152, 2 * 16 * 64 = 2048, per block 51200, two blocks
    # 102400; head 64 * 256 = 16384; 102400 + 16384 = 118784.
    assert gpt2_macs_per_token(2, 64, LENGTH, VOCAB) == 118784


def test_lm_macs_per_token_match_the_hand_count(lm_report):
    student, teacher = lm_report["student"], lm_report["teacher"]
    assert student["macs_per_token"] == 21504
    assert teacher["macs_per_token"] == 118784
    # Per sequence of 16 tokens: 16 * 21504 = 344064 and 16 * 118784 = 1900544. (PyTorch's
    # FLOP counter does not know the CPU's fused attention kernel, which would leave out the
    # 2 L d attention MACs per token and block: 16 * (21504 - 1024) = 327680 for the student.
    # The report counts on the math kernel, whose matrix products it knows.)
    assert student["macs_per_image"] == 344064
    assert teacher["macs_per_image"] == 1900544
    # 118784 / 21504 = 5.52380..., rounded to 4 decimals.
    assert lm_report["teacher_over_student"]["macs_per_token"] == 5.5238
    assert lm_report["teacher_over_student"]["macs_per_image"] == 5.5238


def test_lm_latency_per_token_is_timed_for_both_models(lm_report):
    for side in ("student", "teacher"):
        assert lm_report[side]["cpu_latency_ms_per_token"] > 0
        assert lm_report[side]["cpu_latency_ms_batch1"] > 0
    ratio = lm_report["teacher_over_student"]["cpu_latency_ms_per_token"]
    expected = (
        lm_report["teacher"]["cpu_latency_ms_per_token"]
        / lm_report["student"]["cpu_latency_ms_per_token"]
    )
    assert ratio == pytest.approx(expected, abs=1e-4)
    # A prompt of L / 2 = 8 tokens, then the 6 new tokens asked for.
    assert lm_report["generation"] == {
        "prompt_tokens": 8,
        "new_tokens": 6,
        "decoding": "greedy, batch 1, key/value cache",
    }
    assert lm_report["input_shape"] == [LENGTH]
    assert "macs_per_token = macs_per_image / L" in lm_report["note"]
    assert "cpu_latency_ms_per_token" in lm_report["note"]


def test_format_report_shows_the_rows_per_token(lm_report):
    text = compression.format_report(lm_report)
    assert "for a sequence of 16 tokens" in text
    assert "for input" not in text
    # 1900544 -> 1.90M, 344064 -> 344.06K; 118784 -> 118.78K, 21504 -> 21.50K.
    assert f"{'MACs per sequence':<22}{'1.90M':>14}{'344.06K':>14}{'5.52x':>18}" in text
    assert f"{'MACs per token':<22}{'118.78K':>14}{'21.50K':>14}{'5.52x':>18}" in text
    (row,) = [line for line in text.splitlines() if line.startswith("CPU latency per token")]
    assert row.count(" ms") == 2 and row.endswith("x")
    assert "(t(6 new tokens) - t(1)) / 5" in text


class SleepyLM(nn.Module):
    """A non-Hugging-Face LM whose every forward pass takes ``seconds`` (and predicts token 0):
    generating ``n`` tokens runs it ``n`` times."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, input_ids: Tensor) -> Tensor:
        time.sleep(self.seconds)
        return torch.zeros(*input_ids.shape, 4)


def test_latency_per_token_is_the_time_of_each_token_after_the_first():
    # t(n) = n * 10 ms, so (t(5) - t(1)) / (5 - 1) = (50 - 10) / 4 = 10 ms per token.
    prompt = torch.zeros(1, 3, dtype=torch.long)
    latency = compression.cpu_latency_ms_per_token(
        SleepyLM(0.01), prompt, new_tokens=5, repeats=1, warmup=0
    )
    assert 9.5 < latency < 14.0  # sleep overshoots a little, never undershoots


def test_generation_fits_the_models_positions():
    model = causal_lm(VOCAB, family="gpt2", layers=1, width=8, heads=1, max_positions=20)
    # Prompt 16 // 2 = 8 tokens; 20 positions leave 20 - 8 = 12 new tokens of the 32 asked.
    assert compression.generation_lengths(model, 16, 32) == (8, 12)
    assert compression.generation_lengths(model, 16, 4) == (8, 4)
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        compression.generation_lengths(model, 16, 1)


def test_cli_measures_a_finished_lm_run_on_token_ids(tmp_path, teacher_store, capsys):
    # A tiny vanilla run (no teacher): 1 block of width 32 on sequences of 32 byte tokens.
    cfg = compose(
        [
            "task=language_modeling",
            "distiller=none",
            "teacher=none",
            "student.layers=1",
            "student.width=32",
            "student.heads=2",
            "data.block_size=32",
            "trainer=cpu",
            "logger=csv",
            "callbacks=none",
            "epochs=1",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
            "report_compression=false",
            "task.sample_tokens=4",
            f"teacher_store={teacher_store}",
        ]
    )
    train.run(cfg, tmp_path)
    assert compression.main([str(tmp_path), "repeats=1", "warmup=0"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())["compression"]
    # The test split's first sequence, fed as token ids (not floats): d = 32, L = 32:
    # 12 * 32^2 + 2 * 32 * 32 + 32 * 256 = 12288 + 2048 + 8192 = 22528 per token,
    # 32 * 22528 = 720896 per sequence.
    assert report["input_shape"] == [32]
    assert report["student"]["macs_per_token"] == gpt2_macs_per_token(1, 32, 32, VOCAB) == 22528
    assert report["student"]["macs_per_image"] == 720896
    assert report["student"]["cpu_latency_ms_per_token"] > 0
    # Prompt 32 / 2 = 16 tokens, then the default 32 new ones (48 <= 512 positions).
    assert report["generation"]["prompt_tokens"] == 16
    assert report["generation"]["new_tokens"] == compression.NEW_TOKENS == 32
    assert report["teacher"] is None and report["teacher_over_student"] is None
    assert "CPU latency per token" in capsys.readouterr().out


def test_reports_of_other_tasks_have_no_rows_per_token():
    report = compression.compression_report(
        nn.Linear(10, 5), None, torch.zeros(2, 10), batch_sizes=(1,), repeats=1, warmup=0
    )
    assert "macs_per_token" not in report["student"]
    assert "cpu_latency_ms_per_token" not in report["student"]
    assert "generation" not in report
    assert report["note"] == compression.MACS_NOTE
    text = compression.format_report(report)
    assert "for input 10 values" in text and "MACs per sample" in text
    assert "per token" not in text


# --- results report ------------------------------------------------------------------------


def test_language_modeling_table_follows_the_task():
    table = TASK_TABLES["language_modeling"]
    task = LanguageModelingTask
    assert table.monitor == task.monitor.name == "perplexity"
    assert table.lower_is_better and task.monitor.mode == "min"
    for name in task.summary_metrics:
        assert {f"test_{name}_best", f"test_{name}_last"} <= set(table.columns)
    for name in task.teacher_metrics:
        assert f"teacher_test_{name}" in table.columns
    # Perplexity is a number; accuracy and agreement are fractions, shown in %.
    numbers = {k for k in table.columns if table.is_error(k)}
    assert numbers == {
        "best_val_perplexity",
        "test_perplexity_best",
        "test_perplexity_last",
        "teacher_test_perplexity",
    }
    assert table.scale("test_acc_best") == table.scale("test_agreement_best") == 100.0
    assert set(table.gains) == {"test_perplexity_best", "test_perplexity_last"}


def _lm_metrics(best_val, best, last, acc, acc_last, teacher=None, agreement=None) -> dict:
    """``metrics.json`` of a language-modelling run, with the keys a real run writes."""
    ppl_teacher, acc_teacher = teacher or (None, None)
    test = {"perplexity": best, "acc": acc}
    return {
        "task": "language_modeling",
        "monitor": "val/perplexity",
        "best_val_perplexity": best_val,
        "test_perplexity_best": best,
        "test_acc_best": acc,
        "test_perplexity_last": last,
        "test_acc_last": acc_last,
        "teacher_test_perplexity": ppl_teacher,
        "teacher_test_acc": acc_teacher,
        "test_agreement_best": agreement,
        "test_best": test,
        "test_last": {"perplexity": last, "acc": acc_last},
        "epochs": 2,
    }


def _lm_run(root, name, overrides, metrics, curve):
    """A run folder as a Hydra job of ``task=language_modeling`` leaves it: its overrides,
    ``config.yaml`` (seed, task, distiller), ``metrics.json`` and the CSV log of
    ``val/perplexity`` per epoch."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    seed = int(next(o.split("=")[1] for o in overrides if o.startswith("seed=")))
    target = (
        "distill_zoo.distillers.CrossEntropyOnly"
        if "distiller=none" in overrides
        else "distill_zoo.distillers.token_kd.TokenKD"
    )
    config = {
        "seed": seed,
        "task": {
            "_target_": "distill_zoo.tasks.LanguageModelingTask",
            "name": "language_modeling",
        },
        "distiller": {"_target_": target},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "logs" / "csv").mkdir(parents=True)
    rows = ["epoch,step,train/loss,val/perplexity,val/acc"]
    for epoch, value in enumerate(curve):
        rows += [f"{epoch},{epoch * 5 + 4},,{value},0.3", f"{epoch},{epoch * 5 + 4},2.5,,"]
    (run / "logs" / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def lm_sweep(tmp_path):
    """Vanilla student and token-level KD over seeds 0, 1 (perplexity; fractions):

    vanilla s0: best val 39, test 40 (last 42), acc 0.30 (last 0.29)
    vanilla s1: best val 43, test 44 (last 46), acc 0.32 (last 0.31)
    kd s0:      best val 35, test 36 (last 37), acc 0.34 (last 0.33), teacher 20 / 0.45,
                agreement 0.60
    kd s1:      best val 37, test 38 (last 40), acc 0.36 (last 0.35), teacher 20 / 0.45,
                agreement 0.70
    """
    root = tmp_path / "lm"
    vanilla = ["task=language_modeling", "distiller=none", "teacher=none"]
    kd = ["task=language_modeling", "distiller=token_kd"]
    runs = [
        ("van0", [*vanilla, "seed=0"], _lm_metrics(39.0, 40.0, 42.0, 0.30, 0.29)),
        ("van1", [*vanilla, "seed=1"], _lm_metrics(43.0, 44.0, 46.0, 0.32, 0.31)),
        ("kd0", [*kd, "seed=0"], _lm_metrics(35.0, 36.0, 37.0, 0.34, 0.33, (20.0, 0.45), 0.6)),
        ("kd1", [*kd, "seed=1"], _lm_metrics(37.0, 38.0, 40.0, 0.36, 0.35, (20.0, 0.45), 0.7)),
    ]
    for name, overrides, metrics in runs:
        _lm_run(root, name, overrides, metrics, curve=[60.0, metrics["best_val_perplexity"]])
    return root


def test_lm_report_gives_perplexity_as_a_number_with_its_gain_and_accuracy_in_percent(
    lm_sweep, capsys
):
    report_main([str(lm_sweep), "--no-plots"])
    md = (lm_sweep / "report.md").read_text()
    assert "Perplexity (exp of the mean next-token cross-entropy" in md
    assert "the distilled student's perplexity is lower" in md
    assert (
        "| overrides | runs | best val perplexity | test perplexity (best val) "
        "| test perplexity (last) | test next-token acc (best val) | test next-token acc (last) "
        "| teacher perplexity | teacher next-token acc | agreement (same top-1 token) "
        "| perplexity gain = vanilla - student (best val) "
        "| perplexity gain = vanilla - student (last) |"
    ) in md
    # kd: best val (35 + 37) / 2 = 36, std |37 - 35| / sqrt 2 = 1.41; test 37 +- 1.41;
    # last (37 + 40) / 2 = 38.5, std 3 / sqrt 2 = 2.12; acc 35 and 34 % (+- 2 / sqrt 2 =
    # 1.41); teacher 20 and 45 %; agreement (60 + 70) / 2 = 65 %, std 10 / sqrt 2 = 7.07.
    # Gains, vanilla minus kd per seed: best 40 - 36 = 4, 44 - 38 = 6 -> +5.00 +- 1.41;
    # last 42 - 37 = 5, 46 - 40 = 6 -> +5.50 +- 0.71 (lower perplexity: a positive gain).
    assert (
        "| distiller=token_kd | 2 | 36.00 +- 1.41 | 37.00 +- 1.41 | 38.50 +- 2.12 "
        "| 35.00 +- 1.41 | 34.00 +- 1.41 | 20.00 +- 0.00 | 45.00 +- 0.00 | 65.00 +- 7.07 "
        "| +5.00 +- 1.41 | +5.50 +- 0.71 |"
    ) in md
    # vanilla: best val 41, test 42, last 44 (each +- 4 / sqrt 2 = 2.83); acc 31 and 30 %.
    assert (
        "| distiller=none teacher=none | 2 | 41.00 +- 2.83 | 42.00 +- 2.83 | 44.00 +- 2.83 "
        "| 31.00 +- 1.41 | 30.00 +- 1.41 | - | - | - | (vanilla) | (vanilla) |"
    ) in md

    with (lm_sweep / "report.csv").open() as handle:
        rows = {row["group"]: row for row in csv.DictReader(handle)}
    kd = rows["distiller=token_kd"]
    assert kd["task"] == "language_modeling"
    assert float(kd["test_perplexity_best_mean"]) == pytest.approx(37.0)
    assert float(kd["test_acc_best_mean"]) == pytest.approx(35.0)  # 0.35 in %
    assert float(kd["test_agreement_best_mean"]) == pytest.approx(65.0)
    assert float(kd["teacher_test_perplexity_mean"]) == pytest.approx(20.0)
    # Means: vanilla 42 - kd 37 = +5; paired (4, 6): mean 5, std 1.41, 2 seeds.
    assert float(kd["gain_test_perplexity_best"]) == pytest.approx(5.0)
    assert float(kd["gain_test_perplexity_best_paired_mean"]) == pytest.approx(5.0)
    assert float(kd["gain_test_perplexity_best_paired_std"]) == pytest.approx(2**0.5)
    assert kd["gain_test_perplexity_best_paired_n"] == "2"
    # Last epoch: vanilla 44 - kd 38.5 = +5.5.
    assert float(kd["gain_test_perplexity_last"]) == pytest.approx(5.5)


def test_lm_plots_draw_perplexity(lm_sweep):
    report = collect(lm_sweep)
    assert report.tasks == ["language_modeling"]
    written = plots.write_all(report, lm_sweep / "plots")
    assert sorted(p.name for p in written) == ["teacher_vs_student.png", "training_curves.png"]
    assert all(p.stat().st_size > 0 for p in written)
    # No "(%)": perplexity is a number.
    assert plots.panels(TASK_TABLES["language_modeling"]) == {
        "test_perplexity_best": "test perplexity, checkpoint best on val",
        "test_perplexity_last": "test perplexity, last epoch",
    }
