"""Compression report: what the student saves over its teacher, side by side.

Parameters, multiply-accumulates per image, the size of each model's weights saved alone, and
CPU latency at batch 1 and 64, for teacher and student, with the teacher/student ratios.
:func:`compression_report` measures two models; ``python -m distill_zoo.compression <run dir>
[ckpt=best|last] [repeats=N] [warmup=N]`` measures a finished run (the models rebuilt from its
``config.yaml``, the weights of its best checkpoint), prints the table and writes the report
into the run's ``metrics.json`` under ``"compression"``, keeping the other keys.

Multiply-accumulates (MACs) are counted by :class:`torch.utils.flop_counter.FlopCounterMode`,
which counts 2 FLOPs per multiply-accumulate of convolutions and matrix products; the report
gives ``FLOPs / 2`` for one input (an image, or a row of tabular data) of the run's data shape.
Normalisation, activations, pooling and additions are not counted (a small share of a CNN's
work), as in the MAC counts that KD papers tabulate.

Every task's models are measured: classifiers, segmenters (MACs per image at the data's image
size, the upsampling to full resolution not counted), MLPs on tabular rows, and torchvision
detectors, whose eval-mode forward on a batch of images (pre-processing, backbone, RPN, box
heads, NMS) is what the latency times. A detector's MACs are partial: operators the counter
does not know, torchvision's RoIAlign and NMS, are run but not counted; the report lists such
operators under ``uncounted_ops`` and says so in its ``note``. A detector's work also depends on
the image (the boxes that survive NMS reach the box head).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from distill_zoo.shipping import export

MACS_NOTE = (
    "macs_per_image: multiply-accumulates for one image, FLOPs/2 of torch.utils.flop_counter "
    "(convolutions and matrix products only); weights_file_bytes: torch.save(state_dict) of "
    "the model alone (no teacher, distiller or optimizer state, unlike Lightning's "
    "checkpoint); cpu_latency_ms_batch<B>: median forward time on the CPU in eval mode under "
    "torch.inference_mode, after warm-up runs"
)
PARTIAL_MACS_NOTE = (
    "; macs_per_image is partial: operators listed in uncounted_ops (torchvision's RoIAlign "
    "and NMS in a detector) ran but torch.utils.flop_counter does not count them, and a "
    "detector's work depends on the image (boxes kept after NMS reach the box head)"
)
METRICS_KEY = "compression"
COUNTED_NAMESPACES = ("aten", "prim", "prims")
"""Operator namespaces whose multiply-accumulates the counter knows (where there are any)."""


class _OtherOperators(TorchDispatchMode):
    """Records the operators a forward pass runs outside PyTorch's own namespaces
    (``torchvision::roi_align``, ``torchvision::nms``): ones the FLOP counter cannot count."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace not in COUNTED_NAMESPACES:
            self.seen.add(f"{func.namespace}::{func._opname}")
        return func(*args, **(kwargs or {}))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on one image.

    Args:
        model: Evaluated as it is (call it on a model in eval mode).
        example_input: A batch of one or more images; only the first is used.

    Returns:
        ``FLOPs / 2`` as counted by :class:`~torch.utils.flop_counter.FlopCounterMode`
        (convolutions and matrix products; 2 FLOPs per multiply-accumulate).
    """
    return count_macs_and_uncounted(model, example_input)[0]


def count_macs_and_uncounted(model: nn.Module, example_input: Tensor) -> tuple[int, list[str]]:
    """:func:`count_macs`, and the operators the forward pass ran that the counter does not
    know (outside PyTorch's namespaces, such as ``torchvision::roi_align`` and
    ``torchvision::nms`` in a detector): where there are any, the count is partial."""
    others = _OtherOperators()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter, others:
        model(example_input[:1])
    return counter.get_total_flops() // 2, sorted(others.seen)


def weights_file_bytes(model: nn.Module) -> int:
    """Size on disk of ``torch.save(model.state_dict())``: the model's own weights alone."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def cpu_latency_ms(model: nn.Module, images: Tensor, repeats: int, warmup: int) -> float:
    """Median wall time in milliseconds of ``model(images)`` over ``repeats`` timed runs,
    after ``warmup`` untimed ones, under :func:`torch.inference_mode` (model and images
    where they are: call it with both on the CPU and the model in eval mode)."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(images)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def eager_cpu_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` on the CPU in eval mode, uncompiled (``nn.Module.compile``
    keeps its compiled forward in ``_compiled_call_impl``; the report measures eager code,
    and compiling for the CPU here would take longer than the measurement)."""
    cpu_model = copy.deepcopy(model).to("cpu").float().eval()
    for module in cpu_model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return cpu_model


