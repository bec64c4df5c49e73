"""The dense-prediction distillers (SKD, CWD, PKD, Chen et al.'s det_kd): each term equals its
loss function on the right tensors, the critic trains apart from the student, and the detection
teacher classifies the student's own regions."""

from functools import partial

import pytest
import torch
from helpers import quiet_trainer

from distill_zoo.distillers import DistillContext, StepOutputs
from distill_zoo.distillers.combo import Combo
from distill_zoo.distillers.connectors import ConvConnector
from distill_zoo.distillers.critic import image_map_pairs
from distill_zoo.distillers.cwd import CWD
from distill_zoo.distillers.det_kd import DetectionKD
from distill_zoo.distillers.pkd import PKD
from distill_zoo.distillers.skd import SKD
from distill_zoo.distillers.taps import FeatureTap
from distill_zoo.losses import (
    bounded_regression_loss,
    cwd_loss,
    pairwise_affinity_loss,
    pixel_kd_loss,
    pkd_loss,
    weighted_soft_bce,
    weighted_soft_ce,
)
from distill_zoo.models.detection import detection_model
from distill_zoo.models.segmentation import segmentation_model
from distill_zoo.module import DistillationModule
from distill_zoo.tasks import DetectionTask, SegmentationTask

SEG_STAGES = ["layer1", "layer2", "layer3", "head.block"]
FPN = ["backbone.fpn.layer_blocks.2", "backbone.fpn.layer_blocks.1", "backbone.fpn.layer_blocks.0"]


def seg_pair(classes: int = 4):
    torch.manual_seed(0)
    student = segmentation_model("fcn_resnet8", num_classes=classes)
    teacher = segmentation_model("fcn_resnet20", num_classes=classes).eval()
    images = torch.rand(2, 3, 32, 32)
    context = DistillContext(
        SEG_STAGES, SEG_STAGES, images, num_classes=classes, task="segmentation"
    )
    return student, teacher, images, context


def dense_step(distiller, student, teacher, images, targets):
    """One step as DistillationModule runs it (teacher first, or after the student when the
    distiller asks), returning the StepOutputs and the terms."""
    s_layers, t_layers = distiller.layers()
    s_tap, t_tap = FeatureTap(student, s_layers), FeatureTap(teacher, t_layers)
    try:
        teacher_logits = None
        if not distiller.teacher_after_student:
            with torch.no_grad():
                teacher_logits = teacher(images)
        student.train()
        task = DetectionTask(4) if is_detector(student) else SegmentationTask(4)
        prediction, outputs = distiller.student_forward(task, student, images, targets)
        out = StepOutputs(
            images=images,
            targets=targets,
            indices=torch.arange(len(images)),
            student_logits=prediction,
            teacher_logits=teacher_logits,
            student_features=s_tap.pop(),
            student_outputs=outputs,
            task=task,
        )
        if distiller.teacher_after_student:
            with torch.no_grad():
                out.teacher_outputs = distiller.teacher_pass(teacher, out)
        out.teacher_features = t_tap.pop()
        return out, distiller(out)
    finally:
        s_tap.remove()
        t_tap.remove()


def is_detector(model) -> bool:
    return hasattr(model, "transform")  # torchvision's detectors


# --- SKD ----------------------------------------------------------------------------------------


def test_skd_terms_are_the_papers_three_losses_with_the_authors_weights() -> None:
    student, teacher, images, context = seg_pair()
    skd = SKD(student, teacher, context=context)
    assert skd.layers() == (["layer3"], ["layer3"])  # the last backbone stage
    masks = torch.randint(0, 4, (2, 32, 32))
    out, terms = dense_step(skd, student, teacher, images, masks)
    assert set(terms) == {"ce", "pixel", "pair", "holistic"}
    expected_pixel = 10 * pixel_kd_loss(out.student_logits, out.teacher_logits, 1.0)
    torch.testing.assert_close(terms["pixel"], expected_pixel)
    s, t = out.student_features["layer3"], out.teacher_features["layer3"]
    torch.testing.assert_close(terms["pair"], pairwise_affinity_loss(s, t, 0.5))
    scores = skd.critic(image_map_pairs(images, out.student_logits))
    torch.testing.assert_close(terms["holistic"], -0.1 * scores.mean())
    adversary = skd.adversary_terms(out)
    assert set(adversary) == {"wasserstein", "gp"}
    assert not any(v.grad_fn is None for v in adversary.values())


