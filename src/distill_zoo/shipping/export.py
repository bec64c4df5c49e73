"""Ship the student: ``python -m distill_zoo.export <run dir or ckpt> format=onnx|torchscript``.

Writes the run's student alone (rebuilt from the run's ``config.yaml`` and loaded with the
``student.*`` weights of its checkpoint: no teacher, no distiller parts) as ONNX
(``torch.onnx.export``, the ``torch.export``-based exporter, dynamic batch axis) or
TorchScript (``torch.jit.trace``), then runs the exported file on a batch of the run's real
test inputs, and on the first of them alone, and compares its outputs with eager PyTorch's:
class logits (classification), per-pixel logits ``[B, K, H, W]`` (segmentation) or the
predicted values ``[B, D]`` (regression, standardised as the model outputs them; input
``[B, F]`` rows for tabular data).

Detectors (torchvision's Faster R-CNN, RetinaNet, FCOS: ``task=detection``) are exported as
far as torchvision allows. TorchScript: ``torch.jit.script`` (a trace cannot follow a
detector); the file takes a list of ``[3, H, W]`` images and returns ``(losses, detections)``
as scripted torchvision detectors do, ``detections`` a list of ``{boxes, labels, scores}``.
ONNX: ``torch.export`` cannot follow the data-dependent number of boxes, so the
TorchScript-based exporter (``dynamo=False``, opset 17 by default) writes a graph for one
image ``[1, 3, H, W]`` of the data's size, with outputs ``boxes``, ``labels``, ``scores``; if
the installed torch cannot, the error says so and names ``format=torchscript``. The check
runs the file on each real test image and compares its boxes, scores and labels with eager
PyTorch's (each box matched to the closest one of the same class).

Options (``key=value``):
    format: ``onnx`` (default) or ``torchscript``.
    ckpt: ``best`` (default) or ``last``, when given a run folder.
    out: The file to write; default ``<run dir>/export/student.onnx`` or ``student.pt``.
    opset: ONNX opset version; default: the exporter's.
    atol, rtol: The check passes when ``max |exported - eager| <= atol + rtol * max |eager|``
        (default 1e-4 and 1e-4: different kernels and ONNX's folded BatchNorm round
        differently, and untrained deep networks have logits in the thousands).

The exit status is 0 when the file is written and matches, 1 when the exported model's
outputs do not match or the architecture cannot be exported in that format (the message
names both and suggests the other format), and 2 for a bad command line or run folder.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from distill_zoo import build, teachers
from distill_zoo.results.runs import evaluation_data, first_inputs, load_config, task_of_config
from distill_zoo.teachers import TeacherEnsemble, TeacherRoute

FORMATS = {"onnx": "onnx", "torchscript": "pt"}
"""Export format -> file suffix."""

CHECKPOINTS = ("best", "last")
MAX_INLINE_ONNX_BYTES = 1 << 30
"""Weights above this go to an external ``.onnx.data`` file (protobuf caps files at 2 GiB)."""


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")
"""Terminal colour codes, which some exporter messages carry."""

DETECTION = "detection"
DETECTOR_ONNX_OPSET = 17
"""Opset of a detector's ONNX graph when none is asked (the TorchScript-based exporter's)."""
OUTPUT_NAMES = {"regression": "predictions"}
"""Name of the ONNX output per task; ``logits`` for the others."""


class UserError(ValueError):
    """A mistake on the command line or in the run folder; the message names the fix."""


class ExportError(RuntimeError):
    """The architecture cannot be exported in the asked format, or the export is wrong."""


# --- the finished run --------------------------------------------------------------------------


def resolve_run(path: str | Path, ckpt: str = "best") -> tuple[Path, Path]:
    """The run folder and the checkpoint to read, from a run folder or a checkpoint file.

    A checkpoint file lies in ``<run>/checkpoints/``, so its run is two levels up. In a run
    folder, ``ckpt=best`` is the ``checkpoints/best-*.ckpt`` that ``metrics.json`` names (or
    the only one), ``ckpt=last`` is ``checkpoints/last.ckpt``.

    Raises:
        UserError: ``path`` is neither; ``ckpt`` is unknown; the checkpoint is missing.
    """
    path = Path(path).expanduser()
    if path.is_file():
        run_dir = path.resolve().parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise UserError(
                f"{path} is not inside a run folder (no {run_dir / 'config.yaml'}): pass a "
                "checkpoint from <run dir>/checkpoints/ of a run that `python -m distill_zoo` "
                "wrote, or the run folder itself"
            )
        return run_dir, path
    if not path.is_dir():
        raise UserError(f"{path} does not exist: pass a run folder or a checkpoint inside one")
    if not (path / "config.yaml").is_file():
        raise UserError(
            f"{path} is not a run folder (no config.yaml): pass the folder that "
            "`python -m distill_zoo` wrote (outputs/<overrides>/<time>/), or a checkpoint in "
            "its checkpoints/"
        )
    if ckpt not in CHECKPOINTS:
        raise UserError(f"ckpt={ckpt} is unknown: use ckpt=best or ckpt=last")
    folder = path / "checkpoints"
    if ckpt == "last":
        last = folder / "last.ckpt"
        if not last.is_file():
            raise UserError(f"{last} does not exist: the run saved no checkpoint yet")
        return path, last
    return path, _best_checkpoint(path, folder)


def _best_checkpoint(run_dir: Path, folder: Path) -> Path:
    candidates = sorted(folder.glob("best-*.ckpt"))
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        named = json.loads(metrics.read_text()).get("best_checkpoint")
        if named and (folder / Path(named).name).is_file():
            return folder / Path(named).name
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(
            f"{folder} holds no best-*.ckpt: the run has not finished an epoch; try ckpt=last"
        )
    raise UserError(
        f"{folder} holds several best checkpoints ({', '.join(p.name for p in candidates)}) "
        "and metrics.json names none of them: pass the checkpoint file itself"
    )


def first_test_images(data, count: int) -> Tensor:
    """The first ``count`` test inputs of ``data`` (all of them if it has fewer): images, or
    rows of tabular data; in-memory data modules' index batches are built into inputs."""
    return first_inputs(data, count)


