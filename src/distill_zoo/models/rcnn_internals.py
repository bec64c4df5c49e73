"""Faster R-CNN's training forward, step by step, keeping what Chen et al.'s distiller needs.

Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation" (NeurIPS
2017) distil a Faster R-CNN's region proposal network (RPN) and its RoI box head: the student's
objectness logits and box deltas on every anchor, and its class logits and box regression on
the sampled proposals, next to the teacher's predictions on the SAME anchors and proposals.
torchvision's ``model(images, targets)`` returns only the losses, so :func:`rcnn_train_pass`
runs the training forward of torchvision's ``GeneralizedRCNN`` (transform, backbone, RPN, RoI
heads) through torchvision's own submodules and methods, in torchvision's order, and keeps the
internals (:class:`RCNNTrainPass`).

The random sampling consumes the RNG exactly as torchvision does (the transform, then the RPN's
``fg_bg_sampler`` once, then ``roi_heads.select_training_samples`` once), so with the same seed
the losses equal ``model(images, targets)``'s.

:func:`rcnn_teacher_heads` runs a teacher on the student's regions: its RPN head on the same
anchors (which it checks) and its box head on the student's sampled proposals.
:func:`check_same_regions` checks at construction that a teacher can do so.

Layout of the RPN fields (torchvision's ``concat_box_prediction_layers``): anchors of image 0,
then image 1, ...; within an image, FPN level by level, and within a level row-major over the
feature map's cells with the anchors of a cell innermost, which is the order of
``anchor_generator``'s anchors, so row ``i`` of every :class:`RPNOutputs` field is the anchor
``torch.cat(anchors)[i]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
"""The keys of :attr:`RCNNTrainPass.losses`: torchvision's Faster R-CNN losses."""


@dataclass(frozen=True)
class RPNOutputs:
    """The RPN's predictions and training targets on every anchor of the batch.

    ``A`` counts the anchors of all images together, in ``torch.cat(anchors)`` order (see the
    module doc).

    Attributes:
        objectness: ``[A]`` objectness logits.
        deltas: ``[A, 4]`` predicted box deltas (relative to the anchors).
        labels: ``[A]`` float: 1 object, 0 background, -1 ignored (between the IoU
            thresholds), from ``rpn.assign_targets_to_anchors``.
        regression_targets: ``[A, 4]`` the deltas of each anchor's matched ground-truth box
            (meaningful where ``labels == 1``).
        sampled_positive: Indices into ``A`` of the positive anchors the loss uses.
        sampled_negative: Indices into ``A`` of the negative anchors the loss uses.
        anchors: One ``[A_i, 4]`` xyxy tensor per image (``sum(A_i) == A``).
    """

    objectness: Tensor
    deltas: Tensor
    labels: Tensor
    regression_targets: Tensor
    sampled_positive: Tensor
    sampled_negative: Tensor
    anchors: list[Tensor]


@dataclass(frozen=True)
class BoxHeadOutputs:
    """The RoI box head's predictions and training targets on the sampled proposals.

    ``n`` counts the sampled proposals of all images together, image by image.

    Attributes:
        proposals: One ``[n_i, 4]`` xyxy tensor per image: the sampled proposals (ground-truth
            boxes included when sampled), what ``roi_heads.select_training_samples`` returns.
        labels: ``[n]`` int64 class of each proposal (0 background).
        regression_targets: ``[n, 4]`` deltas of each proposal's matched ground-truth box.
        class_logits: ``[n, K]`` class logits.
        box_regression: ``[n, K * 4]`` per-class box deltas.
    """

    proposals: list[Tensor]
    labels: Tensor
    regression_targets: Tensor
    class_logits: Tensor
    box_regression: Tensor


@dataclass(frozen=True)
class RCNNTrainPass:
    """One training forward of a Faster R-CNN: its losses and the internals behind them.

    Attributes:
        losses: torchvision's four losses (:data:`LOSS_KEYS`), as ``model(images, targets)``.
        rpn: The RPN's predictions and targets on every anchor.
        box_head: The box head's predictions and targets on the sampled proposals.
        image_sizes: ``(h, w)`` of each image after the model's transform.
    """

    losses: dict[str, Tensor]
    rpn: RPNOutputs
    box_head: BoxHeadOutputs
    image_sizes: list[tuple[int, int]]


@dataclass(frozen=True)
class TeacherHeads:
    """A teacher's predictions on a student's regions (see :func:`rcnn_teacher_heads`).

    Attributes:
        objectness: ``[A]`` objectness logits on the student's anchors.
        deltas: ``[A, 4]`` box deltas on the student's anchors.
        class_logits: ``[n, K]`` class logits on the student's sampled proposals.
        box_regression: ``[n, K * 4]`` box deltas on the student's sampled proposals.
    """

    objectness: Tensor
    deltas: Tensor
    class_logits: Tensor
    box_regression: Tensor


