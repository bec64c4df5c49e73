"""Attentive imitation and attentive hint training (Saputra et al., ICCV 2019) for regression:
the reliability Phi and the losses by hand, the per-sample teacher errors measured once and
kept across a resume, learning runs, and the two-stage pipeline."""

import csv
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_zoo import train
from distill_zoo.config import compose
from distill_zoo.data import TabularRegressionDataModule
from distill_zoo.distillers import AttentiveHints, AttentiveImitation, DistillContext
from distill_zoo.distillers.attentive_imitation import TeacherReliability
from distill_zoo.losses import (
    attentive_imitation_loss,
    reliability_weighted_mse,
    teacher_reliability,
)
from distill_zoo.pipelines import runner as pipeline
from distill_zoo.tasks import RegressionTask, StepOutputs

FAST = ["trainer=cpu", "logger=csv", "callbacks=none", "report_compression=false"]
TABULAR = ["task=regression", "data=tabular_regression", "student=mlp_small", "teacher=mlp_large"]
"""The diabetes data (320 training samples) with MLPs: a run takes about a second."""
MLP_HINTS = ["distiller.student_layers=blocks.0", "distiller.teacher_layers=blocks.1"]
POSE = [
    "task=regression",
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=32",
]
"""Digit poses with the task's default resnet8 student and resnet20 teacher, tiny."""


# --- the losses by hand ------------------------------------------------------------------