def read_run_checkpoint(path: Path) -> dict:
    """The content of a run's Lightning checkpoint (``weights_only=True``)."""
    try:
        return teachers.read_checkpoint(path, role="run", config_key="<checkpoint>")
    except RuntimeError as err:
        raise UserError(str(err)) from err


def architecture(node: DictConfig) -> str:
    """A model config's name for messages (``resnet8``, or its ``_target_``)."""
    return str(node.get("name") or node.get("_target_", "model"))


def build_architecture(node: DictConfig, data) -> nn.Module:
    """The model a ``student``/``teacher`` config describes, for ``data``'s classes and
    channels, without pretrained weights (``weights``, a segmenter's ``weights_backbone``:
    the run's checkpoint replaces them, nothing to download)."""
    unset = {key: None for key in ("weights", "weights_backbone") if key in node}
    if unset:
        node = OmegaConf.merge(node, unset)
    return build.build_model(node, data.num_classes, data.in_channels)


def load_student(cfg: DictConfig, checkpoint: Path, data, loaded: dict | None = None) -> nn.Module:
    """The run's student architecture with the ``student.*`` weights of ``checkpoint``, in
    eval mode: nothing of the teacher or the distiller."""
    student = build_architecture(cfg.student, data)
    loaded = read_run_checkpoint(checkpoint) if loaded is None else loaded
    return teachers.load_weights(student, checkpoint, role="student", loaded=loaded).eval()


def load_teacher(
    cfg: DictConfig, checkpoint: Path, data, loaded: dict | None = None
) -> nn.Module | None:
    """The run's teacher with the ``teacher.*`` weights of ``checkpoint`` (the run kept its
    frozen teacher there), in eval mode; ``None`` for a run without a teacher."""
    if not (build.has_teacher(cfg) and build.needs_teacher(cfg)):
        return None
    node = cfg.teacher
    if node.get("members"):
        teacher = TeacherEnsemble([build_architecture(member, data) for member in node.members])
    elif OmegaConf.is_list(node.get("ckpt")):
        members = [build_architecture(node, data) for _ in node.ckpt]
        route = node.get("route_epochs")
        teacher = TeacherRoute(members, list(route)) if route else TeacherEnsemble(members)
    else:
        teacher = build_architecture(node, data)
    loaded = read_run_checkpoint(checkpoint) if loaded is None else loaded
    state = {
        key.removeprefix("teacher."): value
        for key, value in loaded.get("state_dict", {}).items()
        if key.startswith("teacher.")
    }
    if not state:
        raise UserError(f"{checkpoint} holds no teacher weights (no 'teacher.*' entries)")
    return teachers.load_weights(teacher, checkpoint, role="teacher", loaded=state).eval()