def rcnn_train_pass(
    model: FasterRCNN, images: Tensor | list[Tensor], targets: list[dict[str, Tensor]]
) -> RCNNTrainPass:
    """The training forward of a Faster R-CNN, keeping its RPN and box head internals.

    Runs what ``model(images, targets)`` runs, in the same order and with the same random
    sampling (same seed, same losses), through torchvision's submodules and methods.

    Args:
        model: A torchvision Faster R-CNN in train mode.
        images: A float batch ``[B, C, H, W]`` or a list of ``[C, H, W]`` images in [0, 1].
        targets: One ``{"boxes": [N, 4] float xyxy pixels, "labels": [N] int64}`` per image;
            N may be 0.

    Returns:
        The losses, the RPN and box head internals and the transformed image sizes.

    Raises:
        ValueError: If the model is not a Faster R-CNN, is in eval mode, or the targets are
            malformed.
    """
    _require_faster_rcnn(model, "model")
    if not model.training:
        raise ValueError(
            "rcnn_train_pass needs the model in train mode (model.train()): the training "
            "forward samples anchors and proposals and computes losses"
        )
    _check_target_boxes(targets, len(images))
    image_list, targets = model.transform(list(images), targets)
    _check_targets(targets)
    features = _backbone_features(model, image_list)
    rpn, proposals = _rpn_pass(model.rpn, image_list, features, targets)
    box_head, box_losses = _box_head_pass(
        model.roi_heads, features, proposals, image_list.image_sizes, targets
    )
    losses = {**_rpn_losses(rpn), **box_losses}
    return RCNNTrainPass(losses, rpn, box_head, list(image_list.image_sizes))


def rcnn_teacher_heads(
    teacher: FasterRCNN, images: Tensor | list[Tensor], student_pass: RCNNTrainPass
) -> TeacherHeads:
    """A teacher's RPN head on the student's anchors and box head on its sampled proposals.

    The teacher normalises the images with its own transform and runs its own backbone; its
    anchors must equal the student's (same sizes, aspect ratios and feature strides). Grad
    mode is the caller's (run it under ``torch.no_grad()`` for a frozen teacher).

    Args:
        teacher: A torchvision Faster R-CNN, in either mode.
        images: The images the student saw, as given to :func:`rcnn_train_pass`.
        student_pass: The student's :func:`rcnn_train_pass` on them.

    Returns:
        The teacher's objectness and deltas on every anchor (the student's layout) and its
        class logits and box regression on the student's sampled proposals.

    Raises:
        ValueError: If the teacher is not a Faster R-CNN, or sees other image sizes or
            anchors than the student.
    """
    _require_faster_rcnn(teacher, "teacher")
    image_list, _ = teacher.transform(list(images))
    sizes = [tuple(s) for s in image_list.image_sizes]
    if sizes != [tuple(s) for s in student_pass.image_sizes]:
        raise ValueError(
            f"The teacher's transform gives image sizes {sizes}, the student's "
            f"{student_pass.image_sizes}: both must see the images at the same size (same "
            "resize settings) to classify the same regions"
        )
    features = _backbone_features(teacher, image_list)
    levels = list(features.values())
    objectness, deltas = concat_box_prediction_layers(*teacher.rpn.head(levels))
    anchors = teacher.rpn.anchor_generator(image_list, levels)
    _check_same_anchors(student_pass.rpn.anchors, anchors)
    box_features = teacher.roi_heads.box_roi_pool(
        features, student_pass.box_head.proposals, image_list.image_sizes
    )
    class_logits, box_regression = teacher.roi_heads.box_predictor(
        teacher.roi_heads.box_head(box_features)
    )
    return TeacherHeads(objectness.flatten(), deltas, class_logits, box_regression)


def check_same_regions(student: nn.Module, teacher: nn.Module, example: Tensor) -> None:
    """Check that a teacher can classify a student's anchors and proposals.

    Call it when building a distiller, with a few example images of the training size (e.g.
    ``torch.rand(2, 3, 64, 64)``). Both models run without gradients in eval mode for the
    anchors and are put back in their modes afterwards.

    Args:
        student: The student detector.
        teacher: The teacher detector.
        example: Example images ``[B, C, H, W]`` in [0, 1].

    Raises:
        ValueError: Naming the fix, if either is not a torchvision Faster R-CNN, the class
            counts or box coder weights differ, or the two generate different anchors (or
            image sizes) on the example images.
    """
    _require_faster_rcnn(student, "student")
    _require_faster_rcnn(teacher, "teacher")
    _check_same_classes(student, teacher)
    _check_same_box_coders(student, teacher)
    student_sizes, student_anchors = _example_anchors(student, example)
    teacher_sizes, teacher_anchors = _example_anchors(teacher, example)
    if student_sizes != teacher_sizes:
        raise ValueError(
            f"The teacher's transform gives image sizes {teacher_sizes}, the student's "
            f"{student_sizes}: give both the same transform (resize) settings"
        )
    _check_same_anchors(student_anchors, teacher_anchors)


