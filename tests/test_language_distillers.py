"""The language-model distillers: each term against its loss function, the teacher's top-k
cache, on-policy steps (GKD), sequence-level KD's teacher text, hidden-state hints, and a
short training run of every one that shows the student learns."""

from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from distill_zoo import train
from distill_zoo.build import build_model
from distill_zoo.config import compose
from distill_zoo.distillers import DistillContext, StepOutputs
from distill_zoo.distillers.fitnets import FitNets
from distill_zoo.distillers.seq_kd import SequenceKD
from distill_zoo.distillers.token_kd import TokenKD
from distill_zoo.losses.language import teacher_topk, token_cross_entropy, token_divergence
from distill_zoo.models.language import causal_lm, generate, lm_logits
from distill_zoo.tasks import LanguageModelingTask

VOCAB, LENGTH, SAMPLES = 16, 8, 6


@pytest.fixture
def models():
    torch.manual_seed(0)
    student = causal_lm(VOCAB, family="gpt2", layers=1, width=16, heads=2, max_positions=32)
    teacher = causal_lm(VOCAB, family="llama", layers=2, width=32, heads=2, max_positions=32)
    return student, teacher.eval().requires_grad_(False)


def context(task: str = "language_modeling") -> DistillContext:
    return DistillContext(
        task=task,
        example_input=torch.zeros(2, LENGTH, dtype=torch.long),
        num_classes=VOCAB,
        num_train_samples=SAMPLES,
    )


def batch(rows=(0, 1, 2)):
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, VOCAB, (SAMPLES, LENGTH + 1), generator=generator)
    indices = torch.tensor(rows)
    return blocks[indices, :-1], blocks[indices, 1:], indices, blocks


def step(distiller, student, teacher, inputs, targets, indices):
    """One training step as DistillationModule runs a teacher-after-student distiller."""
    task = LanguageModelingTask(VOCAB)
    prediction, outputs = distiller.student_forward(
        task, student, inputs, targets, indices=indices, teacher=teacher
    )
    out = StepOutputs(inputs, targets, indices, prediction, student_outputs=outputs, task=task)
    with torch.no_grad():
        out.teacher_outputs = distiller.teacher_pass(teacher, out)
    return out, distiller(out)


CONFIG_DIVERGENCES = {
    "token_kd": "forward_kl",
    "reverse_kl": "reverse_kl",
    "skew_kl": "skew_kl",
    "skew_rkl": "skew_reverse_kl",
    "gkd": "jsd",
}


@pytest.mark.parametrize("name", sorted(CONFIG_DIVERGENCES))
def test_each_config_is_its_papers_divergence(name) -> None:
    node = compose(["task=language_modeling", f"distiller={name}"]).distiller
    assert node.divergence == CONFIG_DIVERGENCES[name]
    assert node.lmbda == (0.5 if name == "gkd" else 0.0)  # GKD's on-policy share
    # DistiLLM's skew, GKD's JSD midpoint, each only where its divergence reads it.
    assert node.alpha == (0.1 if name.startswith("skew") else None)
    assert node.beta == (0.5 if name == "gkd" else None)


@pytest.mark.parametrize("divergence", sorted(set(CONFIG_DIVERGENCES.values())))
def test_token_kd_terms_are_the_weighted_loss_functions(models, divergence) -> None:
    student, teacher = models
    distiller = TokenKD(
        student, teacher, context=context(), divergence=divergence, temperature=2.0
    )
    inputs, targets, indices, _ = batch()
    targets = targets.clone()
    targets[0, :3] = -100  # positions that do not count, in both terms
    out, terms = step(distiller, student, teacher, inputs, targets, indices)
    logits = lm_logits(student, inputs)
    expected_kd = token_divergence(
        logits,
        lm_logits(teacher, inputs),
        targets != -100,
        divergence=divergence,
        temperature=2.0,
        alpha=0.1,
        beta=0.5,
    )
    assert set(terms) == {"ce", "kd"}
    torch.testing.assert_close(terms["kd"], 0.5 * expected_kd)
    torch.testing.assert_close(terms["ce"], 0.5 * token_cross_entropy(logits, targets))