# --- export and check --------------------------------------------------------------------------


class TensorOutput(nn.Module):
    """A model whose forward returns ``{"out": logits, ...}`` (torchvision's segmentation
    convention), as one returning the ``out`` tensor: what a trace and ONNX can export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


def exportable(model: nn.Module, example_input: Tensor) -> nn.Module:
    """``model``, or :class:`TensorOutput` around it where it returns a dict with ``out``."""
    with torch.inference_mode():
        output = model.eval()(example_input)
    if isinstance(output, dict) and isinstance(output.get("out"), Tensor):
        return TensorOutput(model).eval()
    return model


def export_model(
    model: nn.Module,
    fmt: str,
    example_input: Tensor,
    out: Path,
    *,
    name: str | None = None,
    opset: int | None = None,
    output_name: str = "logits",
) -> list[str]:
    """Writes ``model`` to ``out`` as ``fmt``.

    Args:
        model: The network (put in eval mode here); its forward takes one image batch and
            returns logits.
        fmt: ``onnx`` or ``torchscript``.
        example_input: A batch of at least two images (a batch of one would fix the batch
            size of an ONNX graph).
        out: The file to write; its folder is created.
        name: The architecture's name for messages; default the model's class name.
        opset: ONNX opset version; ``None``: the exporter's default.
        output_name: Name of the ONNX graph's output.

    Returns:
        The warnings the tracer or exporter gave (a trace follows the branches its example
        took, so each one is worth a look; the output check is the arbiter).

    Raises:
        UserError: ``fmt`` is unknown, or ONNX's packages are missing.
        ExportError: The architecture cannot be exported in this format.
    """
    if fmt not in FORMATS:
        raise UserError(f"format={fmt} is unknown: use format=onnx or format=torchscript")
    name = name or type(model).__name__
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _require("onnxscript", "onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings(
            "ignore", message=r".*jit\.trace.* is deprecated", category=FutureWarning
        )
        try:
            if fmt == "torchscript":
                traced = torch.jit.trace(model, example_input, check_trace=False)
                traced.save(str(out))
            else:
                weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(out),
                    dynamo=True,
                    input_names=["images"],
                    output_names=[output_name],
                    dynamic_shapes=({0: "batch"},),
                    opset_version=opset,
                    external_data=weights > MAX_INLINE_ONNX_BYTES,
                    verbose=False,
                )
        except Exception as err:  # any failure of the tracer or exporter means "unsupported"
            other = "torchscript" if fmt == "onnx" else "onnx"
            raise ExportError(
                f"cannot export the student {name} to {fmt}: {_root_cause(err)}. "
                f"Try format={other}, or change the model's forward (no data-dependent Python "
                "control flow, one tensor in and one tensor of logits out)"
            ) from err
    return _tracer_warnings(caught)


def _tracer_warnings(caught: list) -> list[str]:
    """The first lines of the tracer's warnings among ``caught``; the others are shown as
    they would have been."""
    traced_warnings = set()
    for caught_warning in caught:
        if issubclass(caught_warning.category, torch.jit.TracerWarning):
            traced_warnings.add(str(caught_warning.message).splitlines()[0])
        else:  # not ours to judge: shown as they would have been
            warnings.warn_explicit(
                caught_warning.message,
                caught_warning.category,
                caught_warning.filename,
                caught_warning.lineno,
            )
    return sorted(traced_warnings)


# --- detectors ---------------------------------------------------------------------------------


def export_detector(
    model: nn.Module,
    fmt: str,
    example_image: Tensor,
    out: Path,
    *,
    name: str | None = None,
    opset: int | None = None,
) -> list[str]:
    """Writes a torchvision detector to ``out``: TorchScript by ``torch.jit.script``, or ONNX
    by the TorchScript-based exporter for one image (see the module's doc).

    Args:
        model: The detector (put in eval mode here).
        fmt: ``onnx`` or ``torchscript``.
        example_image: One image ``[1, 3, H, W]`` (or a batch: its first image is used) of
            the size the ONNX graph will take.
        out: The file to write; its folder is created.
        name: The architecture's name for messages.
        opset: ONNX opset version; ``None``: :data:`DETECTOR_ONNX_OPSET`.

    Returns:
        The tracer's warnings (ONNX; torchvision's detectors give several, expected ones: the
        output check is the arbiter).

    Raises:
        UserError: ``fmt`` is unknown, or ONNX's packages are missing.
        ExportError: This torch or torchvision cannot export the detector in this format.
    """
    if fmt not in FORMATS:
        raise UserError(f"format={fmt} is unknown: use format=onnx or format=torchscript")
    name = name or type(model).__name__
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _require("onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for message in (r".*legacy TorchScript-based ONNX export", r".*always returns a"):
            warnings.filterwarnings("ignore", message=message)
        warnings.filterwarnings("ignore", message=r".*jit\.\w+.* is deprecated")
        try:
            if fmt == "torchscript":
                torch.jit.script(model).save(str(out))
            else:
                with torch.no_grad():
                    keys = list(model(example_image[:1])[0])  # the order of the outputs
                torch.onnx.export(
                    model,
                    (example_image[:1],),
                    str(out),
                    dynamo=False,  # torch.export cannot follow the data-dependent box count
                    input_names=["images"],
                    output_names=keys,
                    opset_version=opset or DETECTOR_ONNX_OPSET,
                    verbose=False,
                )
        except Exception as err:  # any failure of the scripter or exporter means "unsupported"
            if fmt == "onnx":
                raise ExportError(
                    f"cannot export the detector {name} to onnx with torch {torch.__version__} "
                    f"({_root_cause(err)}): torchvision's detectors reach ONNX only through "
                    "the TorchScript-based exporter (torch.onnx.export(dynamo=False)), one "
                    "image of fixed size per call. Use format=torchscript (torch.jit.script), "
                    "which works for torchvision's Faster R-CNN, RetinaNet and FCOS"
                ) from err
            raise ExportError(
                f"cannot script the detector {name} ({_root_cause(err)}): torch.jit.script "
                "needs a torchvision detector (Faster R-CNN, RetinaNet, FCOS) whose parts are "
                "TorchScript-compatible; try format=onnx"
            ) from err
    return _tracer_warnings(caught)


def run_exported_detector(path: Path, fmt: str, images: Tensor) -> list[dict[str, Tensor]]:
    """The detections ``{boxes, labels, scores}`` per image of the exported detector at
    ``path``: a scripted file called on the list of images (it returns ``(losses,
    detections)``), an ONNX graph run by onnxruntime on each image alone."""
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.filterwarnings("ignore", r".*jit\.load.* is deprecated", FutureWarning)
            warnings.filterwarnings("ignore", r".*always returns a")
            loaded = torch.jit.load(str(path), map_location="cpu")
            _, detections = loaded(list(images.cpu()))
        return [dict(d) for d in detections]
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    detections = []
    for image in images.cpu():
        arrays = session.run(names, {"images": image[None].numpy()})
        detections.append({n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)})
    return detections


def check_detections(
    exported: list[dict[str, Tensor]],
    eager: list[dict[str, Tensor]],
    atol: float,
    rtol: float,
    what: str = "exported detector",
) -> float:
    """How far two detectors' detections lie apart: per image, each box (its four
    coordinates and score) is matched to the closest box of the same class in the other
    output, both ways (so the order of near-tied boxes does not matter); the largest of these
    distances (max-norm) over all images is returned.

    Raises:
        ExportError: The image count or an image's box count differs, a box has no partner
            of its class, or the distance exceeds ``atol + rtol * max |eager box coordinate|``.
    """
    if len(exported) != len(eager):
        raise ExportError(
            f"the {what} gives detections for {len(exported)} images, eager PyTorch for "
            f"{len(eager)}"
        )
    largest = max((float(d["boxes"].abs().max()) for d in eager if len(d["boxes"])), default=0.0)
    bound = atol + rtol * largest
    diff = 0.0
    for i, (mine, theirs) in enumerate(zip(exported, eager, strict=True)):
        if len(mine["boxes"]) != len(theirs["boxes"]):
            raise ExportError(
                f"the {what} finds {len(mine['boxes'])} boxes in test image {i}, eager PyTorch "
                f"{len(theirs['boxes'])}: the export is not faithful; try the other format"
            )
        if not len(theirs["boxes"]):
            continue
        a = torch.cat([mine["boxes"].float(), mine["scores"].float()[:, None]], 1)
        b = torch.cat([theirs["boxes"].float(), theirs["scores"].float()[:, None]], 1)
        distance = (a[:, None, :] - b[None, :, :]).abs().amax(-1)
        other_class = mine["labels"][:, None].long() != theirs["labels"][None, :].long()
        distance = distance.masked_fill(other_class, float("inf"))
        diff = max(diff, float(distance.min(1).values.max()), float(distance.min(0).values.max()))
        if not diff <= bound:  # also catches NaN and a box without a same-class partner (inf)
            raise ExportError(
                f"the {what}'s boxes or scores differ from eager PyTorch's in test image {i} by "
                f"up to {diff:.3g} (tolerance {bound:.3g} = atol {atol:g} + rtol {rtol:g} * max "
                "|box coordinate|), or their classes differ: the export is not faithful; try "
                "the other format"
            )
    return diff


UNSTABLE_NOISE = (1e-6, 1e-5)
"""Standard deviations of the input noise under which an image's eager detections are
re-computed: where they change, float rounding alone decides that image's boxes."""