def test_skd_terms_switch_off_one_by_one_and_without_holistic_there_is_no_critic() -> None:
    student, teacher, images, context = seg_pair()
    skd = SKD(student, teacher, context=context, pair_weight=0, holistic_weight=0)
    assert skd.adversary() is None and skd.layers() == ([], [])
    _, terms = dense_step(skd, student, teacher, images, torch.zeros(2, 32, 32, dtype=torch.long))
    assert set(terms) == {"ce", "pixel"}
    with pytest.raises(ValueError, match="pool_scale"):
        SKD(student, teacher, context=context, pool_scale=0)
    with pytest.raises(ValueError, match="does not serve task=classification"):
        SKD(student, teacher, context=DistillContext(SEG_STAGES, SEG_STAGES, images, 4))


def skd_module(lr: float = 0.1) -> DistillationModule:
    student, teacher, _, context = seg_pair()
    return DistillationModule(
        student,
        teacher,
        SKD(student, teacher, context=context),
        optimizer=partial(torch.optim.SGD, lr=lr),
        scheduler=None,
        task=SegmentationTask(4),
    )


def test_the_critic_is_in_neither_the_students_optimizer_nor_the_teacher() -> None:
    module = skd_module()
    assert module.automatic_optimization is False  # the module steps both optimizers
    student_optimizer, critic_optimizer = module.configure_optimizers()
    critic = {id(p) for p in module.distiller.critic.parameters()}
    student_side = {id(p) for g in student_optimizer.param_groups for p in g["params"]}
    assert critic and not critic & student_side
    assert {id(p) for p in module.student.parameters()} <= student_side
    assert {id(p) for g in critic_optimizer.param_groups for p in g["params"]} == critic
    assert not critic & {id(p) for p in module.teacher.parameters()}


def test_one_step_moves_the_critic_but_a_student_at_lr_0_and_the_teacher_stay() -> None:
    module = skd_module(lr=0.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    images = torch.rand(4, 3, 32, 32)
    batch = (images, torch.randint(0, 4, (4, 32, 32)), torch.arange(4))
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    quiet_trainer(max_epochs=1).fit(module, loader)
    after = module.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # The student's BatchNorm running statistics move in a forward pass; no weight does.
    assert {k for k in moved if not k.startswith("distiller.critic.")} == {
        k for k in moved if "running_" in k or "num_batches_tracked" in k
    }
    assert any(k.startswith("distiller.critic.") for k in moved)
    assert not any(k.startswith("teacher.") for k in moved)


# --- CWD and PKD --------------------------------------------------------------------------------


def test_cwd_on_segmentation_is_the_official_logit_setting() -> None:
    student, teacher, images, context = seg_pair()
    cwd = CWD(student, teacher, context=context)
    assert (cwd.tau, cwd.weight, cwd.layers()) == (4.0, 3.0, ([], []))
    out, terms = dense_step(cwd, student, teacher, images, torch.zeros(2, 32, 32).long())
    expected = 3.0 * cwd_loss(out.student_logits, out.teacher_logits, 4.0)
    torch.testing.assert_close(terms["cwd"], expected)


def det_pair(teacher_name: str = "fasterrcnn_resnet20", **teacher_kwargs):
    torch.manual_seed(0)
    student = detection_model("fasterrcnn_resnet8", num_classes=4, fpn_channels=16)
    teacher = detection_model(teacher_name, num_classes=4, fpn_channels=32, **teacher_kwargs)
    images = torch.rand(2, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([3])},
    ]
    context = DistillContext(FPN, FPN, images, num_classes=4, task="detection")
    return student, teacher.eval(), images, targets, context


def test_cwd_on_detection_compares_every_fpn_level_through_connectors() -> None:
    student, teacher, images, targets, context = det_pair()
    cwd = CWD(student, teacher, context=context)
    assert (cwd.tau, cwd.weight) == (1.0, 10.0)
    assert cwd.layers() == (FPN, FPN)
    assert all(isinstance(c, ConvConnector) for c in cwd.pairs.connectors)  # 16 -> 32 channels
    out, terms = dense_step(cwd, student, teacher, images, targets)
    expected = 10.0 * sum(cwd_loss(s, t, 1.0) for s, t in cwd.pairs(out))
    torch.testing.assert_close(terms["cwd"], expected)
    with pytest.raises(ValueError, match="needs per-pixel class logits"):
        CWD(student, teacher, context=context, student_layers="logits", teacher_layers="logits")


def test_pkd_sums_standardised_levels_even_across_detector_families() -> None:
    student, teacher, images, targets, context = det_pair("retinanet_resnet20")
    pkd = PKD(student, teacher, context=context)
    out, terms = dense_step(pkd, student, teacher, images, targets)
    expected = 6.0 * sum(pkd_loss(s, t) for s, t in pkd.pairs(out))
    torch.testing.assert_close(terms["pkd"], expected)
    assert set(terms) == {"det", "pkd"}


