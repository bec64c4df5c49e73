"""scripts/benchmark_lm.py runs end to end at tiny sizes: the throughput of our LM KD step
against the plain loop (figures printed, not checked beyond being measured), and the memory
table of the token divergence (the bytes autograd keeps worked out by hand)."""

import re
import sys

import torch
from conftest import REPO
from torch import nn

from distill_zoo.distillers.context import DistillContext
from distill_zoo.distillers.token_kd import TokenKD

sys.path.insert(0, str(REPO / "scripts"))
import benchmark_lm  # noqa: E402

ROW = re.compile(
    r"^  (plain loop|ours|plain loop again)\s+(\S+) tok/s\s+(\S+)x\s+data\s+(\S+)% "
    r"teacher\s+(\S+)% student\s+(\S+)%$"
)
"""One throughput row: name, tokens/s, ratio to the plain loop, data/teacher/student shares."""

MEMORY_ROW = re.compile(r"^  (unchunked|chunk_size=4|top-4)" + 5 * r"\s+(\S+)")
"""One memory row: variant, saved MB, peak MB, time ms, |d loss|, |d grad|."""


def test_throughput_of_our_step_against_the_plain_loop(capsys):
    results = benchmark_lm.main(
        ["--device=cpu", "--batch-size=2", "--block-size=16", "--steps=2", "--warmup=1"]
    )
    assert set(results) == {
        "plain",
        "ours",
        "ratio",
        "teacher_share",
        "plain_teacher_share",
        "timed_tokens",
    }
    # 2 timed steps x 2 sequences x 16 predicted tokens (every position of a packed block).
    assert results["timed_tokens"] == 2 * 2 * 16
    assert results["plain"] > 0 and results["ours"] > 0
    assert results["ratio"] == results["ours"] / results["plain"]
    assert 0 < results["teacher_share"] < 100 and 0 < results["plain_teacher_share"] < 100
    out = capsys.readouterr().out
    assert "CPU native bf16: " in out
    assert "batch 2 x 16 tokens, 2 timed steps after 1 warm-up" in out
    assert "lm_gpt2_4x256 -> lm_gpt2_1x128 with token_kd" in out
    assert "V=256" in out  # byte tokens
    assert "differs" not in out  # token_kd is the plain loop's loss: nothing to declare
    rows = {m[1]: m for line in out.splitlines() if (m := ROW.match(line))}
    assert set(rows) == {"plain loop", "ours", "plain loop again"}
    for name, tokens_per_s, ratio, *shares in (m.groups() for m in rows.values()):
        assert float(tokens_per_s) > 0 and float(ratio) > 0, name
        assert abs(sum(map(float, shares)) - 100) < 0.5, name  # the parts add up to the step
        assert 0 < float(shares[1]) < 100, name  # teacher


def test_what_the_plain_loop_leaves_out():
    ctx = DistillContext(
        task="language_modeling",
        example_input=torch.zeros(2, 8, dtype=torch.long),
        num_classes=16,
        num_train_samples=4,
    )
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    assert benchmark_lm.differences(TokenKD(student, teacher, context=ctx)) == ""
    gkd = TokenKD(student, teacher, context=ctx, divergence="jsd", lmbda=0.5)
    assert benchmark_lm.differences(gkd) == "divergence jsd, lmbda 0.5"
    assert benchmark_lm.plain_loss_weights(gkd) == (0.5, 0.5, 1.0)
    chunked = TokenKD(student, teacher, context=ctx, chunk_size=4, temperature=2.0)
    assert benchmark_lm.differences(chunked) == "chunk_size 4 (chunks recomputed in backward)"
    assert benchmark_lm.plain_loss_weights(chunked) == (0.5, 0.5, 2.0)


def test_memory_table_of_the_divergence(capsys):
    results = benchmark_lm.main(
        [
            "--memory",
            "--device=cpu",
            "--vocab=64",
            "--mem-batch=2",
            "--mem-length=8",
            "--dtype=fp32",
            "--chunks",
            "4",
            "--topk=4",
            "--repeats=1",
            "--no-rss",
        ]
    )
    assert list(results) == ["unchunked", "chunk_size=4", "top-4"]
    full, chunked, topk = results.values()
    # Unchunked forward KL keeps log q = log_softmax(s) (saved by log_softmax) and the
    # teacher's p (saved by the product p * (log p - log q)): 2 x (2*8*64 floats * 4 B) = 8192.
    assert full.saved_bytes == 2 * (2 * 8 * 64 * 4)
    # Chunked: checkpointing keeps only the chunk inputs, views of the logits (not counted).
    assert chunked.saved_bytes == 0
    assert chunked.agrees and chunked.loss_diff <= 1e-6 and chunked.grad_diff <= 1e-6
    assert topk.agrees is None and topk.saved_bytes > 0  # an approximation: not checked
    assert all(m.time_ms > 0 and m.peak_mb is None for m in results.values())  # --no-rss
    out = capsys.readouterr().out
    assert "V=64, B=2, L=8, fp32 logits" in out
    rows = {m[1]: m.groups() for line in out.splitlines() if (m := MEMORY_ROW.match(line))}
    assert set(rows) == {"unchunked", "chunk_size=4", "top-4"}
    assert rows["chunk_size=4"][1:3] == ("0.0", "-")  # saved MB, peak (not measured)
    assert out.count(" agree\n") == 2 and "approximation (k+1 buckets)" in out


def test_peak_resident_memory_in_a_fresh_process():
    args = benchmark_lm.parse_args(
        ["--memory", "--vocab=4096", "--mem-batch=4", "--mem-length=64", "--dtype=fp32"]
    )
    spec = benchmark_lm.memory_spec(args, benchmark_lm.Variant("unchunked"))
    (child,) = benchmark_lm.rss_peaks([spec])
    assert child["method"] == "VmHWM"  # Linux: the high-water mark, reset after the inputs
    # One [4, 64, 4096] fp32 tensor is 4 MiB. In the forward at least four live at once:
    # log q, log p, p and log p - log q (then their product): the peak is >= 16 MiB. The
    # whole step allocates about ten such tensors, none of the inputs (2 x 4 MiB) again.
    assert 16 <= child["peak_mb"] < 60