def _require_faster_rcnn(model: nn.Module, role: str) -> None:
    """Raise a ValueError unless ``model`` is a torchvision Faster R-CNN without extra heads."""
    has_rpn = isinstance(getattr(model, "rpn", None), RegionProposalNetwork)
    roi_heads = getattr(model, "roi_heads", None)
    if not (has_rpn and isinstance(roi_heads, RoIHeads)):
        raise ValueError(
            f"The {role} is a {type(model).__name__}, not a torchvision Faster R-CNN (it has "
            "no rpn/roi_heads): the RPN and RoI-head distillation of Chen et al. needs two "
            f"Faster R-CNNs ({role}=det_fasterrcnn_<backbone>, or detection_model("
            "'fasterrcnn_<backbone>', ...)); for other detectors use a feature method "
            "(distiller=det_kd_hints, pkd or cwd)"
        )
    if roi_heads.has_mask() or roi_heads.has_keypoint():
        raise ValueError(
            f"The {role} ({type(model).__name__}) has mask or keypoint heads: only a plain "
            "Faster R-CNN is supported (their losses would be missing)"
        )


def _check_target_boxes(targets: list[dict[str, Tensor]] | None, num_images: int) -> None:
    """The checks ``GeneralizedRCNN.forward`` makes before its transform, as ValueErrors."""
    if targets is None or len(targets) != num_images:
        raise ValueError(f"Training needs one target dict per image ({num_images} images)")
    for i, target in enumerate(targets):
        boxes = target.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"targets[{i}]['boxes'] must be an [N, 4] tensor, got {shape}")


def _check_targets(targets: list[dict[str, Tensor]]) -> None:
    """The checks torchvision makes after the transform: positive box sizes, dtypes."""
    for i, target in enumerate(targets):
        boxes, labels = target["boxes"], target.get("labels")
        if not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be floating point, got {boxes.dtype}")
        if labels is None or labels.dtype != torch.int64:
            got = None if labels is None else labels.dtype
            raise ValueError(f"targets[{i}]['labels'] must be an int64 tensor, got {got}")
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            box = boxes[degenerate][0].tolist()
            raise ValueError(f"All boxes need a positive height and width; targets[{i}] has {box}")


def _backbone_features(model: FasterRCNN, image_list: ImageList) -> OrderedDict[str, Tensor]:
    """The backbone's feature maps, as a dict even when it returns one tensor."""
    features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    return features


def _rpn_pass(
    rpn: RegionProposalNetwork,
    image_list: ImageList,
    features: OrderedDict[str, Tensor],
    targets: list[dict[str, Tensor]],
) -> tuple[RPNOutputs, list[Tensor]]:
    """``RegionProposalNetwork.forward`` in training, sampling anchors once for the loss.

    Returns:
        The RPN internals and the proposals (one ``[p_i, 4]`` tensor per image, detached).
    """
    levels = list(features.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(image_list, levels)
    anchors_per_level = [o[0].numel() for o in objectness]  # anchors/cell x cells, per level
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    # Faster R-CNN does not backpropagate through the proposals
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    boxes, _ = rpn.filter_proposals(
        proposals, objectness, image_list.image_sizes, anchors_per_level
    )
    labels, matched_gt_boxes = rpn.assign_targets_to_anchors(anchors, targets)
    regression_targets = rpn.box_coder.encode(matched_gt_boxes, anchors)
    positive, negative = rpn.fg_bg_sampler(labels)
    outputs = RPNOutputs(
        objectness=objectness.flatten(),
        deltas=deltas,
        labels=torch.cat(labels),
        regression_targets=torch.cat(regression_targets),
        sampled_positive=torch.where(torch.cat(positive))[0],
        sampled_negative=torch.where(torch.cat(negative))[0],
        anchors=anchors,
    )
    return outputs, boxes


def _rpn_losses(rpn: RPNOutputs) -> dict[str, Tensor]:
    """``RegionProposalNetwork.compute_loss`` on the anchors already sampled."""
    positive = rpn.sampled_positive
    sampled = torch.cat([positive, rpn.sampled_negative])
    box_loss = (
        F.smooth_l1_loss(
            rpn.deltas[positive], rpn.regression_targets[positive], beta=1 / 9, reduction="sum"
        )
        / sampled.numel()
    )
    objectness_loss = F.binary_cross_entropy_with_logits(
        rpn.objectness[sampled], rpn.labels[sampled]
    )
    return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}