def unstable_images(
    model: nn.Module, images: Tensor, indices: list[int], atol: float, rtol: float
) -> list[int]:
    """Of the images ``indices``, those whose eager detections change when the image gets
    noise of std :data:`UNSTABLE_NOISE` (far below 8-bit pixel steps): near-tied scores (an
    untrained detector's flat objectness) let rounding pick other anchors, boxes or classes,
    so no export can be checked there against eager PyTorch."""
    generator = torch.Generator().manual_seed(0)
    unstable = []
    with torch.inference_mode():
        for i in indices:
            image = images[i : i + 1]
            reference = model(image)
            for std in UNSTABLE_NOISE:
                noise = std * torch.randn(image.shape, generator=generator)
                try:
                    check_detections(model(image + noise), reference, atol, rtol)
                except ExportError:
                    unstable.append(i)
                    break
    return unstable


def check_detector_export(
    model: nn.Module,
    exported: list[dict[str, Tensor]],
    eager: list[dict[str, Tensor]],
    images: Tensor,
    atol: float,
    rtol: float,
    what: str = "exported detector",
) -> tuple[float, list[int]]:
    """:func:`check_detections` per image, leaving out the images where eager PyTorch itself
    is unstable (:func:`unstable_images`). Returns the largest difference over the images
    compared and the images left out.

    Raises:
        ExportError: An image where eager PyTorch is stable differs, or every image is
            unstable (nothing could be checked).
    """
    if len(exported) != len(eager):
        check_detections(exported, eager, atol, rtol, what)  # raises, naming the counts
    failures = {}
    diff = 0.0
    for i, (mine, theirs) in enumerate(zip(exported, eager, strict=True)):
        try:
            diff = max(diff, check_detections([mine], [theirs], atol, rtol, what))
        except ExportError as err:
            failures[i] = err
    left_out = unstable_images(model, images, list(failures), atol, rtol)
    for i, err in failures.items():
        if i not in left_out:
            raise ExportError(f"{err} (test image {i}: eager PyTorch is stable there)")
    if left_out and len(left_out) == len(eager):
        raise ExportError(
            f"cannot check the {what}: on every test image, eager PyTorch's own detections "
            "change under input noise of 1e-6 (near-tied scores, as an untrained detector "
            "gives); check a trained detector"
        )
    return diff, left_out


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {ANSI_CODES.sub('', first)}"


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"format=onnx needs {', '.join(missing)}: pip install onnx onnxscript onnxruntime "
            "(or the project's `export` extra)"
        )


