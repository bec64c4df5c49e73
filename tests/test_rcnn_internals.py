"""Faster R-CNN internals for the distiller of Chen et al. (NeurIPS 2017): the step-by-step
training forward equals torchvision's, and a teacher classifies the student's regions."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from distill_zoo.models.detection import detection_model
from distill_zoo.models.rcnn_internals import (
    LOSS_KEYS,
    RCNNTrainPass,
    check_same_regions,
    rcnn_teacher_heads,
    rcnn_train_pass,
)

K = 4  # classes, background included


def _student(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return detection_model("fasterrcnn_resnet8", num_classes=K, fpn_channels=16, **kwargs)


def _teacher(**kwargs) -> nn.Module:
    torch.manual_seed(1)
    options = {"num_classes": K, "fpn_channels": 32, "representation_size": 64, **kwargs}
    return detection_model("fasterrcnn_resnet20", **options)


def _targets(empty: bool = False) -> list[dict[str, Tensor]]:
    boxes = [
        torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 18.0, 60.0, 50.0]]),
        torch.zeros((0, 4)) if empty else torch.tensor([[10.0, 10.0, 34.0, 28.0]]),
    ]
    labels = [
        torch.tensor([1, 3]),
        torch.zeros(0, dtype=torch.int64) if empty else torch.tensor([2]),
    ]
    return [{"boxes": b, "labels": y} for b, y in zip(boxes, labels, strict=True)]


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def student() -> nn.Module:
    return _student().train()


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return _teacher().eval()


@pytest.fixture(scope="module")
def student_pass(student, images) -> RCNNTrainPass:
    torch.manual_seed(3)
    return rcnn_train_pass(student, images, _targets())


@pytest.mark.parametrize("empty", [False, True], ids=["boxes", "empty_image"])
def test_losses_equal_torchvision(student, images, empty):
    torch.manual_seed(7)
    expected = student(list(images), _targets(empty))
    torch.manual_seed(7)
    ours = rcnn_train_pass(student, images, _targets(empty))
    assert set(ours.losses) == set(expected) == set(LOSS_KEYS)
    for key in LOSS_KEYS:
        torch.testing.assert_close(ours.losses[key], expected[key], atol=1e-6, rtol=0)
    student.zero_grad()
    sum(ours.losses.values()).backward()
    grads = [p.grad for p in student.rpn.head.parameters()]
    grads += [p.grad for p in student.roi_heads.box_predictor.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_internals_agree(student_pass):
    rpn, box = student_pass.rpn, student_pass.box_head
    a = sum(x.shape[0] for x in rpn.anchors)
    assert rpn.objectness.shape == (a,) and rpn.labels.shape == (a,)
    assert rpn.deltas.shape == rpn.regression_targets.shape == (a, 4)
    assert set(rpn.labels.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert rpn.sampled_positive.numel() > 0 and rpn.sampled_negative.numel() > 0
    assert (rpn.labels[rpn.sampled_positive] == 1).all()
    assert (rpn.labels[rpn.sampled_negative] == 0).all()
    n = sum(p.shape[0] for p in box.proposals)
    assert box.labels.shape == (n,) and box.regression_targets.shape == (n, 4)
    assert box.class_logits.shape == (n, K) and box.box_regression.shape == (n, 4 * K)
    assert (box.labels >= 0).all() and (box.labels >= 1).any()
    assert student_pass.image_sizes == [(64, 64), (64, 64)]


def test_teacher_classifies_the_student_regions(teacher, images, student_pass):
    seen: list[list[Tensor]] = []
    handle = teacher.roi_heads.box_roi_pool.register_forward_hook(
        lambda _module, args, _out: seen.append(args[1])
    )
    try:
        with torch.no_grad():
            heads = rcnn_teacher_heads(teacher, images, student_pass)
    finally:
        handle.remove()
    proposals = student_pass.box_head.proposals
    assert len(seen) == 1 and len(seen[0]) == len(proposals)
    assert all(torch.equal(t, s) for t, s in zip(seen[0], proposals, strict=True))
    assert heads.objectness.shape == student_pass.rpn.objectness.shape
    assert heads.deltas.shape == student_pass.rpn.deltas.shape
    assert heads.class_logits.shape == student_pass.box_head.class_logits.shape
    assert heads.box_regression.shape == student_pass.box_head.box_regression.shape


def test_teacher_with_other_anchors_fails(images, student_pass):
    other = _teacher(anchor_sizes=[[8, 16], [16, 32], [32, 64], [64, 128]]).eval()
    with pytest.raises(ValueError, match="Anchor values differ"), torch.no_grad():
        rcnn_teacher_heads(other, images, student_pass)
    fewer = _teacher(aspect_ratios=(1.0,)).eval()
    with pytest.raises(ValueError, match="Anchor count mismatch"), torch.no_grad():
        rcnn_teacher_heads(fewer, images, student_pass)


def test_check_same_regions(student, teacher, images):
    student.train()
    check_same_regions(student, teacher, images)
    assert student.training and not teacher.training  # modes restored
    retina = detection_model("retinanet_resnet8", num_classes=K, fpn_channels=16)
    with pytest.raises(ValueError, match="RetinaNet, not a torchvision Faster R-CNN"):
        check_same_regions(student, retina, images)
    with pytest.raises(ValueError, match="Class count mismatch.*4 classes, the teacher 5"):
        check_same_regions(student, _teacher(num_classes=5), images)
    with pytest.raises(ValueError, match="roi_heads.box_coder.weights differ"):
        check_same_regions(student, _teacher(bbox_reg_weights=(5.0, 5.0, 5.0, 5.0)), images)
    other = _teacher(anchor_sizes=[[8, 16], [16, 32], [32, 64], [64, 128]])
    with pytest.raises(ValueError, match="Anchor values differ.*anchor sizes, aspect ratios"):
        check_same_regions(student, other, images)


def test_eval_mode_and_other_models_raise(images):
    model = _student().eval()
    with pytest.raises(ValueError, match="train mode"):
        rcnn_train_pass(model, images, _targets())
    retina = detection_model("retinanet_resnet8", num_classes=K, fpn_channels=16).train()
    with pytest.raises(ValueError, match="RetinaNet"):
        rcnn_train_pass(retina, images, _targets())
