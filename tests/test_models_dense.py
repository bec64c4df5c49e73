"""Models of the dense tasks: segmentation, detection and regression, and their configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from distill_zoo.models import (
    MLP,
    ZOO_NAMES,
    create_model,
    detection_model,
    segmentation_model,
)
from distill_zoo.models.detection import KeepSizeTransform, default_anchor_sizes

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
META_KEYS = ("feature_layers", "ckpt")

SEG = sorted(p.stem for p in (CONF / "student").glob("seg_*.yaml"))
DET = sorted(p.stem for p in (CONF / "student").glob("det_*.yaml"))
MLPS = ["mlp_large", "mlp_small"]
NEW = SEG + DET + MLPS

CLASSIFICATION_ZOO = [
    "mobilenetv2", "resnet110", "resnet14", "resnet14x4", "resnet20", "resnet32", "resnet32x4",
    "resnet44", "resnet50", "resnet56", "resnet8", "resnet8x4", "shufflenetv1", "shufflenetv2",
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg8", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
]  # fmt: skip


def compose_group(group: str, choice: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+{group}={choice}"])
    return OmegaConf.to_container(cfg[group], resolve=True)


def build(node: dict, num_classes: int, in_channels: int) -> nn.Module:
    kwargs = {k: v for k, v in node.items() if k not in META_KEYS}
    return instantiate(kwargs, num_classes=num_classes, in_channels=in_channels)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def boxes_of(sizes: list[float], offset: float = 4.0) -> torch.Tensor:
    """Square xyxy boxes of the given sizes, laid out on a diagonal from ``offset``."""
    rows = [[offset + 8 * i, offset + 6 * i, offset + 8 * i + s, offset + 6 * i + s]
            for i, s in enumerate(sizes)]  # fmt: skip
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def detection_batch(n: int = 4, size: int = 64, channels: int = 3):
    """Images in [0, 1] with bright squares where the boxes are; image 0 has no box."""
    gen = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(n, channels, size, size, generator=gen)
    targets = []
    for i in range(n):
        boxes = boxes_of([12.0 + 4 * j for j in range(i % 3)], offset=4.0 + 3 * i)
        for x0, y0, x1, y1 in boxes.round().int().tolist():
            images[i, :, y0:y1, x0:x1] = 0.9
        targets.append({"boxes": boxes, "labels": torch.arange(1, len(boxes) + 1)})
    return images, targets


# --- every new config ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_teacher_config_is_the_student_config_with_a_checkpoint(name: str) -> None:
    student = compose_group("student", name)
    teacher = compose_group("teacher", name)
    assert teacher == {**student, "ckpt": None}
    assert student["name"] and student["feature_layers"]


TEACHERS = ["seg_psp_resnet56", "det_fasterrcnn_resnet32x4", "mlp_large"]


@pytest.mark.parametrize(
    ("group", "name"), [("student", n) for n in NEW] + [("teacher", n) for n in TEACHERS]
)
def test_config_gives_the_contract_output_and_tensor_feature_layers_in_forward_order(
    group: str, name: str
) -> None:
    node = compose_group(group, name)
    num_classes = 5
    if name.startswith("mlp"):
        in_channels, x = 7, torch.randn(2, 7)
    else:
        in_channels, x = 3, torch.rand(2, 3, 64, 64)
    model = build(node, num_classes, in_channels).eval()
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for layer in node["feature_layers"]:
        model.get_submodule(layer).register_forward_hook(  # raises for a bad name
            lambda _m, _i, out, layer=layer: seen.append((layer, out, out.clone()))
        )
    with torch.no_grad():
        out = model(x)
    if name.startswith("seg"):
        assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes, 64, 64)
    elif name.startswith("det"):
        assert isinstance(out, list) and len(out) == 2
        for det in out:
            assert set(det) == {"boxes", "scores", "labels"}
            n = len(det["scores"])
            assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,)
            assert det["labels"].dtype == torch.int64
            assert ((det["labels"] >= 1) & (det["labels"] < num_classes)).all()
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes)
    assert [layer for layer, *_ in seen] == node["feature_layers"]  # once each, in order
    for layer, feature, copy in seen:
        assert isinstance(feature, torch.Tensor) and feature.dim() in (2, 4), layer
        assert torch.equal(feature, copy), f"{layer} is overwritten in place later"


def test_student_teacher_pairs_have_a_clear_capacity_gap() -> None:
    pairs = [
        ("seg_fcn_resnet20", "seg_psp_resnet56"),
        ("seg_fcn_resnet8x4", "seg_psp_resnet32x4"),
        ("seg_lraspp_mobilenet", "seg_deeplabv3_resnet50"),
        ("det_fasterrcnn_resnet8", "det_fasterrcnn_resnet32x4"),
        ("det_retinanet_resnet8", "det_retinanet_resnet32x4"),
        ("det_fcos_resnet8", "det_fcos_resnet32x4"),
        ("mlp_small", "mlp_large"),
    ]
    for student, teacher in pairs:
        channels = 7 if student.startswith("mlp") else 3
        small = n_params(build(compose_group("student", student), 11, channels))
        large = n_params(build(compose_group("teacher", teacher), 11, channels))
        assert large >= 3 * small, (student, small, teacher, large)


def test_classification_zoo_is_unchanged_and_distinct_from_the_dense_names() -> None:
    assert ZOO_NAMES == CLASSIFICATION_ZOO
    assert not set(NEW) & set(ZOO_NAMES)
    with torch.no_grad():
        logits = create_model("resnet20", num_classes=10).eval()(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)


# --- segmentation ----------------------------------------------------------------------------


def test_zoo_segmenter_dilates_the_last_stage_and_upsamples_to_any_input_size() -> None:
    model = segmentation_model("fcn_resnet20", num_classes=4, in_channels=1).eval()
    shapes = {}
    for layer in ("layer2", "layer3"):
        model.get_submodule(layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: shapes.update({layer: out.shape})
        )
    with torch.no_grad():
        out = model(torch.rand(2, 1, 48, 40))
    assert out.shape == (2, 4, 48, 40)
    assert shapes["layer2"][-2:] == shapes["layer3"][-2:] == (12, 10)  # output stride 4
    fine = segmentation_model("psp_resnet8", num_classes=4, output_stride=2).eval()
    with torch.no_grad():
        assert fine(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32, 32)


def test_psp_head_trains_on_a_batch_of_one() -> None:
    model = segmentation_model("psp_resnet8", num_classes=3).train()
    model(torch.rand(1, 3, 32, 32)).sum().backward()  # no BatchNorm on 1x1 pooled maps


@pytest.mark.parametrize("name", ["fcn_resnet50", "lraspp_mobilenet_v3_large"])
def test_torchvision_segmenter_returns_the_out_tensor_on_gray_input(name: str) -> None:
    model = segmentation_model(name, num_classes=6, in_channels=1).eval()
    assert getattr(model, "aux_classifier", None) is None
    with torch.no_grad():
        out = model(torch.rand(1, 1, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 6, 64, 64)


def test_unknown_segmentation_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="Unknown segmentation model 'fcn_resnet21'") as err:
        segmentation_model("fcn_resnet21", num_classes=3)
    assert "psp_resnet56" in str(err.value) and "deeplabv3_mobilenet_v3_large" in str(err.value)
    with pytest.raises(ValueError, match="output_stride applies to zoo"):
        segmentation_model("fcn_resnet50", num_classes=3, output_stride=2)


def test_segmentation_student_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = build(compose_group("student", "seg_fcn_resnet20"), 3, 3).train()
    x = torch.rand(4, 3, 32, 32)
    masks = torch.zeros(4, 32, 32, dtype=torch.long)
    masks[:, 4:14, 4:14], masks[:, 18:30, 16:28] = 1, 2
    x[:, 0][masks == 1] += 1.0
    x[:, 1][masks == 2] += 1.0
    masks[:, 0, :] = 255  # an ignored row
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), masks, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in DET if n.endswith("resnet8")])
def test_detector_trains_on_a_batch_with_an_empty_image_and_overfits_it(name: str) -> None:
    torch.manual_seed(0)
    model = build(compose_group("student", name), 4, 3).train()
    images, targets = detection_batch(4)
    assert targets[0]["boxes"].shape == (0, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for step in range(8):
        losses = model(images, targets)
        assert isinstance(losses, dict) and losses
        assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values()), losses
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        if step == 0:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        totals.append(total.item())
    assert min(totals[-2:]) < 0.7 * totals[0], totals


def test_detector_keeps_the_canvas_size_and_normalises_gray_images() -> None:
    model = detection_model("fasterrcnn_resnet8", num_classes=3, in_channels=1).eval()
    assert isinstance(model.transform, KeepSizeTransform)
    assert model.transform.image_mean == [0.5] and model.transform.image_std == [0.25]
    images = torch.full((2, 1, 96, 96), 0.5)
    batched, _ = model.transform(images)
    assert batched.tensors.shape == (2, 1, 96, 96) and batched.image_sizes == [(96, 96)] * 2
    assert batched.tensors.abs().max() == 0  # (0.5 - 0.5) / 0.25
    with torch.no_grad():
        out = model(torch.rand(2, 1, 96, 96))
    for det in out:
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 96).all()


def test_anchors_fit_small_objects_and_detectors_reject_bad_options() -> None:
    expected = [[8, 12], [16, 24], [32, 48], [64, 96]]
    assert default_anchor_sizes("fasterrcnn", [2, 4, 8, 16]) == expected
    assert default_anchor_sizes("retinanet", [2])[0] == [8, 10, 13]
    assert default_anchor_sizes("fcos", [2, 4]) == [[2], [4]]
    model = detection_model("retinanet_resnet8", num_classes=3)
    assert model.anchor_generator.num_anchors_per_location() == [9] * 4
    with pytest.raises(ValueError, match="<detector>_<backbone>"):
        detection_model("yolo_resnet8", num_classes=3)
    with pytest.raises(ValueError, match="Unknown detection backbone 'resnet21'"):
        detection_model("fcos_resnet21", num_classes=3)
    with pytest.raises(ValueError, match="one list per FPN level"):
        detection_model("fasterrcnn_resnet8", num_classes=3, anchor_sizes=[[8], [16]])
    with pytest.raises(ValueError, match="divisible by 32"):
        detection_model("fcos_resnet8", num_classes=3, fpn_channels=48)
    with pytest.raises(ValueError, match="one value per input channel"):
        detection_model("fcos_resnet8", num_classes=3, in_channels=1, image_mean=[0.5, 0.5])


def test_detector_on_a_torchvision_backbone_and_torchvision_options() -> None:
    model = detection_model(
        "fasterrcnn_resnet18", num_classes=3, in_channels=1, rpn_post_nms_top_n_test=10
    ).eval()
    assert model.rpn.post_nms_top_n() == 10
    images, targets = detection_batch(2, channels=1)
    with torch.no_grad():
        assert len(model(images)) == 2
    losses = model.train()(images, targets)
    sum(losses.values()).backward()


# --- regression ------------------------------------------------------------------------------


def test_mlp_blocks_give_features_before_dropout() -> None:
    model = MLP(num_classes=2, in_channels=5, hidden=[8, 6], dropout=0.5).train()
    features = {}
    for name in ("blocks.0", "blocks.1"):
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: features.update({name: out})
        )
    out = model(torch.randn(4, 5))
    assert out.shape == (4, 2)
    assert features["blocks.0"].shape == (4, 8) and features["blocks.1"].shape == (4, 6)
    assert (features["blocks.1"] >= 0).all()
    assert MLP(num_classes=3, in_channels=4, hidden=[])(torch.randn(2, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="in_channels"):
        MLP(num_classes=1, in_channels=0)


def test_classification_configs_serve_as_image_regressors() -> None:
    torch.manual_seed(0)
    node = compose_group("student", "resnet8")
    model = build(node, num_classes=2, in_channels=3).train()
    x = torch.rand(8, 3, 16, 16)
    y = torch.stack([x.mean((1, 2, 3)), x[:, 0].std((1, 2))], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss = F.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(x).shape == (8, 2) and loss.item() < 0.5 * first
    assert node["feature_layers"] == ["layer1", "layer2", "layer3"]


# --- scripts/list_layers.py ------------------------------------------------------------------


@pytest.fixture(scope="module")
def list_layers():
    spec = importlib.util.spec_from_file_location("list_layers", REPO / "scripts/list_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["resnet8", "--depth", "1"], "layer3   Sequential           64x8x8"),
        (["--config", "conf/student/seg_fcn_resnet20.yaml", "--depth", "1"], "*layer3"),
        (
            ["fasterrcnn_resnet8", "--task", "detection", "--input", "1x64x64", "--depth", "3"],
            "backbone.body.layer3",
        ),
        (
            ["--config", "conf/teacher/det_fcos_resnet8.yaml", "--depth", "2"],
            "*backbone.fpn.layer_blocks.0",
        ),
        (["--config", "conf/teacher/mlp_large.yaml", "--input", "9"], "*blocks.1"),
    ],
)
def test_list_layers_lists_models_of_every_task(list_layers, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(REPO)
    list_layers(argv)
    printed = capsys.readouterr().out
    line = next(row for row in printed.splitlines() if row.startswith(expected))
    if "mlp" in argv[-3]:
        assert line.split()[-1] == "256"
    if "seg_fcn" in str(argv):
        assert line.split()[-1] == "64x16x16"  # dilated: layer2's resolution at 64x64
    if "fcos" in str(argv):
        assert line.split()[-1] == "64x32x32"  # the finest FPN level, stride 2