def run_exported(path: Path, fmt: str, images: Tensor) -> Tensor:
    """The logits of the exported file at ``path`` on ``images``: TorchScript loaded with
    ``torch.jit.load``, ONNX run by onnxruntime on the CPU."""
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.filterwarnings("ignore", r".*jit\.load.* is deprecated", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")(images.cpu()).float()
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.cpu().numpy()})
    return torch.from_numpy(logits).float()


def _run_checked(path: Path, fmt: str, images: Tensor, what: str, run=None) -> Any:
    try:
        return (run or run_exported)(path, fmt, images)
    except Exception as err:  # the file runs on its example's batch only, or not at all
        raise ExportError(
            f"the {what} fails on a batch of {len(images)} real test images "
            f"({_root_cause(err)}): the batch size or a value of the traced example is "
            "frozen into it; try the other format"
        ) from err


def check_outputs(
    exported: Tensor, eager: Tensor, atol: float, rtol: float, what: str = "exported model"
) -> float:
    """The largest absolute difference between two logit batches.

    Raises:
        ExportError: Shapes differ, or the difference exceeds ``atol + rtol * max |eager|``.
    """
    if exported.shape != eager.shape:
        raise ExportError(
            f"the {what} gives logits of shape {tuple(exported.shape)}, eager PyTorch "
            f"{tuple(eager.shape)}"
        )
    diff = (exported - eager).abs().max().item()
    bound = atol + rtol * eager.abs().max().item()
    if not diff <= bound:  # also catches NaN
        raise ExportError(
            f"the {what}'s logits differ from eager PyTorch's by up to {diff:.3g} (tolerance "
            f"{bound:.3g} = atol {atol:g} + rtol {rtol:g} * max |logit|): the export is not "
            "faithful (a trace fixes data-dependent branches and values taken from numpy or "
            "Python); try the other format"
        )
    return diff


