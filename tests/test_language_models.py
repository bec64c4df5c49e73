"""Causal LMs for task=language_modeling: models built from sizes (parameters counted by hand),
loaded from a local save_pretrained folder, greedy and sampled generation, and the task's loss,
metrics (hand-computed perplexity, accuracy, agreement), model checks and sample generations;
the configs that pick and build them."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

from distill_zoo.build import build_model  # noqa: E402
from distill_zoo.config import CONF_DIR, compose  # noqa: E402
from distill_zoo.data.text import TextDataModule  # noqa: E402
from distill_zoo.models.language import (  # noqa: E402
    BLOCK_PREFIX,
    causal_lm,
    check_vocabulary,
    decoder_blocks,
    generate,
    lm_logits,
)
from distill_zoo.tasks import LanguageModelingTask, StepOutputs  # noqa: E402

V = 256  # byte vocabulary
BLOCK = 16
LN2 = math.log(2.0)


def tiny(family: str = "gpt2", vocab: int = V, seed: int = 0, **sizes) -> nn.Module:
    """A one-block causal LM of width 16 (2 heads), 16 positions, seeded."""
    torch.manual_seed(seed)
    options = {"layers": 1, "width": 16, "heads": 2, "max_positions": BLOCK, **sizes}
    return causal_lm(vocab, family=family, **options)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- building from sizes -------------------------------------------------------------------------


def gpt2_parameters(vocab: int, positions: int, d: int, layers: int) -> int:
    """GPT-2 with tied head, MLP ratio 4, every Linear/Conv1D with a bias."""
    block = (
        2 * 2 * d  # ln_1, ln_2: weight and bias of width d each
        + d * 3 * d  # attn.c_attn (q, k, v): d x 3d
        + 3 * d
        + d * d  # attn.c_proj
        + d
        + d * 4 * d  # mlp.c_fc
        + 4 * d
        + 4 * d * d  # mlp.c_proj
        + d
    )
    return vocab * d + positions * d + layers * block + 2 * d  # wte, wpe, blocks, ln_f


def llama_parameters(vocab: int, d: int, hidden: int, layers: int) -> int:
    """Llama: RMSNorms without bias, bias-free projections, SwiGLU MLP, untied head."""
    block = 2 * d + 4 * d * d + 3 * d * hidden  # two RMSNorms, q k v o, gate up down
    return vocab * d + layers * block + d + vocab * d  # embed, blocks, norm, lm_head


def test_gpt2_parameter_count_by_hand():
    # V = 256, d = 16, P = 16, one block:
    # embeddings 256 * 16 = 4096, positions 16 * 16 = 256;
    # block: ln 2 * 2 * 16 = 64, qkv 16 * 48 + 48 = 816, proj 16 * 16 + 16 = 272,
    #        mlp 16 * 64 + 64 = 1088 and 64 * 16 + 16 = 1040 -> 3280; final ln 2 * 16 = 32;
    # head tied to the embeddings: 0. Total 4096 + 256 + 3280 + 32 = 7664.
    model = tiny("gpt2")
    assert count(model) == gpt2_parameters(256, 16, 16, 1) == 7664
    assert model.lm_head.weight is model.transformer.wte.weight
    # Two blocks of width 32, 4 heads, 16 positions: 256 * 32 + 16 * 32 + 2 * 12704 + 64.
    two = tiny("gpt2", layers=2, width=32, heads=4)
    assert count(two) == gpt2_parameters(256, 16, 32, 2) == 8192 + 512 + 2 * 12704 + 64


def test_llama_parameter_count_by_hand():
    # V = 256, d = 16, MLP hidden 4 * 16 = 64, one block:
    # embeddings 4096; block: norms 2 * 16 = 32, attention 4 * 16 * 16 = 1024,
    # SwiGLU 3 * 16 * 64 = 3072 -> 4128; final norm 16; untied head 256 * 16 = 4096.
    # Total 4096 + 4128 + 16 + 4096 = 12336.
    model = tiny("llama")
    assert count(model) == llama_parameters(256, 16, 64, 1) == 12336
    assert model.lm_head.weight is not model.model.embed_tokens.weight


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_built_models_have_the_requested_sizes_and_give_logits(family):
    model = tiny(family, layers=2, width=32, heads=4)
    config = model.config
    assert config.vocab_size == V and config.max_position_embeddings == BLOCK
    assert config.num_hidden_layers == 2 and config.hidden_size == 32
    assert config.num_attention_heads == 4
    blocks = [f"{BLOCK_PREFIX[family]}.{i}" for i in range(2)]
    assert model.feature_layers == decoder_blocks(model) == blocks
    names = dict(model.named_modules())
    assert all(name in names for name in blocks)
    ids = torch.randint(0, V, (3, BLOCK))
    logits = lm_logits(model, ids)
    assert logits.shape == (3, BLOCK, V) and logits.dtype == torch.float32


def test_decoder_blocks_of_a_module_without_blocks():
    assert decoder_blocks(nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4))) == []
    stack = nn.Module()
    stack.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert decoder_blocks(stack) == ["blocks.0", "blocks.1", "blocks.2"]


def test_causal_lm_size_errors():
    with pytest.raises(ValueError, match="family='bert' is not one of"):
        causal_lm(V, family="bert")
    with pytest.raises(ValueError, match="width divisible by heads"):
        causal_lm(V, width=30, heads=4)


def test_lm_logits_of_a_plain_module_and_a_wrong_one():
    table = nn.Embedding(V, V)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(lm_logits(table, ids), table(ids))
    with pytest.raises(TypeError, match="Pair returned tuple"):
        lm_logits(Pair(), ids)


class Pair(nn.Module):
    """Returns a tuple, neither logits nor an object with ``.logits``."""

    def forward(self, ids: torch.Tensor) -> tuple:
        return ids, ids


# --- pretrained folders --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pretrained_folder_gives_the_same_logits(tmp_path, family):
    model = tiny(family).eval()
    model.save_pretrained(tmp_path)
    # The sizes are ignored: the folder's model comes back.
    loaded = causal_lm(V, pretrained=str(tmp_path), layers=5, width=64).eval()
    assert type(loaded) is type(model) and count(loaded) == count(model)
    assert loaded.feature_layers == [f"{BLOCK_PREFIX[family]}.0"]
    ids = torch.randint(0, V, (2, BLOCK))
    with torch.no_grad():
        assert torch.allclose(lm_logits(loaded, ids), lm_logits(model, ids), atol=1e-6)


def test_pretrained_folder_without_config_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json") as error:
        causal_lm(V, pretrained=str(tmp_path))
    assert str(tmp_path) in str(error.value) and "save_pretrained" in str(error.value)


def test_pretrained_vocabulary_smaller_than_the_data_fails(tmp_path):
    tiny("gpt2").save_pretrained(tmp_path)
    # A 256-token model cannot predict the ids 256..299 of a 300-token tokenizer.
    with pytest.raises(ValueError, match="share a vocabulary") as error:
        causal_lm(300, pretrained=str(tmp_path))
    assert "vocabulary of 256 tokens" in str(error.value)
    assert "tokenizer has 300" in str(error.value)
    # A larger model vocabulary (padded table) covers the data's.
    check_vocabulary(tiny("gpt2", vocab=300), V, "the student")
    check_vocabulary(nn.Linear(2, 2), V, "a plain module")  # declares no vocabulary


# --- generation ----------------------------------------------------------------------------------


class NextByte(nn.Module):
    """A bigram LM that is sure the next token is ``(t + 1) % vocab`` (logits 10 there, 0
    elsewhere): greedy decoding counts up from the last prompt token."""

    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.table = nn.Parameter(10 * torch.eye(vocab).roll(1, dims=1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class Constant(nn.Module):
    """Always predicts ``token`` (logit 10, every other 0), whatever the input."""

    def __init__(self, token: int, vocab: int = V) -> None:
        super().__init__()
        self.logits = nn.Parameter(10 * F.one_hot(torch.tensor(token), vocab).float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*ids.shape, -1)


def test_generate_greedy_is_the_argmax_chain():
    model = tiny("gpt2", seed=1)
    model.train()
    prompts = torch.tensor([[10, 20, 30], [65, 66, 67]])
    out = generate(model, prompts, 5)
    assert model.training  # the mode is restored
    assert out.shape == (2, 3 + 5) and torch.equal(out[:, :3], prompts)
    # By hand: append the argmax of the last position's logits, five times.
    model.eval()
    sequence = prompts
    with torch.no_grad():
        for _ in range(5):
            token = lm_logits(model, sequence)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], 1)
    assert torch.equal(out, sequence)
    assert torch.equal(generate(model, prompts, 5), out)  # deterministic
    assert torch.equal(generate(model, prompts, 0), prompts)


def test_generate_sampling_is_reproducible_with_a_seed():
    model = tiny("gpt2", seed=2)
    prompts = torch.tensor([[1, 2, 3, 4]])
    torch.manual_seed(7)
    first = generate(model, prompts, 6, temperature=1.5)
    torch.manual_seed(7)
    second = generate(model, prompts, 6, temperature=1.5)
    assert first.shape == (1, 10) and torch.equal(first, second)
    # Sampling among the top 1 token is greedy decoding.
    assert torch.equal(
        generate(model, prompts, 6, temperature=1.5, top_k=1), generate(model, prompts, 6)
    )


def test_generate_with_a_plain_module():
    model = NextByte(8)
    # Greedy from 0 counts 1 2 3 4 5; from 5 it counts 6 7 and wraps to 0 1 2.
    out = generate(model, torch.tensor([[0], [5]]), 5)
    assert out.tolist() == [[0, 1, 2, 3, 4, 5], [5, 6, 7, 0, 1, 2]]
    # Sampling at temperature 1 from logits 10 vs 0: the counted-up token has probability
    # e^10 / (e^10 + 7) > 0.9996, and top_k=1 leaves only it.
    torch.manual_seed(0)
    sampled = generate(model, torch.tensor([[0], [5]]), 5, temperature=1.0, top_k=1)
    assert torch.equal(sampled, out)
    torch.manual_seed(3)
    first = generate(model, torch.tensor([[2]]), 4, temperature=50.0)
    torch.manual_seed(3)
    assert torch.equal(generate(model, torch.tensor([[2]]), 4, temperature=50.0), first)
    with pytest.raises(ValueError, match="needs a Hugging Face model"):
        generate(model, torch.tensor([[0]]), 2, num_beams=2)


# --- the task: loss and metrics ------------------------------------------------------------------

# Two sequences of two positions over V = 3 tokens; the last position of sequence 2 does not
# count (target -100). Logits are log-probabilities, so softmax gives the rows back.
TARGETS = torch.tensor([[0, 1], [0, -100]])
STUDENT_P = [
    [[1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]],  # target 0: -ln p = ln 2; target 1: ln 2
    [[1 / 4, 1 / 4, 1 / 2], [1 / 8, 1 / 8, 3 / 4]],  # target 0: ln 4;          not counted
]
TEACHER_P = [
    [[1 / 4, 1 / 2, 1 / 4], [1 / 4, 1 / 2, 1 / 4]],  # target 0: ln 4; target 1: ln 2
    [[1 / 4, 1 / 4, 1 / 2], [1 / 8, 1 / 8, 3 / 4]],  # target 0: ln 4; not counted
]
STUDENT = torch.tensor(STUDENT_P).log()
TEACHER = torch.tensor(TEACHER_P).log()
# Student: mean NLL (ln2 + ln2 + 2 ln2) / 3 = 4/3 ln 2 -> perplexity 2^(4/3); argmax 0 1 2
# against targets 0 1 0 -> acc 2/3.
STUDENT_NLL, STUDENT_PPL, STUDENT_ACC = 4 / 3 * LN2, 2 ** (4 / 3), 2 / 3
# Teacher: (2 ln2 + ln2 + 2 ln2) / 3 = 5/3 ln 2 -> perplexity 2^(5/3); argmax 1 1 2 -> acc 1/3.
TEACHER_PPL, TEACHER_ACC = 2 ** (5 / 3), 1 / 3
# Agreement over the 3 counted positions: student 0 1 2, teacher 1 1 2 -> 2/3 (the uncounted
# position agrees too, argmax 2 and 2: counting it would give 3/4).
AGREEMENT = 2 / 3


def step(task: LanguageModelingTask, logits: torch.Tensor, targets: torch.Tensor) -> StepOutputs:
    inputs = torch.zeros_like(targets)
    return StepOutputs(inputs, targets, torch.arange(len(targets)), logits, task=task)


def test_loss_is_cross_entropy_over_counted_positions():
    task = LanguageModelingTask(num_classes=3)
    loss = task.loss(step(task, STUDENT, TARGETS))
    reference = F.cross_entropy(STUDENT.reshape(-1, 3), TARGETS.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    assert loss.item() == pytest.approx(STUDENT_NLL, abs=1e-6)
    chunked = LanguageModelingTask(num_classes=3, chunk_size=1)
    assert chunked.loss(step(chunked, STUDENT, TARGETS)).item() == pytest.approx(
        STUDENT_NLL, abs=1e-6
    )
    assert task.eval_loss(STUDENT, TARGETS).item() == pytest.approx(STUDENT_NLL, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        task.loss(step(task, STUDENT, TARGETS), label_smoothing=0.1)


def test_loss_on_random_logits_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (3, 5))
    targets[0, :2] = -100  # a prompt that does not count
    task = LanguageModelingTask(num_classes=7, chunk_size=4)
    loss = task.loss(step(task, logits, targets))
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, :2].abs().max() == 0  # uncounted positions get no gradient


def test_metrics_on_the_hand_example():
    task = LanguageModelingTask(num_classes=3)
    metrics = task.metrics()
    names = task.update(metrics, STUDENT, TEACHER, TARGETS)
    assert names == ["perplexity", "acc", "teacher_perplexity", "teacher_acc", "agreement"]
    values = {k: v.item() for k, v in task.compute(metrics, names).items()}
    assert values == pytest.approx(
        {
            "perplexity": STUDENT_PPL,  # 2^(4/3) = 2.5198
            "acc": STUDENT_ACC,
            "teacher_perplexity": TEACHER_PPL,  # 2^(5/3) = 3.1748
            "teacher_acc": TEACHER_ACC,
            "agreement": AGREEMENT,
        },
        abs=1e-5,
    )
    assert values["perplexity"] == pytest.approx(math.exp(STUDENT_NLL), abs=1e-5)


def test_metrics_accumulate_over_batches_and_without_a_teacher():
    task = LanguageModelingTask(num_classes=3)
    metrics = task.metrics()
    # The same two sequences, one per batch: perplexity is exp of the mean over all 3 counted
    # positions (not the mean of per-batch perplexities), accuracy 2 right of 3.
    task.update(metrics, STUDENT[:1], TEACHER[:1], TARGETS[:1])
    names = task.update(metrics, STUDENT[1:], TEACHER[1:], TARGETS[1:])
    values = task.compute(metrics, names)
    assert values["perplexity"].item() == pytest.approx(STUDENT_PPL, abs=1e-5)
    assert values["acc"].item() == pytest.approx(STUDENT_ACC, abs=1e-6)
    assert values["agreement"].item() == pytest.approx(AGREEMENT, abs=1e-6)
    alone = task.metrics()
    assert task.update(alone, STUDENT, None, TARGETS) == ["perplexity", "acc"]
    assert task.compute(alone, ["acc"])["acc"].item() == pytest.approx(STUDENT_ACC, abs=1e-6)


def test_prediction_past_the_data_vocabulary_counts_as_wrong():
    task = LanguageModelingTask(num_classes=3)
    metrics = task.metrics()
    # A 4-token model over 3-token data predicts id 3 at the one position, whose target is 2.
    logits = torch.tensor([[[0.0, 0.0, 1.0, 5.0]]])
    task.update(metrics, logits, None, torch.tensor([[2]]))
    assert task.compute(metrics, ["acc"])["acc"].item() == 0.0


def test_logit_rows_are_one_per_position():
    task = LanguageModelingTask(num_classes=3)
    out = step(task, STUDENT, TARGETS)
    out.teacher_logits = TEACHER
    student_rows, teacher_rows = out.logit_rows()
    assert student_rows.shape == teacher_rows.shape == (4, 3)
    assert torch.equal(student_rows[3], STUDENT[1, 1])
    assert out.row_targets().tolist() == [0, 1, 0, -100]


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="task.chunk_size"):
        LanguageModelingTask(chunk_size=0)


# --- the task: model checks ----------------------------------------------------------------------


def lm_task(block_size: int = BLOCK, vocab: int = V) -> LanguageModelingTask:
    task = LanguageModelingTask()
    data = SimpleNamespace(task="language_modeling", num_classes=vocab, block_size=block_size)
    task.setup(data)
    assert task.num_classes == vocab and task.block_size == block_size
    return task


EXAMPLE = torch.zeros(2, BLOCK, dtype=torch.int64)


def test_check_model_accepts_causal_lms_and_keeps_their_mode():
    task = lm_task()
    student, teacher = tiny("gpt2"), tiny("llama")
    student.train()
    task.check_model(student, EXAMPLE, "student")
    task.check_model(teacher, EXAMPLE, "teacher")
    assert student.training
    assert task.vocabularies == {"student": V, "teacher": V}


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_check_model_rejects_a_classifier(role):
    classifier = nn.Sequential(nn.Embedding(V, 4), nn.Flatten(), nn.Linear(4 * BLOCK, 10))
    with pytest.raises(ValueError, match=r"\[batch, length, vocabulary\]") as error:
        lm_task().check_model(classifier, EXAMPLE, role)
    assert f"conf/{role}/lm_*" in str(error.value) and "(2, 10)" in str(error.value)


def test_check_model_rejects_different_vocabularies():
    task = lm_task()
    task.check_model(tiny("gpt2"), EXAMPLE, "student")
    with pytest.raises(ValueError, match="share a vocabulary") as error:
        task.check_model(tiny("gpt2", vocab=300), EXAMPLE, "teacher")
    assert "student predicts 256 tokens and the teacher 300" in str(error.value)


def test_check_model_rejects_a_vocabulary_smaller_than_the_data():
    with pytest.raises(ValueError, match="share a vocabulary") as error:
        lm_task().check_model(tiny("gpt2", vocab=200), EXAMPLE, "student")
    assert "predicts 200 tokens" in str(error.value)


def test_check_model_rejects_a_block_longer_than_the_positions():
    task = lm_task(block_size=32)
    with pytest.raises(ValueError, match="data.block_size=32") as error:
        task.check_model(tiny("gpt2", max_positions=16), torch.zeros(2, 32).long(), "teacher")
    assert "at most 16 positions" in str(error.value) and "teacher.max_positions" in str(
        error.value
    )


# --- the task: sample generations ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pydoc_dm() -> TextDataModule:
    dm = TextDataModule(block_size=BLOCK, batch_size=8)
    dm.setup()
    return dm


def test_write_samples_of_known_models(tmp_path, pydoc_dm):
    task = LanguageModelingTask(sample_prompt="The ", sample_tokens=5)
    task.setup(pydoc_dm)
    # "The " is 4 bytes; 5 new tokens fit the 16-token block (4 + 5 <= 16).
    samples = task.write_samples(tmp_path, Constant(ord("a")), Constant(ord("b")), pydoc_dm)
    expected = {
        "prompt": "The ",
        "new_tokens": 5,
        "decoding": "greedy",
        "student": "aaaaa",
        "teacher": "bbbbb",
    }
    assert samples == expected
    assert json.loads((tmp_path / "samples.json").read_text()) == expected


def test_write_samples_of_tiny_lms(tmp_path, pydoc_dm):
    task = LanguageModelingTask(sample_prompt="The ", sample_tokens=5)
    task.setup(pydoc_dm)
    student, teacher = tiny("gpt2", seed=3), tiny("llama", seed=4)
    samples = task.write_samples(tmp_path, student, teacher, pydoc_dm)
    prompt = torch.tensor([list(b"The ")])
    for role, model in (("student", student), ("teacher", teacher)):
        continuation = generate(model, prompt, 5)[0, 4:]
        assert len(continuation) == 5
        assert samples[role] == pydoc_dm.decode(continuation.tolist())
    assert samples["new_tokens"] == 5
    assert json.loads((tmp_path / "samples.json").read_text()) == samples


def test_write_samples_fit_the_prompt_into_the_block(tmp_path, pydoc_dm):
    task = LanguageModelingTask(sample_tokens=64)  # prompt "The with statement is used to"
    task.setup(pydoc_dm)
    # The 29-byte prompt keeps its last 16 - 1 = 15 bytes, "ment is used to", which leaves
    # min(64, 16 - 15) = 1 new token. Without a teacher there is no teacher sample.
    samples = task.write_samples(tmp_path, Constant(ord("!")), None, pydoc_dm)
    assert samples == {
        "prompt": "The with statement is used to",
        "new_tokens": 1,
        "decoding": "greedy",
        "student": "!",
    }


# --- configs -------------------------------------------------------------------------------------

LM_STUDENTS = sorted(
    p.stem for p in (CONF_DIR / "student").glob("lm_*.yaml") if p.stem != "lm_pretrained"
)


def test_task_language_modeling_picks_its_defaults():
    cfg = compose(["task=language_modeling"])
    assert cfg.task._target_ == "distill_zoo.tasks.LanguageModelingTask"
    assert cfg.data._target_ == "distill_zoo.data.TextDataModule"
    assert cfg.data.source == "pydoc_topics" and cfg.data.tokenizer is None
    assert cfg.student.name == "lm_gpt2_1x128"
    assert cfg.teacher.name == "lm_gpt2_4x256"
    assert cfg.distiller._target_ == "distill_zoo.distillers.token_kd.TokenKD"


def test_the_lm_students_are_all_there():
    assert LM_STUDENTS == [
        "lm_gpt2_1x128",
        "lm_gpt2_2x128",
        "lm_gpt2_4x256",
        "lm_llama_1x128",
        "lm_llama_4x256",
    ]


@pytest.mark.parametrize("name", LM_STUDENTS)
def test_lm_student_configs_build(name):
    cfg = compose(["task=language_modeling", f"student={name}", f"teacher={name}"])
    family, shape = name.removeprefix("lm_").split("_")
    layers, width = map(int, shape.split("x"))
    model = build_model(cfg.student, 256, 0)
    assert model.config.vocab_size == 256
    assert model.config.num_hidden_layers == layers and model.config.hidden_size == width
    # The stages feature methods tap: the config's list, or (null) the model's decoder blocks;
    # either way one block per layer, each a module of the model.
    blocks = [f"{BLOCK_PREFIX[family]}.{i}" for i in range(layers)]
    stages = cfg.student.feature_layers or model.feature_layers
    assert list(stages) == blocks
    names = dict(model.named_modules())
    assert all(layer in names for layer in stages)
    if family == "gpt2":  # hand count with 512 positions
        assert count(model) == gpt2_parameters(256, 512, width, layers)
    else:
        assert count(model) == llama_parameters(256, width, 4 * width, layers)
    # The teacher of the same name is the same model plus a checkpoint entry.
    assert cfg.teacher.ckpt is None
    assert {k: v for k, v in cfg.teacher.items() if k != "ckpt"} == dict(cfg.student)


def test_lm_pretrained_config_builds_from_a_saved_folder(tmp_path):
    saved = tiny("llama", seed=5).eval()
    saved.save_pretrained(tmp_path)
    cfg = compose(
        [
            "task=language_modeling",
            "student=lm_pretrained",
            f"student.pretrained={tmp_path}",
            "teacher=lm_pretrained",
            f"teacher.pretrained={tmp_path}",
        ]
    )
    ids = torch.randint(0, V, (2, BLOCK))
    for node in (cfg.student, cfg.teacher):
        model = build_model(node, 256, 0).eval()
        assert type(model).__name__ == "LlamaForCausalLM" and count(model) == 12336
        with torch.no_grad():
            assert torch.allclose(lm_logits(model, ids), lm_logits(saved, ids), atol=1e-6)


def test_perplexity_stays_finite_where_a_softmax_underflows() -> None:
    # 100 positions of logits [120, 0, 0, 0]: 99 with target 0 (NLL = log(1 + 3 e^-120) ~ 0),
    # one with target 1, whose float32 softmax e^-120 / (1 + 3 e^-120) underflows to 0, so a
    # log of the softmax would make the mean -inf; its NLL is 120 + log(1 + 3 e^-120) ~ 120.
    # Mean NLL 120 / 100 = 1.2: perplexity e^1.2.
    from distill_zoo.tasks.language_modeling import TokenPerplexity

    logits = torch.tensor([120.0, 0.0, 0.0, 0.0]).expand(1, 100, 4)
    targets = torch.zeros(1, 100, dtype=torch.long)
    targets[0, 7] = 1
    metric = TokenPerplexity()
    metric.update(logits, targets)
    assert metric.compute().item() == pytest.approx(math.exp(1.2), rel=1e-5)