def test_reliability_of_hand_made_errors_is_clamped_at_zero() -> None:
    # eta = max - min = 5 - 1 = 4; Phi = 1 - e/4 = 0.75, 0.5, 0.25, -0.25 -> clamped to 0.
    phi = teacher_reliability(torch.tensor([1.0, 2.0, 3.0, 5.0]))
    assert phi.tolist() == pytest.approx([0.75, 0.5, 0.25, 0.0])
    # An exact teacher on a sample (e = 0) is fully trusted there.
    assert teacher_reliability(torch.tensor([0.0, 2.0, 4.0])).tolist() == [1.0, 0.5, 0.0]
    # eta = 0 (all errors equal): the limit, 1 where exact and 0 elsewhere.
    assert teacher_reliability(torch.tensor([0.0, 0.0])).tolist() == [1.0, 1.0]
    assert teacher_reliability(torch.tensor([3.0])).tolist() == [0.0]
    for bad in ([1.0, -1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="finite errors >= 0"):
            teacher_reliability(torch.tensor(bad))


def test_attentive_imitation_loss_by_hand_and_alpha_one_is_plain_mse() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    target = torch.zeros(2, 2)
    teacher = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    phi = torch.tensor([1.0, 0.5])
    # Supervised: sample 0 mean(1, 0) = 0.5, sample 1 mean(0, 4) = 2 -> mean 1.25.
    # Imitation: s - t = (0, -1) -> 0.5 * Phi 1 = 0.5; (0, 2) -> 2 * Phi 0.5 = 1 -> mean 0.75.
    # alpha 0.5: 0.5 * 1.25 + 0.5 * 0.75 = 1.0.
    assert attentive_imitation_loss(student, target, teacher, phi, 0.5).item() == 1.0
    assert attentive_imitation_loss(student, target, teacher, phi, 1.0).item() == 1.25
    assert attentive_imitation_loss(student, target, teacher, phi, 0.0).item() == 0.75
    assert reliability_weighted_mse(student, teacher, phi).item() == 0.75
    labels = torch.randn(5, 3)
    prediction = torch.randn(5, 3)
    plain = attentive_imitation_loss(prediction, labels, torch.randn(5, 3), torch.rand(5), 1.0)
    torch.testing.assert_close(plain, F.mse_loss(prediction, labels))
    # A sample with Phi = 0 gets no push towards the teacher.
    reliability_weighted_mse(student, teacher, torch.tensor([0.0, 1.0])).backward()
    assert torch.equal(student.grad[0], torch.zeros(2))
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha .* must lie in \[0, 1\]"):
            attentive_imitation_loss(student, target, teacher, phi, alpha)


# --- the distiller and its per-sample teacher errors ---------------------------------------


def tabular_data() -> TabularRegressionDataModule:
    data = TabularRegressionDataModule(batch_size=64)
    data.setup()
    return data


def fake_trainer(data, ckpt_path=None) -> SimpleNamespace:
    """What ``before_training`` reads of a one-process CPU Trainer."""
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(
        datamodule=data, strategy=strategy, global_rank=0, world_size=1, ckpt_path=ckpt_path
    )


def exact_on_first_sample(data) -> nn.Module:
    """A linear teacher whose prediction on training sample 0 is its label exactly."""
    torch.manual_seed(0)
    teacher = nn.Linear(10, 1)
    inputs, targets = data.splits["train"]["inputs"], data.splits["train"]["targets"]
    with torch.no_grad():
        teacher.bias += targets[0] - teacher(inputs[:1])[0]
    return teacher


def imitation(data, teacher: nn.Module, **kwargs) -> AttentiveImitation:
    context = DistillContext(task="regression", num_train_samples=data.num_train_samples)
    return AttentiveImitation(nn.Linear(10, 1), teacher, context=context, **kwargs)


def test_the_teacher_pass_fills_every_samples_error_and_reliability() -> None:
    data = tabular_data()
    teacher = exact_on_first_sample(data)
    distiller = imitation(data, teacher)
    with pytest.raises(RuntimeError, match="not computed yet"):
        distiller.reliability(torch.arange(2))
    distiller.before_training(fake_trainer(data), lambda x: teacher(x))
    inputs, targets = data.splits["train"]["inputs"], data.splits["train"]["targets"]
    with torch.no_grad():
        expected = (teacher(inputs) - targets).square().sum(1)
    buffers = distiller.reliability
    torch.testing.assert_close(buffers.errors, expected)
    assert len(buffers.errors) == 320 and bool(buffers.filled)
    torch.testing.assert_close(buffers.phi, teacher_reliability(expected))
    assert buffers.errors[0].item() == pytest.approx(0.0, abs=1e-10)
    assert buffers.phi[0].item() == pytest.approx(1.0)
    assert buffers.phi.min() >= 0 and buffers.phi[expected.argmax()] == 0
    # One step: alpha * MSE + (1 - alpha) * Phi-weighted imitation, Phi read by index.
    rows = torch.tensor([0, 5, 7])
    student = torch.randn(3, 1)
    out = StepOutputs(
        inputs[rows], targets[rows], rows, student, teacher(inputs[rows]), task=RegressionTask(1)
    )
    terms = distiller(out)
    assert set(terms) == {"mse", "imitation"}
    total = attentive_imitation_loss(
        student, targets[rows], out.teacher_logits, buffers.phi[rows], 0.5
    )
    torch.testing.assert_close(terms["mse"] + terms["imitation"], total)


def test_the_errors_survive_a_state_dict_and_only_a_resumed_run_keeps_them(monkeypatch) -> None:
    data = tabular_data()
    teacher = exact_on_first_sample(data)
    source = imitation(data, teacher)
    source.before_training(fake_trainer(data), lambda x: teacher(x))
    state = source.state_dict()
    assert {"reliability.errors", "reliability.phi", "reliability.filled"} <= set(state)
    restored = imitation(data, teacher)
    restored.load_state_dict(state)
    assert bool(restored.reliability.filled)
    torch.testing.assert_close(restored.reliability.phi, source.reliability.phi)
    fills = []
    monkeypatch.setattr(TeacherReliability, "fill", lambda self, *args: fills.append(1))
    restored.before_training(fake_trainer(data, ckpt_path="last.ckpt"), lambda x: teacher(x))
    assert fills == []  # resumed: kept
    torch.testing.assert_close(restored.reliability(torch.arange(3)), source.reliability.phi[:3])
    # Copied by init_from into a fresh run (perhaps from another teacher): measured again.
    restored.before_training(fake_trainer(data), lambda x: teacher(x))
    assert fills == [1]


def test_a_resumed_run_does_not_measure_the_teacher_again(
    teacher_store, tmp_path, interrupt, monkeypatch
) -> None:
    fills = []
    fill = TeacherReliability.fill
    monkeypatch.setattr(
        TeacherReliability, "fill", lambda self, *a: (fills.append(1), fill(self, *a))[1]
    )
    overrides = [*TABULAR, *FAST, "epochs=2", "distiller=attentive_imitation"]
    cfg = compose([*overrides, f"teacher_store={teacher_store}"])
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train.run(cfg, tmp_path, [interrupt(1)])
    assert fills == [1]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert saved["distiller.reliability.filled"].item()
    train.run(compose([*overrides, f"teacher_store={teacher_store}", "resume=true"]), tmp_path)
    assert fills == [1]
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(final["distiller.reliability.phi"], saved["distiller.reliability.phi"])


def test_clear_errors_for_another_task_and_a_bad_alpha() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(
        ValueError, match="does not serve task=classification: it serves regression"
    ):
        AttentiveImitation(model, model, context=DistillContext(num_train_samples=4))
    context = DistillContext(task="regression", num_train_samples=4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got 1.5"):
        AttentiveImitation(model, model, context=context, alpha=1.5)
    with pytest.raises(ValueError, match="num_train_samples is 0"):
        AttentiveImitation(model, model, context=DistillContext(task="regression"))
    hints = DistillContext(task="classification", example_input=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="serves regression"):
        AttentiveHints(model, model, context=hints, student_layers="", teacher_layers="")


# --- learning ------------------------------------------------------------------------------


def epoch_column(run_dir, name: str) -> list[float]:
    with open(run_dir / "logs" / "csv" / "metrics.csv") as rows:
        return [float(row[name]) for row in csv.DictReader(rows) if row.get(name)]


@pytest.mark.parametrize(
    ("distiller", "term", "extra"),
    [("attentive_imitation", "imitation", []), ("attentive_hints", "hint", MLP_HINTS)],
)
def test_an_attentive_distiller_learns(distiller, term, extra, teacher_store, tmp_path) -> None:
    cfg = compose(
        [*TABULAR, *FAST, "epochs=4", f"distiller={distiller}", *extra]
        + [f"teacher_store={teacher_store}"]
    )
    train.run(cfg, tmp_path)
    losses, terms = (
        epoch_column(tmp_path, "train/loss"),
        epoch_column(tmp_path, f"train/loss_{term}"),
    )
    assert losses[-1] < losses[0]
    assert terms[-1] < terms[0]  # the student moves towards the teacher
    mae = epoch_column(tmp_path, "val/mae")
    assert mae[-1] < mae[0]


def test_the_aht_2stage_pipeline_runs_hints_then_attentive_imitation(
    teacher_store, tmp_path, monkeypatch
) -> None:
    fills = []
    fill = TeacherReliability.fill
    monkeypatch.setattr(
        TeacherReliability, "fill", lambda self, *a: (fills.append(1), fill(self, *a))[1]
    )
    overrides = [*POSE, *FAST, "pipeline=aht_2stage", "pipeline.init_epochs=1", "epochs=1"]
    overrides.append(f"teacher_store={teacher_store}")
    result = pipeline.run(compose(overrides), tmp_path, overrides)
    rows = result["stages"]
    assert [(r["stage"], r["distiller"], r["status"]) for r in rows] == [
        ("hints", "AttentiveHints", "done"),
        ("train", "AttentiveImitation", "done"),
    ]
    assert result["test_mae_last"] is not None
    assert fills == [1, 1]  # each stage measures its teacher itself
    hints_log = (tmp_path / "1_hints" / "logs" / "csv" / "metrics.csv").read_text()
    assert "train/loss_hint" in hints_log and "train/loss_mse" not in hints_log
    stage1 = torch.load(tmp_path / "1_hints" / "checkpoints" / "last.ckpt", weights_only=True)
    stage2 = torch.load(result["last_checkpoint"], weights_only=True)
    assert torch.equal(
        stage1["state_dict"]["distiller.reliability.phi"],
        stage2["state_dict"]["distiller.reliability.phi"],
    )  # the same teacher on the same data: the same reliabilities
