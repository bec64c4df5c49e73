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

Causal language models (integer token ids ``[B, L]`` as input) get two more rows.
``macs_per_image`` is then per *sequence* of ``L`` tokens (the run's ``data.block_size``), and
``macs_per_token`` is it divided by ``L``; attention's scores and weighted sum grow with ``L``,
so it depends on the sequence length. Products are counted as the model runs them: an
attention layer's ``L x L`` score matrix whole (the causal mask hides half of it, but the
kernel still computes it). ``cpu_latency_ms_per_token`` is what shipping a small LM is about:
the time of each generated token when decoding greedily at batch 1 with the key/value cache
(:func:`distill_zoo.models.language.generate`, the library's ``generate`` for Hugging Face
models), after a prompt of ``L / 2`` tokens: ``(t(N new tokens) - t(1 new token)) / (N - 1)``
with ``N = 32`` by default, each ``t`` a median over the timed runs. The subtraction leaves out
the prompt's own pass (which yields the first token) and ``generate``'s fixed set-up cost, so
the figure is the cost of one more token once decoding runs.

Attention through :func:`torch.nn.functional.scaled_dot_product_attention` is counted by
running the MAC count on PyTorch's math kernel (``SDPBackend.MATH``: the same products as
matrix multiplications the counter knows); the CPU's fused kernel, which latency times, is
not known to the counter, which would otherwise leave attention out.
"""

from __future__ import annotations

import contextlib
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

from distill_zoo.models.language import generate, max_positions
from distill_zoo.shipping import export

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch 2.2
    SDPBackend = sdpa_kernel = None

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
TOKENS_NOTE = (
    "; for a language model (token ids in, input_shape [L]): macs_per_image is per sequence "
    "of L tokens, attention's L x L scores and weighted sum counted whole, and "
    "macs_per_token = macs_per_image / L; cpu_latency_ms_batch<B> times one forward pass over "
    "B sequences of L tokens; cpu_latency_ms_per_token: greedy decoding at batch 1 with the "
    "key/value cache (the library's generate) after a prompt of prompt_tokens tokens, "
    "(t(new_tokens) - t(1)) / (new_tokens - 1) with t the median time of generating that many "
    "tokens: the time of one more token, the prompt's pass and generate's set-up left out"
)
NEW_TOKENS = 32
"""Tokens generated after the prompt when a language model's latency per token is timed."""
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
    with (
        torch.inference_mode(),
        _math_attention(),
        FlopCounterMode(display=False) as counter,
        others,
    ):
        model(example_input[:1])
    return counter.get_total_flops() // 2, sorted(others.seen)


def _math_attention() -> contextlib.AbstractContextManager:
    """Scaled dot-product attention on PyTorch's math kernel: matrix products the FLOP
    counter counts (it does not know the CPU's fused attention kernel)."""
    if sdpa_kernel is None:  # pragma: no cover - torch 2.2
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def is_token_input(example_input: Tensor) -> bool:
    """Whether ``example_input`` is token ids (integers, ``[B, L]``) of a language model."""
    return example_input.ndim == 2 and not example_input.is_floating_point()


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