# --- Chen et al. --------------------------------------------------------------------------------


def test_det_kd_terms_follow_the_paper_on_the_students_own_regions() -> None:
    student, teacher, images, targets, context = det_pair()
    distiller = DetectionKD(student, teacher, context=context)
    seen = []
    hook = teacher.roi_heads.box_roi_pool.register_forward_hook(
        lambda module, args, output: seen.append([b.clone() for b in args[1]])
    )
    try:
        out, terms = dense_step(distiller, student, teacher, images, targets)
    finally:
        hook.remove()
    rcnn, heads = out.student_outputs["rcnn"], out.teacher_outputs["heads"]
    # The teacher's box head classified exactly the proposals the student sampled.
    assert len(seen) == 1
    assert all(torch.equal(a, b) for a, b in zip(seen[0], rcnn.box_head.proposals, strict=True))
    losses = rcnn.losses
    expected_det = (
        0.5 * losses["loss_objectness"]
        + 0.5 * losses["loss_classifier"]
        + losses["loss_rpn_box_reg"]
        + losses["loss_box_reg"]
    )
    torch.testing.assert_close(terms["det"], expected_det)
    soft = weighted_soft_ce(rcnn.box_head.class_logits, heads.class_logits, 1.0, 1.5)
    torch.testing.assert_close(terms["soft_box_head"], 0.5 * soft)
    sampled = torch.cat([rcnn.rpn.sampled_positive, rcnn.rpn.sampled_negative])
    soft_rpn = weighted_soft_bce(rcnn.rpn.objectness[sampled], heads.objectness[sampled])
    torch.testing.assert_close(terms["soft_rpn"], 0.5 * soft_rpn)
    positive = rcnn.rpn.sampled_positive
    bounded = bounded_regression_loss(
        rcnn.rpn.deltas[positive], heads.deltas[positive], rcnn.rpn.regression_targets[positive]
    )
    # Normalised like the detector's Smooth-L1: summed over positives, over all sampled rows.
    share = len(positive) / len(sampled)
    torch.testing.assert_close(terms["bounded_rpn"], 0.5 * share * bounded)
    assert {"bounded_box_head", "hint"} <= set(terms)
    assert len(distiller.hints.connectors) == 3  # a 1x1 adaptation per FPN level
    assert all(a.kernel_size == (1, 1) for a in distiller.hints.connectors)


def test_det_kd_needs_detectors_that_share_regions_unless_only_hints_are_asked() -> None:
    student, teacher, images, targets, context = det_pair("retinanet_resnet20")
    with pytest.raises(ValueError, match="Faster R-CNN"):
        DetectionKD(student, teacher, context=context)
    hints = DetectionKD(student, teacher, context=context, mu=1.0, nu=0.0)
    _, terms = dense_step(hints, student, teacher, images, targets)
    assert set(terms) == {"det", "hint"}
    with pytest.raises(ValueError, match="heads"):
        DetectionKD(student, teacher, context=context, mu=1.0, nu=0.0, heads=["roi"])


def test_combo_lends_a_parts_adversary_and_refuses_two_own_passes() -> None:
    student, teacher, _, context = seg_pair()
    combo = Combo(student, teacher, context=context, parts=["skd", "cwd"])
    assert combo.adversary() is combo.parts["skd"].critic
    assert combo.trains_only_part()
    student, teacher, _, _, context = det_pair()
    with pytest.raises(ValueError, match="run their own forward passes"):
        Combo(student, teacher, context=context, parts=["det_kd", "det_kd_hints"])


# --- teacher-bounded regression ------------------------------------------------------------


def test_teacher_bounded_regression_pushes_only_the_samples_where_the_student_trails() -> None:
    from distill_zoo.distillers.teacher_bounded import TeacherBounded
    from distill_zoo.tasks import RegressionTask

    model = torch.nn.Linear(2, 2)
    distiller = TeacherBounded(model, model, context=DistillContext(task="regression"), nu=2.0)
    targets = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # Sample 0: student error 1 + 1 = 2 > teacher error 0.25: counts 2. Sample 1: student
    # error 0.01 < teacher error 4: 0. Mean over the two samples: 1; times nu 2: 2.
    student = torch.tensor([[1.0, -1.0], [1.1, 1.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, 0.0], [3.0, 1.0]])
    out = StepOutputs(
        torch.zeros(2, 2), targets, torch.arange(2), student, teacher, task=RegressionTask()
    )
    terms = distiller(out)
    assert terms["bounded"].item() == pytest.approx(2.0)
    assert set(terms) == {"mse", "bounded"}
    terms["bounded"].backward()
    assert torch.equal(student.grad[1], torch.zeros(2))  # the better sample gets no push
