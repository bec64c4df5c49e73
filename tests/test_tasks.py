"""Tasks: losses and metrics by hand, distillers across tasks, and start-up mismatch errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_zoo.build import build_run
from distill_zoo.config import CONF_DIR, compose
from distill_zoo.distillers import KD, CrossEntropyOnly, DistillContext
from distill_zoo.distillers.dkd import DKD
from distill_zoo.distillers.fitnets import FitNets
from distill_zoo.losses import mse_to_teacher, pixel_kd_loss
from distill_zoo.tasks import (
    ClassificationTask,
    DetectionTask,
    RegressionTask,
    SegmentationTask,
    StepOutputs,
)


def test_pixel_kd_is_the_per_pixel_softened_kl_averaged_over_pixels() -> None:
    # Two pixels, two classes; T = 2. Pixel 0: s = (0, 0), t = (2, 0); pixel 1: s = t.
    student = torch.tensor([[[[0.0, 1.0]], [[0.0, -1.0]]]])  # [1, 2, 1, 2]
    teacher = torch.tensor([[[[2.0, 1.0]], [[0.0, -1.0]]]])
    t = 2.0
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # teacher pixel 0 at T=2
    q = torch.tensor([0.5, 0.5])
    kl_pixel0 = float((p * (p / q).log()).sum())
    expected = t**2 * (kl_pixel0 + 0.0) / 2  # mean over the 2 pixels
    assert float(pixel_kd_loss(student, teacher, t)) == pytest.approx(expected, rel=1e-6)


def test_pixel_kd_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match="same classes and the same output size"):
        pixel_kd_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2), 1.0)


def test_output_matching_is_the_mean_squared_difference() -> None:
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [0.0, 3.0]])
    assert float(mse_to_teacher(student, teacher)) == pytest.approx((1 + 0 + 0 + 9) / 4)


def segmentation_step(kd_weight=0.5, ce_weight=0.5):
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=3)
    masks = torch.randint(0, 3, (2, 4, 4))
    masks[0, 0, 0] = 255
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = StepOutputs(torch.zeros(2, 3, 4, 4), masks, torch.arange(2), student, teacher, task=task)
    context = DistillContext(task="segmentation")
    kd = KD(
        nn.Identity(), nn.Identity(), context=context, kd_weight=kd_weight, ce_weight=ce_weight
    )
    return kd(out), student, teacher, masks


def test_kd_on_segmentation_is_pixel_kd_plus_ce_over_labelled_pixels() -> None:
    terms, student, teacher, masks = segmentation_step()
    assert float(terms["kd"]) == pytest.approx(0.5 * float(pixel_kd_loss(student, teacher, 4.0)))
    ce = F.cross_entropy(student, masks, ignore_index=255)
    assert float(terms["ce"]) == pytest.approx(0.5 * float(ce))


def test_kd_on_regression_is_output_matching_beside_the_task_loss() -> None:
    task = RegressionTask(num_classes=2, loss="l1")
    student, teacher = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0]])
    out = StepOutputs(torch.zeros(1, 4), targets, torch.arange(1), student, teacher, task=task)
    kd = KD(nn.Identity(), nn.Identity(), context=DistillContext(task="regression"))
    terms = kd(out)
    assert set(terms) == {"l1", "kd"}
    assert float(terms["kd"]) == pytest.approx(0.9 * (1 + 4) / 2)
    assert float(terms["l1"]) == pytest.approx(0.1 * (0 + 2) / 2)


def test_vanilla_uses_each_tasks_loss_under_its_name() -> None:
    task = RegressionTask(num_classes=1)
    out = StepOutputs(torch.zeros(2, 3), torch.ones(2, 1), torch.arange(2), torch.zeros(2, 1))
    out.task = task
    vanilla = CrossEntropyOnly(nn.Identity(), context=DistillContext(task="regression"))
    assert {k: float(v) for k, v in vanilla(out).items()} == {"mse": 1.0}


def test_a_distiller_fails_on_a_task_it_does_not_serve_naming_both() -> None:
    with pytest.raises(ValueError, match=r"DKD does not serve task=segmentation: it serves"):
        DKD(nn.Identity(), nn.Identity(), context=DistillContext(task="segmentation"))
    with pytest.raises(ValueError, match="kd_weight=0.5 adds logit KD.*task=detection"):
        FitNets(
            nn.Identity(),
            nn.Identity(),
            context=DistillContext(task="detection"),
            student_layers="a",
            teacher_layers="b",
            kd_weight=0.5,
        )


def test_segmentation_metrics_by_hand() -> None:
    task = SegmentationTask(num_classes=2)
    metrics = task.metrics()
    targets = torch.tensor([[[0, 0], [1, 255]]])
    # Student predicts class 0 everywhere; teacher is right on every labelled pixel.
    student = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    teacher = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]])
    names = task.update(metrics, student, teacher, targets)
    values = {k: float(v) for k, v in task.compute(metrics, names).items()}
    # Student: class 0 IoU = 2/3 (2 right of 3 predicted), class 1 IoU = 0 -> mIoU 1/3.
    assert values["miou"] == pytest.approx(1 / 3)
    assert values["pixel_acc"] == pytest.approx(2 / 3)
    assert values["teacher_miou"] == pytest.approx(1.0)
    assert values["agreement"] == pytest.approx(2 / 3)  # over the 3 labelled pixels


def test_regression_metrics_are_in_original_units() -> None:
    task = RegressionTask(num_classes=2)

    class Data:
        task, num_classes = "regression", 2
        target_mean, target_std = torch.tensor([10.0, 0.0]), torch.tensor([2.0, 1.0])
        target_names = ["x", "angle"]

    task.setup(Data())
    metrics = task.metrics()
    standardised_truth = torch.zeros(2, 2)
    student = torch.tensor([[1.0, 0.0], [-1.0, 0.5]])  # x off by 2 px each, angle by 0, 0.5
    names = task.update(metrics, student, torch.zeros(2, 2), standardised_truth)
    values = {k: float(v) for k, v in task.compute(metrics, names).items()}
    assert values["mae_x"] == pytest.approx(2.0)
    assert values["mae_angle"] == pytest.approx(0.25)
    assert values["mae"] == pytest.approx((2 + 2 + 0 + 0.5) / 4)
    assert values["rmse"] == pytest.approx(math.sqrt((4 + 4 + 0 + 0.25) / 4))
    assert values["teacher_mae"] == 0.0
    assert values["agreement"] == pytest.approx(values["mae"])  # the teacher is exact here


def test_detection_batches_are_checked_and_empty_images_are_valid() -> None:
    task = DetectionTask(num_classes=3)
    images = torch.zeros(2, 3, 10, 10)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    good = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([2])}
    task.check_batch((images, [empty, good], torch.arange(2)))
    outside = {"boxes": torch.tensor([[1.0, 1.0, 12.0, 5.0]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"box \[1.0, 1.0, 12.0, 5.0\] outside its 10x10"):
        task.check_batch((images, [good, outside], torch.arange(2)))
    background = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match=r"outside 1..2 \(0 is the background\)"):
        task.check_batch((images, [background], torch.arange(1)))


def test_segmentation_masks_beyond_the_classes_are_refused() -> None:
    task = SegmentationTask(num_classes=3)
    task.check_batch((None, torch.tensor([[0, 2, 255]]), None))
    with pytest.raises(ValueError, match="a mask holds class 7, outside 0..2"):
        task.check_batch((None, torch.tensor([[0, 7, 255]]), None))


def test_detection_agreement_scores_the_student_against_confident_teacher_boxes() -> None:
    task = DetectionTask(num_classes=3, agreement_score=0.5)
    metrics = task.metrics()
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    teacher = [
        {
            "boxes": torch.cat([box, box + 5]),
            "scores": torch.tensor([0.9, 0.2]),  # the second is not confident
            "labels": torch.tensor([1, 2]),
        }
    ]
    student = [{"boxes": box, "scores": torch.tensor([0.8]), "labels": torch.tensor([1])}]
    truth = [{"boxes": box, "labels": torch.tensor([1])}]
    names = task.update(metrics, student, teacher, truth)
    values = {k: float(v) for k, v in task.compute(metrics, names).items()}
    assert values["map_50"] == pytest.approx(1.0)
    assert values["agreement"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("task", "data", "student"),
    [
        ("classification", "DigitsDataModule", "resnet20"),
        ("segmentation", "DigitScenesDataModule", "fcn_resnet8"),
        ("detection", "DigitScenesDataModule", "fasterrcnn_resnet8"),
        ("regression", "DigitPoseDataModule", "resnet8"),
    ],
)
def test_each_task_config_picks_matching_data_and_models(task, data, student) -> None:
    cfg = compose([f"task={task}"])
    assert cfg.task.name == task
    assert cfg.data._target_.endswith(data)
    assert cfg.student.name == student
    assert cfg.data.get("task", task) == task
    assert (CONF_DIR / "task" / f"{task}.yaml").is_file()


def test_command_line_choices_win_over_the_tasks_defaults() -> None:
    cfg = compose(["task=segmentation", "student=seg_psp_resnet56", "data.num_train=8"])
    assert cfg.student.name == "psp_resnet56" and cfg.data.num_train == 8


TINY_SCENES = ["data.num_train=16", "data.num_val=8", "data.num_test=8", "data.batch_size=8"]


def test_a_classifier_as_segmentation_student_fails_at_start_up(tmp_path) -> None:
    cfg = compose(
        ["task=segmentation", "student=resnet8", "teacher=none", "distiller=none", *TINY_SCENES]
    )
    with pytest.raises(ValueError, match=r"task=segmentation needs per-pixel logits"):
        build_run(cfg)


def test_detection_data_under_classification_fails_naming_both() -> None:
    cfg = compose(
        ["data=digit_scenes", "data.task=detection", "teacher=none", "distiller=none"]
        + TINY_SCENES
    )
    with pytest.raises(ValueError, match=r"serves task=detection, but task=classification"):
        build_run(cfg)


def test_a_teacher_named_without_checkpoint_needs_the_training_side() -> None:
    cfg = compose(["data=synthetic", "student=resnet8", "teacher=resnet8"])
    with pytest.raises(ValueError, match="teacher.ckpt is null and nothing here trains"):
        build_run(cfg)


def test_the_default_task_is_classification_as_before() -> None:
    assert compose([]).task.name == "classification"
    assert isinstance(ClassificationTask(10).metrics()["acc1"], torch.nn.Module)
