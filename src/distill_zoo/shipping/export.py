"""Ship the student: ``python -m distill_zoo.export <run dir or ckpt> format=onnx|torchscript``.

Writes the run's student alone (rebuilt from the run's ``config.yaml`` and loaded with the
``student.*`` weights of its checkpoint: no teacher, no distiller parts) as ONNX
(``torch.onnx.export``, the ``torch.export``-based exporter, dynamic batch axis) or
TorchScript (``torch.jit.trace``), then runs the exported file on a batch of the run's real
test images, and on the first of them alone, and compares its logits with eager PyTorch's.

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
from distill_zoo.results.runs import evaluation_data, load_config
from distill_zoo.teachers import TeacherEnsemble, TeacherRoute

FORMATS = {"onnx": "onnx", "torchscript": "pt"}
"""Export format -> file suffix."""

CHECKPOINTS = ("best", "last")
MAX_INLINE_ONNX_BYTES = 1 << 30
"""Weights above this go to an external ``.onnx.data`` file (protobuf caps files at 2 GiB)."""


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")
"""Terminal colour codes, which some exporter messages carry."""


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
    """The first ``count`` test images of ``data`` (all of them if it has fewer)."""
    images = []
    for batch in data.test_dataloader():
        images.append(batch[0])
        if sum(len(b) for b in images) >= count:
            break
    return torch.cat(images)[:count].float()


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
    channels, without pretrained weights (the run's checkpoint replaces them: nothing to
    download)."""
    if "weights" in node:
        node = OmegaConf.merge(node, {"weights": None})
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


def export_model(
    model: nn.Module,
    fmt: str,
    example_input: Tensor,
    out: Path,
    *,
    name: str | None = None,
    opset: int | None = None,
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
                    output_names=["logits"],
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
    (logits,) = session.run(["logits"], {"images": images.cpu().numpy()})
    return torch.from_numpy(logits).float()


def _run_checked(path: Path, fmt: str, images: Tensor, what: str) -> Tensor:
    try:
        return run_exported(path, fmt, images)
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
    """Exports the student of a finished run and checks it on the run's real test images.

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
        What was done: ``file``, ``format``, ``checkpoint``, ``architecture``, ``params``,
        ``checked_images``, ``max_abs_diff``, ``tolerance`` and ``warnings``.

    Raises:
        UserError: A bad option, path or run folder.
        ExportError: The architecture cannot be exported, or its outputs do not match.
    """
    if fmt not in FORMATS:
        raise UserError(f"format={fmt} is unknown: use format=onnx or format=torchscript")
    run_dir, checkpoint = resolve_run(path, ckpt)
    cfg = load_config(run_dir)
    data = evaluation_data(cfg)
    student = load_student(cfg, checkpoint, data)
    images = first_test_images(data, check_images)
    out = Path(out) if out else run_dir / "export" / f"student.{FORMATS[fmt]}"
    # Export with two images and check on a batch of another size and on one image alone,
    # so a batch size frozen into the file shows.
    example = images[:2] if len(images) >= 2 else images.repeat(2, 1, 1, 1)
    name = architecture(cfg.student)
    notes = export_model(student, fmt, example, out, name=name, opset=opset)
    with torch.inference_mode():
        eager = student(images).float()
    what = f"exported {fmt} {name}"
    diff = max(
        check_outputs(_run_checked(out, fmt, batch, what), eager[: len(batch)], atol, rtol, what)
        for batch in (images, images[:1])
    )
    return {
        "file": str(out),
        "format": fmt,
        "checkpoint": str(checkpoint),
        "architecture": name,
        "params": sum(p.numel() for p in student.parameters()),
        "checked_images": len(images),
        "max_abs_diff": diff,
        "tolerance": atol + rtol * eager.abs().max().item(),
        "warnings": notes,
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
    print(
        f"exported the student {result['architecture']} ({result['params']:,} parameters) of "
        f"{result['checkpoint']} to {result['file']} ({result['format']})\n"
        f"checked on {result['checked_images']} real test images: max |exported - eager| = "
        f"{result['max_abs_diff']:.3g} <= tolerance {result['tolerance']:.3g}: ok"
    )
    return 0