def export_run(
    path: str | Path,
    fmt: str = "onnx",
    *,
    ckpt: str = "best",
    out: str | Path | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    check_images: int = 64,
) -> dict[str, Any]:
    """Exports the student of a finished run and checks it on the run's real test inputs
    (for a detector: see :func:`export_detector` and :func:`check_detections`).

    Args:
        path: A run folder, or a checkpoint inside one.
        fmt: ``onnx`` or ``torchscript``.
        ckpt: ``best`` or ``last`` (a run folder only).
        out: The file to write; default ``<run dir>/export/student.{onnx,pt}``.
        opset: ONNX opset version; ``None``: the exporter's default.
        atol: Absolute tolerance of the output check.
        rtol: Tolerance relative to the largest eager logit.
        check_images: Test images the check runs on (fewer if the test set is smaller).

    Returns:
        What was done: ``file``, ``format``, ``task``, ``checkpoint``, ``architecture``,
        ``params``, ``checked_images``, ``max_abs_diff``, ``tolerance``, ``warnings`` and
        ``usage`` (how to call the file).

    Raises:
        UserError: A bad option, path or run folder.
        ExportError: The architecture cannot be exported, or its outputs do not match.
    """
    if fmt not in FORMATS:
        raise UserError(f"format={fmt} is unknown: use format=onnx or format=torchscript")
    run_dir, checkpoint = resolve_run(path, ckpt)
    cfg = load_config(run_dir)
    task = task_of_config(cfg)
    data = evaluation_data(cfg)
    student = load_student(cfg, checkpoint, data)
    images = first_test_images(data, check_images)
    out = Path(out) if out else run_dir / "export" / f"student.{FORMATS[fmt]}"
    name = architecture(cfg.student)
    what = f"exported {fmt} {name}"
    result = {
        "file": str(out),
        "format": fmt,
        "task": task,
        "checkpoint": str(checkpoint),
        "architecture": name,
        "params": sum(p.numel() for p in student.parameters()),
        "checked_images": len(images),
    }
    if task == DETECTION:
        notes = export_detector(student, fmt, images[:1], out, name=name, opset=opset)
        with torch.inference_mode():
            eager = student(images)
        exported = _run_checked(out, fmt, images, what, run=run_exported_detector)
        diff, left_out = check_detector_export(student, exported, eager, images, atol, rtol, what)
        largest = max((float(d["boxes"].abs().max()) for d in eager if len(d["boxes"])), default=0)
        shape = "x".join(map(str, images.shape[1:]))
        usage = (
            "model(list of [3, H, W] images in [0, 1]) -> (losses, detections), detections a "
            "list of {boxes, labels, scores} per image (torchvision's scripted detectors)"
            if fmt == "torchscript"
            else f"one image [1, {shape}] in [0, 1] per run -> boxes, labels, scores"
        )
        return result | {
            "max_abs_diff": diff,
            "tolerance": atol + rtol * largest,
            "unstable_images": left_out,
            "warnings": notes,
            "usage": usage,
        }
    # Export with two inputs and check on a batch of another size and on one input alone,
    # so a batch size frozen into the file shows.
    example = images[:2] if len(images) >= 2 else images.repeat(2, *[1] * (images.dim() - 1))
    model = exportable(student, example)
    output_name = OUTPUT_NAMES.get(task, "logits")
    notes = export_model(model, fmt, example, out, name=name, opset=opset, output_name=output_name)
    with torch.inference_mode():
        eager = model(images).float()
    diff = max(
        check_outputs(_run_checked(out, fmt, batch, what), eager[: len(batch)], atol, rtol, what)
        for batch in (images, images[:1])
    )
    shape = ", ".join(map(str, images.shape[1:]))
    return result | {
        "max_abs_diff": diff,
        "tolerance": atol + rtol * eager.abs().max().item(),
        "warnings": notes,
        "usage": f"inputs [batch, {shape}] -> {output_name} {list(eager.shape[1:])} per input",
    }


