"""Language-model distillation: tokens/s of our KD step against a plain PyTorch loop, and the
memory of the token divergence with a real vocabulary.

**Throughput** (the default). distill_zoo's real Lightning training step of
``task=language_modeling`` (``train.build`` from the config tree, ``Trainer.fit``, a timing
callback) against a plain PyTorch loop doing the same work in the same process: the same
models (a teacher with random weights saved to a file and loaded through ``teacher.ckpt``, so
nothing is trained; the student from the same seed), the same batches (epoch 0 of the same
``TextDataModule`` over the embedded pydoc corpus, byte tokens), the teacher under
``torch.no_grad()``, the student, the token KD loss written out by hand
(``ce_weight * CE + kd_weight * T^2 * KL(p_T || q_S)`` with ``F.log_softmax``/``F.kl_div``
over all positions), backward and an AdamW step (``conf/optim/adamw_lm.yaml``'s settings).
Printed: steady-state tokens/s after the warm-up steps, the ratio to the plain loop, and the
share of step time in the data, the teacher and the student (forward, loss, backward,
update). The plain loop is timed before and after our step (a shared machine drifts); the
ratio is against the mean of the two. The plain loop always writes out ``token_kd``'s forward
KL: for another distiller (``gkd``: JSD and half the steps on the student's own samples,
``seq_kd``: cross-entropy on the teacher's cached continuations) the ratio includes what that
method does differently, and the script says so. ``seq_kd`` with ``cache: true`` decodes the
teacher's continuation of every training sequence before the first step (not timed, but
minutes on a CPU at block size 128): ``--override distiller.cache=false`` times decoding in
every step instead.

**Memory** (``--memory``). Random ``[B, L, V]`` logits (bf16 or fp32; the student's require
grad), one forward and backward of
:func:`~distill_zoo.losses.language.token_divergence` unchunked, with ``chunk_size`` (32, 64)
and against a top-k teacher (:func:`~distill_zoo.losses.language.teacher_topk`, k = 32).
Printed per variant: the bytes autograd saves for the backward (beyond the inputs, through
``torch.autograd.graph.saved_tensors_hooks``), the peak extra memory of the forward and
backward (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak resident set of a fresh
process per variant, from ``/proc/self/status``'s ``VmHWM`` after resetting it), the median
time, and the largest difference of the loss and of the gradient from the unchunked result
(the top-k variant is an approximation: its difference is shown, not checked).

Usage:
    python scripts/benchmark_lm.py                              # token_kd, ~1 min on 2 cores
    python scripts/benchmark_lm.py --distiller gkd --steps 20
    python scripts/benchmark_lm.py --distiller seq_kd --override distiller.cache=false
    python scripts/benchmark_lm.py --device cuda --precision bf16-mixed --batch-size 64
    python scripts/benchmark_lm.py --memory                     # V=32000, B=4, L=256, bf16
    python scripts/benchmark_lm.py --memory --dtype fp32 --chunks 32 64 128 --topk 64
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_zoo.losses.language import DIVERGENCES, TopKLogProbs, teacher_topk, token_divergence

# Lightning, Hydra and the training side are imported inside the throughput functions: the
# memory part starts a fresh process per variant, which then needs torch and the loss only
# (about 2 s to start instead of about 8 s).

PRECISIONS = ("32-true", "bf16-mixed")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LIKE_FOR_LIKE = {"divergence": "forward_kl", "lmbda": 0.0, "topk": None}
"""TokenKD settings under which our step computes exactly the plain loop's loss."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_flags() -> str:
    """The CPU's native-bf16 flags (``/proc/cpuinfo``), or a line saying there are none."""
    from distill_zoo.engine.speed import NATIVE_BF16_FLAGS, native_bf16_flags

    found = ", ".join(sorted(native_bf16_flags()))
    if found:
        return found
    return f"none of {'/'.join(NATIVE_BF16_FLAGS)} (bf16 is emulated here: slower than fp32)"


# --- throughput: our Lightning step against a plain PyTorch loop ------------------------------


def lm_config(args, teacher_ckpt: Path | None = None):
    """``task=language_modeling`` with the chosen models and distiller, bounded for timing."""
    from distill_zoo.config import compose

    return compose(
        [
            "task=language_modeling",
            f"student={args.student}",
            f"teacher={args.teacher}",
            *([f"teacher.ckpt={teacher_ckpt}"] if teacher_ckpt is not None else []),
            f"distiller={args.distiller}",
            f"trainer.accelerator={args.device}",
            f"trainer.precision={args.precision}",
            "logger=none",
            "callbacks=none",
            "epochs=1000",
            f"data.batch_size={args.batch_size}",
            f"data.block_size={args.block_size}",
            "data.drop_last=true",
            *args.override,
        ]
    )