def _box_head_pass(
    roi_heads: RoIHeads,
    features: OrderedDict[str, Tensor],
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    targets: list[dict[str, Tensor]],
) -> tuple[BoxHeadOutputs, dict[str, Tensor]]:
    """``RoIHeads.forward`` in training: sample proposals once, classify them, the losses."""
    proposals, _, labels, regression_targets = roi_heads.select_training_samples(
        proposals, targets
    )
    box_features = roi_heads.box_head(roi_heads.box_roi_pool(features, proposals, image_sizes))
    class_logits, box_regression = roi_heads.box_predictor(box_features)
    loss_classifier, loss_box_reg = fastrcnn_loss(
        class_logits, box_regression, labels, regression_targets
    )
    outputs = BoxHeadOutputs(
        proposals=proposals,
        labels=torch.cat(labels),
        regression_targets=torch.cat(regression_targets),
        class_logits=class_logits,
        box_regression=box_regression,
    )
    return outputs, {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def _check_same_anchors(student: list[Tensor], teacher: list[Tensor]) -> None:
    """Raise a ValueError unless the teacher's anchors equal the student's, image by image."""
    fix = (
        "the teacher's RPN must use the student's anchor sizes, aspect ratios and feature "
        "strides for both to classify the same anchors"
    )
    if len(student) != len(teacher):
        raise ValueError(
            f"The teacher has anchors for {len(teacher)} images, the student for {len(student)}"
        )
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.shape != t.shape:
            raise ValueError(
                f"Anchor count mismatch on image {i}: the teacher generates {t.shape[0]} "
                f"anchors, the student {s.shape[0]}; {fix}"
            )
        if not torch.equal(t.to(s.device, s.dtype), s):
            raise ValueError(
                f"Anchor values differ on image {i} (both generate {s.shape[0]} anchors, at "
                f"other places or sizes); {fix}"
            )


def _num_classes(model: nn.Module, role: str) -> int:
    """Classes (background included) of a Faster R-CNN's box predictor."""
    cls_score = getattr(model.roi_heads.box_predictor, "cls_score", None)
    if not isinstance(cls_score, nn.Linear):
        raise ValueError(
            f"The {role}'s box predictor has no cls_score Linear layer to count its classes; "
            "use torchvision's FastRCNNPredictor"
        )
    return cls_score.out_features


def _check_same_classes(student: nn.Module, teacher: nn.Module) -> None:
    """Raise a ValueError unless both box predictors have the same classes."""
    ks, kt = _num_classes(student, "student"), _num_classes(teacher, "teacher")
    if ks != kt:
        raise ValueError(
            f"Class count mismatch: the student predicts {ks} classes, the teacher {kt} "
            "(background included); build the teacher with the student's num_classes"
        )


def _check_same_box_coders(student: nn.Module, teacher: nn.Module) -> None:
    """Raise a ValueError unless both encode box deltas with the same weights."""
    for part in ("rpn", "roi_heads"):
        ws = tuple(getattr(student, part).box_coder.weights)
        wt = tuple(getattr(teacher, part).box_coder.weights)
        if ws != wt:
            raise ValueError(
                f"{part}.box_coder.weights differ: student {ws}, teacher {wt}; their box "
                "deltas are not comparable: give the teacher the student's weights"
                + (" (bbox_reg_weights)" if part == "roi_heads" else "")
            )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put a model in eval mode and restore each submodule's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _example_anchors(
    model: FasterRCNN, example: Tensor
) -> tuple[list[tuple[int, int]], list[Tensor]]:
    """Transformed image sizes and anchors (on the CPU) of a model on example images."""
    device = next(model.parameters()).device
    with _eval_mode(model), torch.no_grad():
        image_list, _ = model.transform(list(example.to(device)))
        levels = list(_backbone_features(model, image_list).values())
        anchors = model.rpn.anchor_generator(image_list, levels)
    sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
    return sizes, [a.cpu() for a in anchors]


__all__ = [
    "LOSS_KEYS",
    "BoxHeadOutputs",
    "RCNNTrainPass",
    "RPNOutputs",
    "TeacherHeads",
    "check_same_regions",
    "rcnn_teacher_heads",
    "rcnn_train_pass",
]