# --- command line ------------------------------------------------------------------------------

USAGE = (
    "usage: python -m distill_zoo.export <run dir or checkpoint> format=onnx|torchscript "
    "[ckpt=best|last] [out=<file>] [opset=<int>] [atol=1e-4] [rtol=1e-4]"
)


OPTION = re.compile(r"^-{0,2}[A-Za-z_]\w*=")
"""``key=value`` (or ``--key=value``) with a plain key: an option, not a path."""


def parse_arguments(
    argv: Sequence[str], defaults: dict[str, Any], usage: str
) -> tuple[str, dict[str, Any]]:
    """Splits ``<path> key=value ...`` into the path and the options, typed as their
    defaults (``None`` defaults are ``int`` for ``opset``, else strings).

    Raises:
        UserError: No path, several paths, an unknown key or a value of the wrong type.
    """
    # Run folders are named after their overrides (data.subset=5000,...): an argument is an
    # option only if it starts with a plain name and "=" and is not an existing path.
    is_option = [bool(OPTION.match(a)) and not Path(a).exists() for a in argv]
    paths = [a for a, option in zip(argv, is_option, strict=True) if not option]
    if len(paths) != 1:
        raise UserError(f"expected one run folder or checkpoint, then key=value options\n{usage}")
    options = dict(defaults)
    for arg, option in zip(argv, is_option, strict=True):
        if not option:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("-")
        if key not in defaults:
            raise UserError(f"unknown option {key}= (valid: {', '.join(defaults)})\n{usage}")
        kind = type(defaults[key]) if defaults[key] is not None else int if key == "opset" else str
        try:
            options[key] = kind(value)
        except ValueError:
            raise UserError(f"{key}={value} is not a valid {kind.__name__}\n{usage}") from None
    return paths[0], options


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill_zoo.export``; returns the exit status (see the module's doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    defaults = {"format": "onnx", "ckpt": "best", "out": None, "opset": None}
    defaults |= {"atol": 1e-4, "rtol": 1e-4}
    try:
        path, options = parse_arguments(argv, defaults, USAGE)
        fmt = options.pop("format").lower()
        result = export_run(path, fmt, **options)
    except ExportError as err:
        print(f"distill_zoo.export: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:  # UserError, or weights that do not fit
        print(f"distill_zoo.export: error: {err}", file=sys.stderr)
        return 2
    for note in result["warnings"]:
        print(f"warning from the exporter: {note}")
    compared = " (boxes and scores)" if result["task"] == DETECTION else ""
    left_out = result.get("unstable_images") or []
    print(
        f"exported the student {result['architecture']} ({result['params']:,} parameters) of "
        f"{result['checkpoint']} to {result['file']} ({result['format']})\n"
        f"checked on {result['checked_images'] - len(left_out)} real test images: max "
        f"|exported - eager|{compared} = {result['max_abs_diff']:.3g} <= tolerance "
        f"{result['tolerance']:.3g}: ok"
    )
    if left_out:
        print(
            f"left out: test image(s) {left_out}, where eager PyTorch's own detections change "
            "under input noise of 1e-6 (near-tied scores, as an untrained detector gives)"
        )
    print(f"usage: {result['usage']}")
    return 0