def test_the_topk_cache_skips_the_teacher_once_filled(models) -> None:
    student, teacher = models
    calls = []
    teacher.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    distiller = TokenKD(student, teacher, context=context(), topk=4, temperature=2.0)
    inputs, targets, indices, _ = batch()
    first, terms = step(distiller, student, teacher, inputs, targets, indices)
    assert len(calls) == 1  # a miss: the teacher ran, its top-4 were stored
    second, again = step(distiller, student, teacher, inputs, targets, indices)
    assert len(calls) == 1  # a hit: the teacher did not run
    entry = teacher_topk(lm_logits(teacher, inputs), 4, 2.0)
    cached = second.teacher_outputs["teacher"]
    torch.testing.assert_close(cached.logprobs, entry.logprobs)
    assert torch.equal(cached.indices, entry.indices)
    torch.testing.assert_close(again["kd"], terms["kd"])
    expected = token_divergence(lm_logits(student, inputs), entry, temperature=2.0)
    torch.testing.assert_close(terms["kd"], 0.5 * expected)
    assert float(distiller.monitored()["teacher_cache_hit_rate"]) == 0.5  # 3 of 6 lookups
    # Another batch with one unseen sequence misses as a whole.
    before = len(calls)  # (the lines above ran the teacher themselves)
    step(distiller, student, teacher, *batch((0, 3))[:3])
    assert len(calls) == before + 1


def test_on_policy_steps_score_the_students_own_samples(models) -> None:
    student, teacher = models
    seen = []
    teacher.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    distiller = TokenKD(
        student, teacher, context=context(), divergence="jsd", lmbda=1.0, prompt_length=3
    )
    inputs, targets, indices, _ = batch()
    torch.manual_seed(5)
    out, terms = step(distiller, student, teacher, inputs, targets, indices)
    sequences, mask = out.student_outputs["sequences"], out.student_outputs["mask"]
    assert sequences.shape == inputs.shape
    assert torch.equal(sequences[:, :3], inputs[:, :3])  # the batch's prompts, then samples
    # Positions 2..6 predict the generated tokens 3..7; the last position predicts nothing.
    assert mask[0].tolist() == [False, False, True, True, True, True, True, False]
    assert torch.equal(seen[-1], sequences)  # the teacher scored the student's text
    expected = token_divergence(
        lm_logits(student, sequences), lm_logits(teacher, sequences), mask, divergence="jsd"
    )
    torch.testing.assert_close(terms["kd"], 0.5 * expected)
    # The hard-label term stays on the real text.
    ce = token_cross_entropy(lm_logits(student, inputs), targets)
    torch.testing.assert_close(terms["ce"], 0.5 * ce)


def test_the_share_of_on_policy_steps_follows_lmbda_and_the_seed(models) -> None:
    student, teacher = models

    def pattern(seed: int) -> list[bool]:
        torch.manual_seed(seed)
        distiller = TokenKD(student, teacher, context=context(), lmbda=0.5)
        draws = []
        for _ in range(200):
            draws.append(distiller._on_policy_now())
            distiller.steps += 1
        return draws

    first = pattern(0)
    assert first == pattern(0)  # the same on every process, and after a resume
    assert first != pattern(1)
    assert 70 <= sum(first) <= 130  # Binomial(200, 0.5): mean 100, sd 7
    assert "steps" in TokenKD(student, teacher, context=context()).state_dict()


def test_sequence_kd_trains_on_the_teachers_continuation(models) -> None:
    student, teacher = models
    distiller = SequenceKD(student, teacher, context=context(), prompt_length=3, cache=False)
    inputs, targets, indices, _ = batch()
    out, terms = step(distiller, student, teacher, inputs, targets, indices)
    # The teacher's greedy text: 3 prompt tokens, then 6 tokens (the block's 8 + 1).
    written = generate(teacher, inputs[:, :3], LENGTH + 1 - 3)
    expected_targets = written[:, 1:].clone()
    expected_targets[:, :2] = -100  # positions 0 and 1 predict prompt tokens
    assert torch.equal(out.student_outputs["targets"], expected_targets)
    kd = token_cross_entropy(lm_logits(student, written[:, :-1]), expected_targets)
    torch.testing.assert_close(terms["kd"], 0.5 * kd)
    torch.testing.assert_close(
        terms["ce"], 0.5 * token_cross_entropy(lm_logits(student, inputs), targets)
    )