def generation_lengths(
    model: nn.Module, length: int, new_tokens: int = NEW_TOKENS
) -> tuple[int, int]:
    """The prompt length and the number of new tokens with which the latency per token of a
    language model is timed: a prompt of ``length // 2`` tokens and ``new_tokens`` more,
    fewer where the model reads fewer positions in all (``max_position_embeddings``).

    Raises:
        ValueError: For ``new_tokens < 2`` or a model that cannot generate 2 tokens after
            the prompt.
    """
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be >= 2 (a difference of two timings), got {new_tokens}"
        )
    prompt = max(1, length // 2)
    positions = max_positions(model)
    if positions is not None:
        new_tokens = min(new_tokens, positions - prompt)
    if new_tokens < 2:
        raise ValueError(
            f"the model reads at most {positions} positions: no room to time 2 new tokens after "
            f"a prompt of {prompt}"
        )
    return prompt, new_tokens


def cpu_latency_ms_per_token(
    model: nn.Module, prompt: Tensor, new_tokens: int, repeats: int, warmup: int
) -> float:
    """Milliseconds per generated token of greedy decoding of ``prompt`` (``[1, P]`` token
    ids) with :func:`~distill_zoo.models.language.generate` (the key/value cache of Hugging
    Face models): ``(t(new_tokens) - t(1)) / (new_tokens - 1)``, where ``t(n)`` is the median
    wall time of generating ``n`` tokens over ``repeats`` timed runs after ``warmup`` untimed
    ones. Generating one token is the prompt's pass alone (and ``generate``'s set-up): the
    difference is the cost of the ``new_tokens - 1`` tokens decoded one by one after it.
    Call it with the model and ``prompt`` on the CPU and the model in eval mode.
    """
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be >= 2 (a difference of two timings), got {new_tokens}"
        )

    def timed(count: int) -> float:
        start = time.perf_counter()
        generate(model, prompt, count)
        return time.perf_counter() - start

    with torch.inference_mode():
        for _ in range(warmup):
            timed(new_tokens), timed(1)
        full, first = [], []
        for _ in range(repeats):
            full.append(timed(new_tokens))
            first.append(timed(1))
    decoding = statistics.median(full) - statistics.median(first)
    return 1000 * decoding / (new_tokens - 1)


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
    new_tokens: int = NEW_TOKENS,
) -> dict[str, int | float]:
    """Parameters, MACs per image, weights file size and CPU latency of one model (and, for
    a language model, MACs and decoding latency per token).

    ``model`` itself is left as it was (device, dtype, train/eval mode): MACs and latency are
    measured on a float32 CPU copy in eval mode.

    Args:
        model: The network.
        example_input: A batch of at least one image of the model's input shape (or token
            ids ``[B, L]`` of a language model); batches of each size in ``batch_sizes``
            repeat its first one.
        weights_bytes: The weights file size when known (an existing ``teacher.pt``);
            ``None``: measured with :func:`weights_file_bytes`.
        batch_sizes: Batch sizes at which latency is timed.
        repeats: Timed runs per batch size (the median is reported).
        warmup: Untimed runs before timing.
        new_tokens: Language models: tokens generated after the prompt when the latency per
            token is timed (see :func:`cpu_latency_ms_per_token`).

    Returns:
        ``params``, ``macs_per_image``, ``weights_file_bytes`` and
        ``cpu_latency_ms_batch<B>`` for each ``B`` in ``batch_sizes``; for token ids also
        ``macs_per_token`` and ``cpu_latency_ms_per_token``.
    """
    options = {"batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup}
    return _measure(
        model, example_input, weights_bytes=weights_bytes, new_tokens=new_tokens, **options
    )[0]


def _measure(
    model: nn.Module,
    example_input: Tensor,
    *,
    weights_bytes: int | None,
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int,
    new_tokens: int = NEW_TOKENS,
) -> tuple[dict[str, int | float], list[str]]:
    """:func:`measure`, and the operators its MAC count could not count."""
    if weights_bytes is None:
        weights_bytes = weights_file_bytes(model)
    cpu_model = eager_cpu_copy(model)
    image = example_input[:1].detach().to("cpu")
    image = image.float() if image.is_floating_point() else image  # token ids stay integers
    macs, uncounted = count_macs_and_uncounted(cpu_model, image)
    result: dict[str, int | float] = {
        "params": count_parameters(model),
        "macs_per_image": macs,
    }
    tokens = is_token_input(image)
    if tokens:  # a language model: per sequence of L tokens, and per token
        length = image.shape[1]
        result["macs_per_token"] = macs // length if macs % length == 0 else macs / length
    result["weights_file_bytes"] = int(weights_bytes)
    for batch_size in batch_sizes:
        images = image.expand(batch_size, *image.shape[1:]).contiguous()
        latency = cpu_latency_ms(cpu_model, images, repeats, warmup)
        result[f"cpu_latency_ms_batch{batch_size}"] = round(latency, 4)
    if tokens:
        prompt_length, new = generation_lengths(cpu_model, image.shape[1], new_tokens)
        prompt = image[:, :prompt_length]
        latency = cpu_latency_ms_per_token(cpu_model, prompt, new, repeats, warmup)
        result["cpu_latency_ms_per_token"] = round(latency, 4)
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
    new_tokens: int = NEW_TOKENS,
) -> dict:
    """Teacher and student side by side: size, compute and CPU speed, and their ratios.

    Args:
        student: The distilled network: a classifier, segmenter, regressor, torchvision
            detector (whose eval-mode forward takes the batch of images) or causal language
            model (:mod:`distill_zoo.models.language`).
        teacher: Its teacher, or ``None`` (a run without one: no teacher column, no ratios).
        example_input: A batch of at least one input of the data's shape, e.g.
            ``(2, C, H, W)`` zeros (``build.example_input``), ``(2, F)`` tabular rows, or
            ``(2, L)`` integer token ids of a language model.
        student_weights_bytes: Size of the student's weights file when one exists;
            ``None``: measured by saving its state dict to a temporary file.
        teacher_weights_bytes: The same for the teacher (e.g. the size of a ``teacher.pt``).
        batch_sizes: Batch sizes at which CPU latency is timed.
        repeats: Timed runs per batch size; the median is reported. 3 with ``warmup=1`` is
            enough for a glance at the end of every run; 20 or more for figures to publish.
        warmup: Untimed runs before timing (allocator and oneDNN set-up).
        new_tokens: Language models: tokens generated after a prompt of ``L // 2`` tokens
            when the latency per token is timed (fewer where the model reads fewer
            positions); at least 2.

    Returns:
        A JSON-ready dict: ``student`` and ``teacher`` (``None`` without one), each with
        ``params``, ``macs_per_image``, ``weights_file_bytes`` and
        ``cpu_latency_ms_batch<B>``; ``teacher_over_student`` with the ratio of each of these
        (``None`` without a teacher); and how it was measured (``input_shape`` of one input,
        ``torch_threads``, ``repeats``, ``warmup``, ``batch_sizes``, ``note``). Where a
        model ran operators the MAC counter does not know (a detector's RoIAlign and NMS),
        ``uncounted_ops`` lists them per model and the note says the MACs are partial. For
        token ids (a language model) each model also has ``macs_per_token`` and
        ``cpu_latency_ms_per_token``, ``generation`` says how decoding was timed
        (``prompt_tokens``, ``new_tokens``, ``decoding``) and the note explains the rows.

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
    generation = None
    if is_token_input(example_input):  # the same lengths time both (within both's limits)
        length = example_input.shape[1]
        prompt, new_tokens = generation_lengths(student, length, new_tokens)
        if teacher is not None:
            new_tokens = generation_lengths(teacher, length, new_tokens)[1]
        generation = {
            "prompt_tokens": prompt,
            "new_tokens": new_tokens,
            "decoding": "greedy, batch 1, key/value cache",
        }
    options = {
        "batch_sizes": batch_sizes,
        "repeats": repeats,
        "warmup": warmup,
        "new_tokens": new_tokens,
    }
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
    if generation is not None:
        report["generation"] = generation
        report["note"] += TOKENS_NOTE
    if student_uncounted or teacher_uncounted:
        report["uncounted_ops"] = {"student": student_uncounted, "teacher": teacher_uncounted}
        report["note"] += PARTIAL_MACS_NOTE
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
    "macs_per_token": "MACs per token",
    "cpu_latency_ms_per_token": "CPU latency per token",
}


def format_report(report: dict) -> str:
    """The report as a table: one row per measure, teacher, student and teacher/student."""
    student, teacher = report["student"], report["teacher"]
    ratio = report["teacher_over_student"]
    shape = report.get("input_shape")
    tokens = "macs_per_token" in student  # a language model: per sequence and per token
    where = ""
    if shape and tokens:
        where = f" for a sequence of {shape[0]} tokens"
    elif shape:
        where = f" for input {shape[0]} values" if len(shape) == 1 else ""
        where = where or f" for input {'x'.join(map(str, shape))}"
    lines = [
        f"compression report (CPU latency: median of {report['repeats']} runs after "
        f"{report['warmup']} warm-up run(s), {report['torch_threads']} torch thread(s); "
        f"MACs = FLOPs/2 of torch.utils.flop_counter{where})",
        f"{'':<22}{'teacher':>14}{'student':>14}{'teacher/student':>18}",
    ]
    per = "sample" if shape is not None and len(shape) == 1 else "image"
    per = "sequence" if tokens else per
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
    generation = report.get("generation")
    if tokens and generation:
        prompt, new = generation["prompt_tokens"], generation["new_tokens"]
        lines.append(
            f"MACs per token = MACs per sequence / {shape[0] if shape else 'L'}; CPU latency "
            f"per token: greedy decoding at batch 1 with the key/value cache after a prompt of "
            f"{prompt} tokens, (t({new} new tokens) - t(1)) / {new - 1}"
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
    example = export.first_test_images(data, 1)  # token ids stay integers
    report = compression_report(student, teacher, example, repeats=repeats, warmup=warmup)
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