def measure(
    model: nn.Module,
    example_input: Tensor,
    *,
    weights_bytes: int | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, int | float]:
    """Parameters, MACs per image, weights file size and CPU latency of one model.

    ``model`` itself is left as it was (device, dtype, train/eval mode): MACs and latency are
    measured on a float32 CPU copy in eval mode.

    Args:
        model: The network.
        example_input: A batch of at least one image of the model's input shape; batches of
            each size in ``batch_sizes`` repeat its first image.
        weights_bytes: The weights file size when known (an existing ``teacher.pt``);
            ``None``: measured with :func:`weights_file_bytes`.
        batch_sizes: Batch sizes at which latency is timed.
        repeats: Timed runs per batch size (the median is reported).
        warmup: Untimed runs before timing.

    Returns:
        ``params``, ``macs_per_image``, ``weights_file_bytes`` and
        ``cpu_latency_ms_batch<B>`` for each ``B`` in ``batch_sizes``.
    """
    options = {"batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup}
    return _measure(model, example_input, weights_bytes=weights_bytes, **options)[0]


def _measure(
    model: nn.Module,
    example_input: Tensor,
    *,
    weights_bytes: int | None,
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int,
) -> tuple[dict[str, int | float], list[str]]:
    """:func:`measure`, and the operators its MAC count could not count."""
    if weights_bytes is None:
        weights_bytes = weights_file_bytes(model)
    cpu_model = eager_cpu_copy(model)
    image = example_input[:1].detach().to("cpu", torch.float32)
    macs, uncounted = count_macs_and_uncounted(cpu_model, image)
    result: dict[str, int | float] = {
        "params": count_parameters(model),
        "macs_per_image": macs,
        "weights_file_bytes": int(weights_bytes),
    }
    for batch_size in batch_sizes:
        images = image.expand(batch_size, *image.shape[1:]).contiguous()
        latency = cpu_latency_ms(cpu_model, images, repeats, warmup)
        result[f"cpu_latency_ms_batch{batch_size}"] = round(latency, 4)
    return result, uncounted


def compression_report(
    student: nn.Module,
    teacher: nn.Module | None,
    example_input: Tensor,
    *,
    student_weights_bytes: int | None = None,
    teacher_weights_bytes: int | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 10,
    warmup: int = 2,
) -> dict:
    """Teacher and student side by side: size, compute and CPU speed, and their ratios.

    Args:
        student: The distilled network: a classifier, segmenter, regressor or torchvision
            detector (whose eval-mode forward takes the batch of images).
        teacher: Its teacher, or ``None`` (a run without one: no teacher column, no ratios).
        example_input: A batch of at least one input of the data's shape, e.g.
            ``(2, C, H, W)`` zeros (``build.example_input``), or ``(2, F)`` tabular rows.
        student_weights_bytes: Size of the student's weights file when one exists;
            ``None``: measured by saving its state dict to a temporary file.
        teacher_weights_bytes: The same for the teacher (e.g. the size of a ``teacher.pt``).
        batch_sizes: Batch sizes at which CPU latency is timed.
        repeats: Timed runs per batch size; the median is reported. 3 with ``warmup=1`` is
            enough for a glance at the end of every run; 20 or more for figures to publish.
        warmup: Untimed runs before timing (allocator and oneDNN set-up).

    Returns:
        A JSON-ready dict: ``student`` and ``teacher`` (``None`` without one), each with
        ``params``, ``macs_per_image``, ``weights_file_bytes`` and
        ``cpu_latency_ms_batch<B>``; ``teacher_over_student`` with the ratio of each of these
        (``None`` without a teacher); and how it was measured (``input_shape`` of one input,
        ``torch_threads``, ``repeats``, ``warmup``, ``batch_sizes``, ``note``). Where a
        model ran operators the MAC counter does not know (a detector's RoIAlign and NMS),
        ``uncounted_ops`` lists them per model and the note says the MACs are partial.

    Raises:
        ValueError: For an empty ``example_input``, ``repeats < 1``, ``warmup < 0`` or a
            batch size below 1.
    """
    if example_input.ndim < 1 or example_input.shape[0] < 1:
        raise ValueError(
            "example_input must be a batch of at least one image, got shape "
            f"{tuple(example_input.shape)}"
        )
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    options = {"batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup}
    student_row, student_uncounted = _measure(
        student, example_input, weights_bytes=student_weights_bytes, **options
    )
    teacher_row, teacher_uncounted = (
        (None, [])
        if teacher is None
        else _measure(teacher, example_input, weights_bytes=teacher_weights_bytes, **options)
    )
    report = {
        "student": student_row,
        "teacher": teacher_row,
        "teacher_over_student": None if teacher_row is None else ratios(teacher_row, student_row),
        "input_shape": list(example_input.shape[1:]),
        "torch_threads": torch.get_num_threads(),
        "batch_sizes": list(batch_sizes),
        "repeats": repeats,
        "warmup": warmup,
        "note": MACS_NOTE,
    }
    if student_uncounted or teacher_uncounted:
        report["uncounted_ops"] = {"student": student_uncounted, "teacher": teacher_uncounted}
        report["note"] = MACS_NOTE + PARTIAL_MACS_NOTE
    return report


def ratios(teacher_row: dict, student_row: dict) -> dict[str, float | None]:
    """``teacher / student`` for every entry (``None`` where the student's is 0)."""
    return {
        key: round(teacher_row[key] / value, 4) if value else None
        for key, value in student_row.items()
    }


ROW_LABELS = {
    "params": "parameters",
    "macs_per_image": "MACs per image",
    "weights_file_bytes": "weights file",
}


def format_report(report: dict) -> str:
    """The report as a table: one row per measure, teacher, student and teacher/student."""
    student, teacher = report["student"], report["teacher"]
    ratio = report["teacher_over_student"]
    shape = report.get("input_shape")
    where = ""
    if shape:
        where = f" for input {shape[0]} values" if len(shape) == 1 else ""
        where = where or f" for input {'x'.join(map(str, shape))}"
    lines = [
        f"compression report (CPU latency: median of {report['repeats']} runs after "
        f"{report['warmup']} warm-up run(s), {report['torch_threads']} torch thread(s); "
        f"MACs = FLOPs/2 of torch.utils.flop_counter{where})",
        f"{'':<22}{'teacher':>14}{'student':>14}{'teacher/student':>18}",
    ]
    per = "sample" if shape is not None and len(shape) == 1 else "image"
    for key in student:
        label = ROW_LABELS.get(key) or key.replace("cpu_latency_ms_batch", "CPU latency batch ")
        if key == "macs_per_image":
            label = f"MACs per {per}"
        lines.append(
            f"{label:<22}"
            f"{_human(key, teacher[key] if teacher else None):>14}"
            f"{_human(key, student[key]):>14}"
            f"{'-' if not ratio or ratio[key] is None else f'{ratio[key]:.2f}x':>18}"
        )
    uncounted = report.get("uncounted_ops") or {}
    named = [f"{who}: {', '.join(ops)}" for who, ops in uncounted.items() if ops]
    if named:
        lines.append(
            "MACs are partial: torch.utils.flop_counter does not count these operators, which "
            f"ran ({'; '.join(named)})"
        )
    return "\n".join(lines)


def _human(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.startswith("cpu_latency_ms"):
        return f"{value:.3f} ms"
    if key == "weights_file_bytes":
        return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return str(value)


def write_into_metrics(run_dir: str | Path, report: dict) -> Path:
    """Writes ``report`` into ``<run_dir>/metrics.json`` under ``"compression"``, keeping
    every other key (the file is created if the run has none)."""
    path = Path(run_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics[METRICS_KEY] = report
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def report_run(
    path: str | Path, ckpt: str = "best", repeats: int = 10, warmup: int = 2
) -> tuple[dict, Path]:
    """Measures a finished run: its student and teacher rebuilt from ``config.yaml`` with the
    weights of its ``ckpt`` checkpoint (``best``, ``last``, or a checkpoint path given as
    ``path``), on input of the run's data shape. Returns the report and the run folder."""
    run_dir, checkpoint_path = export.resolve_run(path, ckpt)
    cfg = export.load_config(run_dir)
    data = export.evaluation_data(cfg)
    checkpoint = export.read_run_checkpoint(checkpoint_path)
    student = export.load_student(cfg, checkpoint_path, data, loaded=checkpoint)
    teacher = export.load_teacher(cfg, checkpoint_path, data, loaded=checkpoint)
    report = compression_report(
        student, teacher, export.first_test_images(data, 1), repeats=repeats, warmup=warmup
    )
    return report, run_dir


USAGE = (
    "usage: python -m distill_zoo.compression <run dir or checkpoint> [ckpt=best|last] "
    "[repeats=10] [warmup=2]"
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill_zoo.compression``: prints the report of a run and writes it into
    the run's ``metrics.json``; returns the exit status."""

    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    try:
        path, options = export.parse_arguments(
            argv,
            {"ckpt": "best", "repeats": 10, "warmup": 2},
            USAGE,
        )
        report, run_dir = report_run(path, **options)
    except (ValueError, FileNotFoundError) as err:  # export.UserError, or weights that do not fit
        print(f"distill_zoo.compression: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"written into {write_into_metrics(run_dir, report)} under {METRICS_KEY!r}")
    return 0