def test_sequence_kd_caches_the_training_set_once(models) -> None:
    student, teacher = models
    distiller = SequenceKD(student, teacher, context=context(), prompt_length=4, ce_weight=0)
    inputs, targets, indices, blocks = batch((4, 1))
    trainer = SimpleNamespace(
        strategy=None,  # one process: not sharded
        lightning_module=SimpleNamespace(teacher=teacher, device=torch.device("cpu")),
        datamodule=SimpleNamespace(splits={"train": {"blocks": blocks}}),
    )
    distiller.before_training(trainer, None)
    assert torch.equal(distiller.sequences, generate(teacher, blocks[:, :4], LENGTH + 1 - 4))
    out, terms = step(distiller, student, None, inputs, targets, indices)
    assert set(terms) == {"kd"}  # ce_weight 0: Seq-KD alone
    assert torch.equal(out.student_outputs["targets"][:, 3:], distiller.sequences[[4, 1], 4:])
    trainer.datamodule = SimpleNamespace()
    with pytest.raises(ValueError, match="distiller.cache=false"):
        distiller.before_training(trainer, None)


def test_hidden_state_hints_map_the_student_width_linearly(models) -> None:
    student, teacher = models
    ctx = DistillContext(
        task="language_modeling",
        student_stages=student.feature_layers,
        teacher_stages=teacher.feature_layers,
        example_input=torch.zeros(2, LENGTH, dtype=torch.long),
    )
    assert ctx.teacher_stages == ["model.layers.0", "model.layers.1"]
    distiller = FitNets(
        student, teacher, context=ctx, student_layers="last", teacher_layers="last", weight=1.0
    )
    assert isinstance(distiller.regressor, torch.nn.Linear)
    assert (distiller.regressor.in_features, distiller.regressor.out_features) == (16, 32)
    assert distiller.layers() == (["transformer.h.0"], ["model.layers.1"])


def test_knobs_the_run_would_not_read_are_refused(models) -> None:
    student, teacher = models
    with pytest.raises(ValueError, match=r"distiller.alpha would be ignored"):
        TokenKD(student, teacher, context=context(), divergence="forward_kl", alpha=0.3)
    with pytest.raises(ValueError, match=r"distiller.beta would be ignored"):
        TokenKD(student, teacher, context=context(), divergence="skew_kl", beta=0.3)
    with pytest.raises(ValueError, match=r"prompt_length, distiller.sampling_temperature"):
        TokenKD(student, teacher, context=context(), prompt_length=2, sampling_temperature=0.7)
    with pytest.raises(ValueError, match="lmbda=1 makes every step on-policy"):
        TokenKD(student, teacher, context=context(), lmbda=1.0, topk=4)
    with pytest.raises(ValueError, match="topk=17 exceeds the vocabulary of 16"):
        TokenKD(student, teacher, context=context(), topk=17)


def test_token_methods_refuse_other_tasks(models) -> None:
    student, teacher = models
    with pytest.raises(ValueError, match="does not serve task=classification"):
        TokenKD(student, teacher, context=context("classification"))
    with pytest.raises(ValueError, match="divergence='kl' is not one of"):
        TokenKD(student, teacher, context=context(), divergence="kl")
    with pytest.raises(ValueError, match="prompt_length=8 must leave room"):
        TokenKD(student, teacher, context=context(), lmbda=0.5, prompt_length=8)