def save_random_teacher(cfg, path: Path) -> int:
    """Writes the state dict of ``cfg.teacher`` with random weights for the vocabulary of
    ``cfg.data`` (a benchmark trains no teacher); returns that vocabulary's size."""
    import lightning as L
    from hydra.utils import instantiate

    from distill_zoo.build import build_model

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    L.seed_everything(0)
    teacher = build_model(cfg.teacher, datamodule.num_classes, datamodule.in_channels)
    torch.save(teacher.state_dict(), path)
    return int(datamodule.num_classes)


def tokens_in(batch) -> int:
    return batch[0].numel()


def plain_loss_weights(distiller: nn.Module) -> tuple[float, float, float]:
    """``(ce_weight, kd_weight, T)`` of the plain loop: the distiller's own where it has them,
    else ``conf/distiller/token_kd.yaml``'s (0.5, 0.5, 1)."""
    return (
        float(getattr(distiller, "ce_weight", 0.5)),
        float(getattr(distiller, "kd_weight", 0.5)),
        float(getattr(distiller, "temperature", 1.0)),
    )


def differences(distiller: nn.Module) -> str:
    """What ``distiller`` does beyond the plain loop's token KD (empty: the same work)."""
    name = type(distiller).__name__
    if name != "TokenKD":
        return f"{name} is not token-level KD"
    changed = [
        f"{key} {getattr(distiller, key)}"
        for key, value in LIKE_FOR_LIKE.items()
        if getattr(distiller, key) != value
    ]
    if distiller.chunk_size is not None:
        changed.append(f"chunk_size {distiller.chunk_size} (chunks recomputed in backward)")
    return ", ".join(changed)


