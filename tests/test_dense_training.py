"""Training runs of the dense-prediction distillers: each learns on its task, and a run with a
GAN critic (structured KD's holistic term) resumes with both optimizers exactly restored."""

import math

import lightning as L
import pytest
import torch

from distill_zoo import train
from distill_zoo.config import compose

FAST = ["trainer=cpu", "logger=csv", "callbacks=none", "report_compression=false"]
SCENES = ["data.num_train=192", "data.num_val=32", "data.num_test=32", "data.batch_size=32"]
"""64x64 digit scenes (the default size), enough for a few epochs to show learning."""

TINY_SKD = [
    "task=segmentation",
    "data.num_train=32",
    "data.num_val=16",
    "data.num_test=16",
    "data.batch_size=16",
    "data.image_size=32",
    *FAST,
    "distiller=skd",
]
"""A seconds-long structured-KD run (with its critic) on 32x32 scenes."""

LEARNING = [
    ("segmentation", "skd", "pixel"),
    ("segmentation", "cwd", "cwd"),
    ("detection", "det_kd", "soft_box_head"),
    ("detection", "pkd", "pkd"),
    ("regression", "teacher_bounded", "bounded"),
]


def epoch_column(tmp_path, name: str) -> list[float]:
    rows = (tmp_path / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index(name)
    return [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]


@pytest.mark.parametrize(("task", "distiller", "term"), LEARNING, ids=[d for _, d, _ in LEARNING])
def test_a_dense_distiller_learns(task, distiller, term, teacher_store, tmp_path) -> None:
    scenes = {
        "segmentation": SCENES,
        "detection": [*SCENES, "data.num_train=96"],
        "regression": [*SCENES, "data.num_train=512", "data.batch_size=64"],
    }[task]
    cfg = compose(
        [f"task={task}", *scenes, *FAST, "epochs=3", f"distiller={distiller}"]
        + [f"teacher_store={teacher_store}"]
    )
    train.run(cfg, tmp_path)
    losses, terms = (
        epoch_column(tmp_path, "train/loss"),
        epoch_column(tmp_path, f"train/loss_{term}"),
    )
    assert losses[-1] < losses[0]
    assert terms[-1] < terms[0]  # the student moves towards the teacher
    if task == "segmentation":
        miou = epoch_column(tmp_path, "val/miou")
        assert miou[-1] > miou[0]
    elif task == "regression":
        mae = epoch_column(tmp_path, "val/mae")
        assert mae[-1] < mae[0]
    else:
        # Three epochs on 96 scenes are too few for mAP to settle: the detector's own loss
        # falling beside the distillation term is the learning shown here.
        detector = epoch_column(tmp_path, "train/loss_det")
        assert detector[-1] < detector[0]


def test_a_resumed_skd_run_restores_the_student_critic_and_both_optimizers_bit_for_bit(
    teacher_store, tmp_path, interrupt
) -> None:
    overrides = [*TINY_SKD, "epochs=2", f"teacher_store={teacher_store}"]
    train.run(compose(overrides), tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train.run(compose(overrides), tmp_path / "cut", [interrupt(1)])
    train.run(compose([*overrides, "resume=true"]), tmp_path / "cut")
    whole, cut = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
        for run in ("whole", "cut")
    )
    assert len(whole["optimizer_states"]) == 2  # the student's and the critic's
    assert any(k.startswith("distiller.critic.") for k in whole["state_dict"])
    torch.testing.assert_close(cut["state_dict"], whole["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(cut["optimizer_states"], whole["optimizer_states"], rtol=0, atol=0)


class StudentGradientNorms(L.Callback):
    """The student's gradient norm at each of its optimizer steps."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if optimizer is trainer.optimizers[0]:
            grads = [p.grad for p in module.student.parameters() if p.grad is not None]
            self.norms.append(
                float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            )


def test_gradient_clipping_reaches_the_student_under_an_adversary_and_accumulation_is_refused(
    teacher_store, tmp_path
) -> None:
    overrides = [*TINY_SKD, "epochs=1", f"teacher_store={teacher_store}"]
    norms = StudentGradientNorms()
    train.run(compose([*overrides, "trainer.gradient_clip_val=0.01"]), tmp_path / "clip", [norms])
    assert norms.norms and max(norms.norms) <= 0.01 + 1e-6
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 cannot be honoured"):
        train.run(compose([*overrides, "+trainer.accumulate_grad_batches=2"]), tmp_path / "acc")


DENSE = [("segmentation", "skd"), ("segmentation", "cwd"), ("detection", "det_kd")]
DENSE += [("detection", "det_kd_hints"), ("detection", "pkd"), ("detection", "cwd")]


@pytest.mark.parametrize(("task", "distiller"), DENSE, ids=[f"{d}-{t}" for t, d in DENSE])
def test_a_dense_distiller_steps_under_bf16_mixed_precision(
    task, distiller, teacher_store, tmp_path
) -> None:
    scenes = ["data.num_train=16", "data.num_val=16", "data.num_test=16", "data.batch_size=16"]
    cfg = compose(
        [f"task={task}", *scenes, "data.image_size=32", *FAST, "epochs=1"]
        + [f"distiller={distiller}", "trainer.precision=bf16-mixed"]
        + [f"teacher_store={teacher_store}"]
    )
    train.run(cfg, tmp_path)
    assert all(math.isfinite(v) for v in epoch_column(tmp_path, "train/loss"))