TINY_LM = [
    "task=language_modeling",
    "student=lm_gpt2_1x128",
    "student.width=32",
    "student.heads=2",
    "teacher=lm_gpt2_2x128",
    "teacher.width=64",
    "teacher.heads=2",
    "data.block_size=32",
    "data.batch_size=16",
    "trainer=cpu",
    "logger=csv",
    "callbacks=none",
    "report_compression=false",
    "epochs=2",
    "+trainer.limit_train_batches=12",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=4",
]
"""A seconds-long language-model run: a 2-block teacher, a 1-block student, 32-byte blocks."""

LM_DISTILLERS = ["token_kd", "reverse_kl", "skew_kl", "skew_rkl", "gkd", "seq_kd", "hidden_kd"]


@pytest.mark.parametrize("distiller", LM_DISTILLERS)
def test_every_language_distiller_learns(distiller, teacher_store, tmp_path) -> None:
    cfg = compose([*TINY_LM, f"teacher_store={teacher_store}", f"distiller={distiller}"])
    metrics = train.run(cfg, tmp_path)
    # An untrained byte model is near uniform (perplexity ~256); 24 steps learn the byte
    # statistics of English text at least.
    assert metrics["test_perplexity_best"] < 100
    assert metrics["teacher_test_perplexity"] < 100
    assert 0 <= metrics["test_agreement_best"] <= 1
    logged = (tmp_path / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_ce" in logged
    assert ("train/loss_hint" if distiller == "hidden_kd" else "train/loss_kd") in logged
    samples = (tmp_path / "samples.json").read_text()
    assert '"student"' in samples and '"teacher"' in samples


def student_weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


@pytest.mark.slow
@pytest.mark.parametrize("distiller", ["gkd", "seq_kd"])
def test_a_resumed_language_run_ends_where_an_uninterrupted_one_does(
    distiller, teacher_store, tmp_path, interrupt
) -> None:
    # GKD with the top-k cache: the on-policy steps follow the step count saved with the run,
    # the student's samples the restored RNG, and the cache (not saved) refills with the same
    # values. Seq-KD: the teacher's greedy text is written again, identically.
    overrides = [*TINY_LM, f"teacher_store={teacher_store}", f"distiller={distiller}"]
    overrides += ["epochs=3", "trainer.limit_train_batches=4"]
    if distiller == "gkd":
        overrides.append("distiller.topk=4")
    full = train.run(compose(overrides), tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train.run(compose(overrides), tmp_path / "cut", [interrupt(2)])
    resumed = train.run(compose([*overrides, "resume=true"]), tmp_path / "cut")
    assert resumed["test_perplexity_last"] == full["test_perplexity_last"]
    first, second = (student_weights(m["last_checkpoint"]) for m in (full, resumed))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_combo_holds_token_kd_with_hidden_states_but_not_steps_that_replace_the_batch() -> None:
    base = ["task=language_modeling", "student=lm_gpt2_1x128", "student.width=32"]
    base += ["student.heads=2", "teacher=lm_gpt2_2x128", "teacher.width=64", "teacher.heads=2"]
    base += ["teacher.ckpt=null", "data.block_size=16", "distiller=combo"]

    def build(parts: str, *more: str):
        cfg = compose([*base, f"distiller.parts={parts}", *more])
        student, teacher = build_model(cfg.student, 256, 0), build_model(cfg.teacher, 256, 0)
        ctx = DistillContext(
            task="language_modeling",
            student_stages=student.feature_layers,
            teacher_stages=teacher.feature_layers,
            example_input=torch.zeros(2, 16, dtype=torch.long),
            num_classes=256,
            num_train_samples=4,
        )
        return instantiate(cfg.distiller, student=student, teacher=teacher, context=ctx)

    assert set(build("[token_kd,hidden_kd]").parts) == {"token_kd", "hidden_kd"}
    with pytest.raises(InstantiationException, match="cannot hold gkd: its on-policy steps"):
        build("[gkd,hidden_kd]")
    with pytest.raises(InstantiationException, match="cannot hold seq_kd: the student learns"):
        build("[seq_kd]")
    with pytest.raises(InstantiationException, match="cannot hold token_kd: its top-k cache"):
        build("[token_kd,hidden_kd]", "+distiller.part_overrides.token_kd.topk=4")