def time_plain_loop(args, cfg) -> tuple[Any, str]:
    """A plain PyTorch loop doing our step's work on the same batches: teacher forward under
    ``no_grad``, student forward, ``ce_weight * CE + kd_weight * T^2 * KL`` written out,
    backward, AdamW step; under ``bf16-mixed`` the forward passes run in ``torch.autocast``
    and the loss in fp32, as in our step. Returns the timing and what ``cfg``'s distiller
    does beyond this loop (:func:`differences`)."""
    import lightning as L
    from benchmark import clock, time_steps

    from distill_zoo.train import build

    L.seed_everything(0)
    datamodule, module = build(cfg)  # the same models (same seed, same teacher file) and data
    device = torch.device(args.device)
    student, teacher = module.student.to(device), module.teacher.to(device)
    student.train()
    teacher.eval()
    ce_weight, kd_weight, temperature = plain_loss_weights(module.distiller)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    bf16 = args.precision == "bf16-mixed"

    def step_loss(inputs, targets):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                teacher_logits = teacher(inputs, use_cache=False).logits
            taught = clock(device)
            logits = student(inputs, use_cache=False).logits
        vocab = logits.shape[-1]
        rows, teacher_rows = logits.float().reshape(-1, vocab), teacher_logits.float()
        ce = F.cross_entropy(rows, targets.reshape(-1))
        kl = F.kl_div(  # batchmean over B*L rows: the mean over positions of sum_v p log(p/q)
            F.log_softmax(rows / temperature, dim=-1),
            F.log_softmax(teacher_rows.reshape(-1, vocab) / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        return taught, ce_weight * ce + kd_weight * temperature**2 * kl

    timing = time_steps(args, datamodule, device, optimizer, step_loss, count=Tensor.numel)
    return timing, differences(module.distiller)


def run_throughput(args) -> dict[str, float]:
    """Times the plain loop, our step and the plain loop again; prints a row each."""
    from benchmark import fit_timed  # the image benchmark's step clock, counting tokens

    with tempfile.TemporaryDirectory() as tmp:
        teacher_ckpt = Path(tmp) / "teacher.pt"
        vocab = save_random_teacher(lm_config(args), teacher_ckpt)
        cfg = lm_config(args, teacher_ckpt)
        print(
            f"device {args.device}, precision {args.precision}, batch {args.batch_size} x "
            f"{args.block_size} tokens, {args.steps} timed steps after {args.warmup} warm-up, "
            f"torch threads {torch.get_num_threads()}"
        )
        print(
            f"\n{cfg.teacher.name} -> {cfg.student.name} with {args.distiller} (random teacher "
            f"weights; {cfg.data.source}, V={vocab})"
        )
        sys.stdout.flush()
        # Timed before and after ours (a shared machine drifts): the ratio is against the mean.
        plain, different = time_plain_loop(args, cfg)
        ours = fit_timed(args, cfg, count=tokens_in)
        again, _ = time_plain_loop(args, cfg)
    reference = (plain.throughput() + again.throughput()) / 2
    for name, timing in [("plain loop", plain), ("ours", ours), ("plain loop again", again)]:
        ratio = timing.throughput() / reference
        print(f"  {name:18s} {timing.throughput():10.1f} tok/s  {ratio:4.2f}x  {timing.shares()}")
    if different:
        print(
            f"  the plain loop writes out token_kd's forward KL; {args.distiller} differs "
            f"({different}): the ratio includes that work"
        )
    sys.stdout.flush()
    return {
        "plain": reference,
        "ours": ours.throughput(),
        "ratio": ours.throughput() / reference,
        "teacher_share": ours.share("teacher"),
        "plain_teacher_share": (plain.share("teacher") + again.share("teacher")) / 2,
        "timed_tokens": ours.count,
    }


# --- memory: the token divergence with a real vocabulary --------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of computing the divergence: unchunked, chunked, or against a top-k teacher."""

    name: str
    chunk_size: int | None = None
    topk: int | None = None


@dataclass
class Measured:
    """A variant's figures (MB are 2**20 bytes; the differences are from the unchunked
    variant's loss and gradient)."""

    saved_bytes: int
    time_ms: float
    peak_mb: float | None = None
    peak_method: str = "off"  # cuda, VmHWM, ru_maxrss, or off (not measured)
    loss_diff: float = 0.0
    grad_diff: float = 0.0
    agrees: bool | None = None  # None: an approximation, not checked


def memory_variants(args) -> list[Variant]:
    return [
        Variant("unchunked"),
        *(Variant(f"chunk_size={c}", chunk_size=c) for c in args.chunks),
        *([Variant(f"top-{args.topk}", topk=args.topk)] if args.topk else []),
    ]


def memory_spec(args, variant: Variant) -> dict[str, Any]:
    """Everything a fresh process needs to build the same inputs and run ``variant``."""
    return {
        "vocab": args.vocab,
        "batch": args.mem_batch,
        "length": args.mem_length,
        "dtype": args.dtype,
        "divergence": args.divergence,
        "temperature": args.temperature,
        "chunk_size": variant.chunk_size,
        "topk": variant.topk,
        "device": args.device,
    }


def make_logits(spec: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Student (requires grad) and teacher logits ``[B, L, V]``, standard normal, drawn from
    seed 0 directly in the chosen dtype (no transient fp32 copy)."""
    generator = torch.Generator(device=spec["device"]).manual_seed(0)
    shape = (spec["batch"], spec["length"], spec["vocab"])
    options = {"dtype": DTYPES[spec["dtype"]], "device": spec["device"], "generator": generator}
    student = torch.randn(shape, **options).requires_grad_()
    teacher = torch.randn(shape, **options)
    return student, teacher


def teacher_input(spec: dict[str, Any], teacher_logits: Tensor) -> Tensor | TopKLogProbs:
    """The teacher as the variant reads it: full logits, or their top-k cache entry."""
    if spec["topk"] is None:
        return teacher_logits
    return teacher_topk(teacher_logits, spec["topk"], spec["temperature"])


def make_inputs(spec: dict[str, Any]) -> tuple[Tensor, Tensor | TopKLogProbs]:
    student, teacher_logits = make_logits(spec)
    return student, teacher_input(spec, teacher_logits)


def divergence(spec: dict[str, Any], student: Tensor, teacher: Tensor | TopKLogProbs) -> Tensor:
    return token_divergence(
        student,
        teacher,
        divergence=spec["divergence"],
        temperature=spec["temperature"],
        chunk_size=spec["chunk_size"],
    )


def storages(*tensors: Tensor) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_bytes(run, exclude: set[int]) -> tuple[Any, int]:
    """``run()``'s result and the bytes of the storages autograd keeps for the backward of
    that result: each storage once, those in ``exclude`` (the inputs) left out, and only
    those still held when ``run`` returns (a node outside the result's graph, such as an
    unused ``exp``, frees what it saved). Saved tensors are kept as detached aliases (the
    same storage, no reference cycle through their grad_fn), watched by weak references."""
    saved: list[tuple[weakref.ref, int, int]] = []

    def pack(tensor: Tensor) -> Tensor:
        alias = tensor.detach()
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved.append((weakref.ref(alias), storage.data_ptr(), storage.nbytes()))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    held = {pointer: size for alias, pointer, size in saved if alias() is not None}
    return result, sum(held.values())


def time_ms(run, device: torch.device, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def cuda_peak_mb(run, device: torch.device) -> float:
    """Peak allocator memory of ``run()`` above what was allocated before it (MB)."""
    gc.collect()
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_peak_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the peak resident memory of one forward and backward above the
    inputs (MB). Linux: ``VmHWM`` of ``/proc/self/status`` reset to the current resident set
    first (``/proc/self/clear_refs``). ``getrusage``'s ``ru_maxrss`` cannot be reset and, in
    a process started by ``subprocess``, already holds the parent's peak (the kernel keeps
    the high-water mark across ``exec``): it is the fallback where ``/proc`` is missing, its
    delta then a lower bound."""
    # A first pass on a tiny vocabulary: what the variant loads on first use (the checkpoint
    # machinery imports modules, ~150 MB) is not counted as the loss's memory.
    warm = {**spec, "vocab": (spec["topk"] or 0) + 16}
    divergence(warm, *make_inputs(warm)).backward()
    student, teacher_logits = make_logits(spec)
    teacher = teacher_input(spec, teacher_logits)
    if spec["topk"] is not None:
        del teacher_logits  # the cache entry replaces the full logits
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before, method = proc_status_kb("VmRSS"), "VmHWM"
    except OSError:
        before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    divergence(spec, student, teacher).backward()
    if method == "VmHWM":
        peak = proc_status_kb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
    return {"peak_mb": (peak - before) * unit / 2**20, "method": method}


def rss_peaks(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`rss_peak_child` of each spec, each in a fresh Python process running this
    script, all at once (a process's peak is its own; most of their time is importing torch)."""
    script = str(Path(__file__).resolve())
    running = [
        subprocess.Popen(
            [sys.executable, script, "--rss-child", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    results = []
    for spec, process in zip(specs, running, strict=True):
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the memory process of {spec} failed:\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def measure(
    args, variant: Variant, student: Tensor, teacher_logits: Tensor, device: torch.device
) -> tuple[Measured, Tensor, Tensor]:
    """A variant's saved bytes, time and peak memory, and its loss and gradient."""
    spec = memory_spec(args, variant)
    teacher = teacher_input(spec, teacher_logits)
    inputs = [student, teacher_logits]
    if isinstance(teacher, TopKLogProbs):
        inputs += [teacher.logprobs, teacher.indices]

    def run() -> Tensor:
        student.grad = None
        loss = divergence(spec, student, teacher)
        loss.backward()
        return loss.detach()

    loss, saved = saved_bytes(lambda: divergence(spec, student, teacher), storages(*inputs))
    student.grad = None
    loss.backward()
    grad = student.grad.detach().clone()
    loss = loss.detach()
    measured = Measured(saved_bytes=saved, time_ms=time_ms(run, device, args.repeats))
    student.grad = None  # the timed runs' gradient is not part of what the next run holds
    if device.type == "cuda":
        measured.peak_mb, measured.peak_method = cuda_peak_mb(run, device), "cuda"
        student.grad = None
    return measured, loss, grad


def run_memory(args) -> dict[str, Measured]:
    """Measures every variant, prints the table, returns the figures by variant name."""
    device = torch.device(args.device)
    spec = memory_spec(args, Variant("unchunked"))
    student, teacher_logits = make_logits(spec)
    gradient_tolerance = 1e-2 if args.dtype == "bf16" else 1e-4  # relative to max |grad|
    print(
        f"token_divergence({args.divergence}, T={args.temperature}) forward + backward: V="
        f"{args.vocab}, B={args.mem_batch}, L={args.mem_length}, {args.dtype} logits "
        f"({student.numel() * student.element_size() / 2**20:.1f} MB each), device "
        f"{args.device}, median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    sys.stdout.flush()
    results: dict[str, Measured] = {}
    reference: tuple[Tensor, Tensor] | None = None
    for variant in memory_variants(args):
        measured, loss, grad = measure(args, variant, student, teacher_logits, device)
        if reference is None:
            reference = loss, grad
        ref_loss, ref_grad = reference
        measured.loss_diff = float((loss - ref_loss).abs())
        measured.grad_diff = float((grad.float() - ref_grad.float()).abs().max())
        if variant.topk is None:
            scale = float(ref_grad.float().abs().max())
            measured.agrees = (
                measured.loss_diff <= 1e-5 * max(abs(float(ref_loss)), 1.0)
                and measured.grad_diff <= gradient_tolerance * scale
            )
        results[variant.name] = measured
        del grad
    if device.type == "cpu" and args.rss:  # after the timings, which they would disturb
        specs = [memory_spec(args, variant) for variant in memory_variants(args)]
        for measured, child in zip(results.values(), rss_peaks(specs), strict=True):
            measured.peak_mb, measured.peak_method = child["peak_mb"], child["method"]
    peak_name = f"peak MB ({next(iter(results.values())).peak_method})"
    where = "this process" if device.type == "cuda" else "a fresh process per variant"
    print(
        f"  {'variant':16s} {'saved MB':>9s} {peak_name:>16s} {'time ms':>9s} "
        f"{'|d loss|':>9s} {'|d grad|':>9s}  vs unchunked"
    )
    for name, m in results.items():
        peak = "-" if m.peak_mb is None else f"{m.peak_mb:.1f}"
        verdict = {True: "agree", False: "DIFFER", None: "approximation (k+1 buckets)"}
        print(
            f"  {name:16s} {m.saved_bytes / 2**20:9.1f} {peak:>16s} {m.time_ms:9.1f} "
            f"{m.loss_diff:9.2e} {m.grad_diff:9.2e}  {verdict[m.agrees]}"
        )
    print(
        "  saved: what autograd keeps for the backward beyond the inputs; peak: the most memory "
        f"above the inputs during forward + backward ({where}), the gradient included"
    )
    print(
        f"  unchunked loss {float(reference[0]):.6f}, max |grad| "
        f"{float(reference[1].float().abs().max()):.3e}; agree: |d loss| <= 1e-5 |loss| and "
        f"|d grad| <= {gradient_tolerance:g} max |grad|"
    )
    sys.stdout.flush()
    return results


# --- command line ------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="measure the divergence's memory instead of the training step's throughput",
    )
    step = parser.add_argument_group("throughput")
    step.add_argument("--distiller", default="token_kd", help="conf/distiller/<name> (LM ones)")
    step.add_argument("--student", default="lm_gpt2_1x128", help="conf/student/<name>")
    step.add_argument("--teacher", default="lm_gpt2_4x256", help="conf/teacher/<name>")
    step.add_argument("--precision", choices=PRECISIONS, default="32-true")
    step.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    step.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    step.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    step.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    step.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides of both loops' run, e.g. distiller.cache=false",
    )
    memory = parser.add_argument_group("memory (--memory)")
    memory.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    memory.add_argument("--mem-batch", type=int, default=4, help="sequences B")
    memory.add_argument("--mem-length", type=int, default=256, help="positions L")
    memory.add_argument("--dtype", choices=DTYPES, default="bf16", help="of the logits")
    memory.add_argument("--divergence", choices=DIVERGENCES, default="forward_kl")
    memory.add_argument("--temperature", type=float, default=1.0)
    memory.add_argument("--chunks", type=int, nargs="*", default=[32, 64], help="chunk sizes")
    memory.add_argument("--topk", type=int, default=32, help="k of the top-k teacher; 0: none")
    memory.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    memory.add_argument(
        "--no-rss",
        dest="rss",
        action="store_false",
        help="CPU: skip the fresh process per variant that measures peak resident memory",
    )
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)  # JSON spec: one variant's peak
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "batch_size", "block_size", "vocab", "mem_batch"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.mem_length < 1 or args.repeats < 1 or any(c < 1 for c in args.chunks):
        parser.error("--mem-length, --repeats and --chunks must be positive")
    if not 0 <= args.topk <= args.vocab:
        parser.error(f"--topk must lie in [0, --vocab={args.vocab}]")
    return args


def main(argv=None) -> dict:
    """Runs the chosen measurement; returns its figures (throughput: tokens/s of ``plain``
    and ``ours``, their ``ratio``, teacher shares in percent and our ``timed_tokens``;
    ``--memory``: a :class:`Measured` per variant)."""
    args = parse_args(argv)
    if args.rss_child:
        result = rss_peak_child(json.loads(args.rss_child))
        print(json.dumps(result))
        return result
    if args.device == "cpu":
        flags = bf16_flags()
        print(f"CPU native bf16: {flags}")
        asked = args.dtype == "bf16" if args.memory else args.precision == "bf16-mixed"
        if asked and flags.startswith("none"):
            print(
                "warning: bf16 asked for on a CPU without AVX512-BF16/AMX: emulated, and slower "
                "than fp32; these figures do not hold on a GPU or a CPU with native bf16"
            )
    if args.memory:
        return run_memory(args)
    return run_throughput(args)


if __name__ == "__main__":
    if "--rss-child" not in sys.argv:
        import lightning  # noqa: F401  (it sets its loggers' levels when imported)

        for name in ("lightning.pytorch", "lightning.fabric"):  # one line per loop, not ten
            logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    main()
