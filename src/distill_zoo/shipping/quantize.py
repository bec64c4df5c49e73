"""Quantized students: fake-quantization training under any distiller, then a real int8 model.

Quantization-aware training follows Jacob et al., "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018), https://arxiv.org/abs/1712.05877;
distilling into such a student is Apprentice (Mishra & Marr, ICLR 2018,
https://arxiv.org/abs/1711.05852) and quantized distillation (Polino, Pascanu & Alistarh,
"Model compression via distillation and quantization", ICLR 2018,
https://arxiv.org/abs/1802.05668).

:func:`prepare_qat` swaps every plain ``nn.Conv2d`` and ``nn.Linear`` of the student, in place
and under the same name, for :class:`QuantConv2d` / :class:`QuantLinear`: the same layer that
fake-quantizes its weight and its input on every forward, with a straight-through gradient.
The student's own ``forward`` keeps running and its module tree is unchanged, so distillers
tap its layers by name as before (no graph rewriting).

- Weights: per output channel, symmetric, signed, restricted range ``[-(2^(b-1)-1),
  2^(b-1)-1]`` (``-127..127`` at 8 bits as in the TFLite int8 spec, ``-7..7`` at 4 bits:
  15 levels that pack into 4 bits), scale ``max|w_c| / (2^(b-1)-1)`` from the current weights,
  so nothing is clipped and every weight receives a gradient.
- Inputs: per tensor, affine, unsigned ``0..2^b-1``, the range an exponential moving average
  of the batch min/max (momentum 0.01, Jacob et al.), updated in training mode only and kept
  in the buffers ``act_min``/``act_max`` (checkpoints hold them). Before the first training
  batch the input passes unquantized.

After training, :func:`convert_int8` turns the trained weights into a real int8 CPU model with
PyTorch's FX graph mode (``prepare_fx`` with the backend's default qconfig, calibration on
real batches, ``convert_fx``; BatchNorm is folded there). There are no int4 CPU kernels: a
4-bit student is reported with its fake-quantized accuracy and the packed size it would have.
:func:`compression_report` compares the float and int8 models (accuracy, file size, CPU
latency); :class:`QuantSpec` (``conf/quantize/``) ties the steps together for a run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_zoo.shipping.compression import cpu_latency_ms, weights_file_bytes
from distill_zoo.teachers.checkpoints import RANGE_BUFFERS, is_range_key  # noqa: F401

log = logging.getLogger(__name__)

Batches = Iterable[tuple[Tensor, Tensor]]
Evaluate = Callable[[nn.Module, Batches], float]


class _FakeQuant:
    """What :class:`QuantConv2d` and :class:`QuantLinear` share: their two quantizers.

    Args:
        *args: The float layer's arguments.
        weight_bits: Bits of the weight.
        activation_bits: Bits of the input.
        momentum: Weight of the newest batch in the moving min/max of the input.
        **kwargs: The float layer's keyword arguments.
    """

    weight: nn.Parameter
    training: bool
    act_min: Tensor
    act_max: Tensor

    def __init__(
        self,
        *args,
        weight_bits: int = 8,
        activation_bits: int = 8,
        momentum: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.momentum = momentum
        self.register_buffer("act_min", torch.empty(()))
        self.register_buffer("act_max", torch.empty(()))
        self.reset_range()

    @classmethod
    def from_float(cls, module: nn.Module, **bits) -> nn.Module:
        """The quantized twin of ``module``, holding the very same parameter tensors.

        Args:
            module: A ``Conv2d`` or ``Linear``.
            **bits: ``weight_bits``, ``activation_bits``, ``momentum``.
        """
        new = cls(**_layer_args(module), **bits, device="meta")  # allocates, draws nothing
        new.weight, new.bias = module.weight, module.bias
        new.reset_range()
        return new.train(module.training)

    def reset_range(self) -> None:
        """Forgets the observed input range (the next training batch sets it afresh)."""
        device = self.weight.device
        self.act_min = torch.tensor(math.inf, device=device)
        self.act_max = torch.tensor(-math.inf, device=device)

    def quantized_weight(self) -> Tensor:
        """The weight rounded to ``weight_bits`` per output channel (straight-through)."""
        weight = self.weight.float()
        qmax = 2 ** (self.weight_bits - 1) - 1
        amax = weight.detach().abs().flatten(1).amax(dim=1)
        scale = (amax / qmax).clamp_min(torch.finfo(torch.float32).eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        quantized = torch.fake_quantize_per_channel_affine(
            weight, scale, zero_point, 0, -qmax, qmax
        )
        return quantized.to(self.weight.dtype)

    def quantized_input(self, x: Tensor) -> Tensor:
        """``x`` rounded to ``activation_bits`` in the observed range (straight-through)."""
        if self.training:
            self._observe(x.detach())
        elif not bool(torch.isfinite(self.act_min)):
            return x  # never saw a training batch: no range to quantize in yet
        qmax = 2**self.activation_bits - 1
        low = self.act_min.clamp(max=0.0)  # the range must hold 0 exactly (zero padding)
        high = self.act_max.clamp(min=0.0)
        scale = ((high - low) / qmax).clamp_min(torch.finfo(torch.float32).eps)
        zero_point = (-low / scale).round().clamp(0, qmax).to(torch.int32)
        quantized = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, 0, qmax)
        return quantized.to(x.dtype)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        low, high = torch.aminmax(x.float())
        first = torch.isinf(self.act_min)  # tensor ops only: no host sync per layer and step
        self.act_min.copy_(torch.where(first, low, torch.lerp(self.act_min, low, self.momentum)))
        self.act_max.copy_(torch.where(first, high, torch.lerp(self.act_max, high, self.momentum)))

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # A float checkpoint (init_from a float student) has no input ranges: keep them empty.
        for name in RANGE_BUFFERS:
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        bits = f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"
        return f"{super().extra_repr()}, {bits}"


class QuantConv2d(_FakeQuant, nn.Conv2d):
    """``nn.Conv2d`` that fake-quantizes its weight (per output channel) and its input."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_FakeQuant, nn.Linear):
    """``nn.Linear`` that fake-quantizes its weight (per output row) and its input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def _layer_args(module: nn.Module) -> dict:
    """The constructor arguments of a ``Conv2d`` or ``Linear`` (quantized or not)."""
    if isinstance(module, nn.Conv2d):
        names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
        args = {name: getattr(module, name) for name in names}
        return {
            **args,
            "groups": module.groups,
            "padding_mode": module.padding_mode,
            "bias": module.bias is not None,
        }
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
    }


def quantized_layers(model: nn.Module) -> dict[str, _FakeQuant]:
    """The fake-quantized layers of ``model`` by name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _FakeQuant)}


def _check_bits(name: str, bits: int | None) -> None:
    if bits is not None and not 2 <= bits <= 8:
        raise ValueError(f"quantize.{name} must be 2..8 bits (8 or 4 are usual), got {bits}")


def prepare_qat(
    model: nn.Module,
    *,
    weight_bits: int = 8,
    activation_bits: int = 8,
    edge_weight_bits: int | None = None,
    momentum: float = 0.01,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Swaps ``model``'s ``nn.Conv2d``/``nn.Linear`` layers for fake-quantized ones, in place.

    Module names, parameters (the same tensors) and the model's ``forward`` are kept, so call
    this on a freshly built student before anything taps or optimizes it. Subclasses of
    ``Conv2d``/``Linear`` (custom forwards) stay float.

    Args:
        model: The student.
        weight_bits: Bits of the weights (symmetric per output channel, ``-(2^(b-1)-1)`` ..
            ``2^(b-1)-1``).
        activation_bits: Bits of every quantized layer's input (affine per tensor).
        edge_weight_bits: Bits of the first and last quantized layers (registration order:
            the stem conv and the classifier in the zoo), which low-bit work usually keeps
            at 8; ``None``: ``weight_bits``.
        momentum: Weight of the newest batch in the moving min/max of the inputs.
        skip: Names of layers to leave float.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: Bad bit widths, an unknown ``skip`` name, a model already prepared, a
            layer already hooked, or nothing to quantize.
    """
    for name, bits in (
        ("weight_bits", weight_bits),
        ("activation_bits", activation_bits),
        ("edge_weight_bits", edge_weight_bits),
    ):
        _check_bits(name, bits)
    if not 0 < momentum <= 1:
        raise ValueError(f"quantize.momentum must lie in (0, 1], got {momentum}")
    if quantized_layers(model):
        raise ValueError(f"{type(model).__name__} is already fake-quantized")
    skip = set(skip)
    names = dict(model.named_modules())
    if unknown := sorted(skip - names.keys()):
        raise ValueError(f"quantize.skip names unknown layers {unknown} of {type(model).__name__}")
    targets = [n for n, m in names.items() if type(m) in _SWAPS and n not in skip]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no plain nn.Conv2d or nn.Linear layer to quantize"
        )
    for index, name in enumerate(targets):
        module = names[name]
        if module._forward_hooks or module._forward_pre_hooks:
            raise ValueError(
                f"layer {name} already has forward hooks: call prepare_qat on the freshly built "
                "model, before FeatureTap or anything else hooks it"
            )
        edge = index in (0, len(targets) - 1)
        bits = edge_weight_bits if edge and edge_weight_bits is not None else weight_bits
        parent, _, leaf = name.rpartition(".")
        quantized = _SWAPS[type(module)].from_float(
            module, weight_bits=bits, activation_bits=activation_bits, momentum=momentum
        )
        setattr(model.get_submodule(parent), leaf, quantized)
    others = [n for n, m in names.items() if isinstance(m, tuple(_SWAPS)) and n not in targets]
    if others:
        log.info("Left float (skipped or custom subclasses): %s", ", ".join(others))
    return model


def detached_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode without forward hooks (FeatureTaps stay behind)."""
    clone = copy.deepcopy(model).cpu().eval()
    for module in clone.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return clone


def float_copy(model: nn.Module) -> nn.Module:
    """A :func:`detached_copy` with plain float layers: the trained weights without fake
    quantization (what int8 conversion starts from)."""
    clone = detached_copy(model)
    for name, module in list(clone.named_modules()):
        if isinstance(module, _FakeQuant):
            plain = next(base for base in _SWAPS if isinstance(module, base))
            new = plain(**_layer_args(module), device="meta")
            new.weight, new.bias = module.weight, module.bias
            parent, _, leaf = name.rpartition(".")
            setattr(clone.get_submodule(parent), leaf, new.eval())
    return clone


@contextlib.contextmanager
def int8_inference() -> Iterator[None]:
    """Around conversion and int8 inference: torch.ao's notices silenced (deprecated in favour
    of torchao; reduce_range; cat of differently quantized inputs), and deterministic mode
    (``trainer=cpu``) off, since int8 CPU ops resize their outputs (and would raise)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for message in (
            "reduce_range will be deprecated",
            "quantized tensor creation functions",
            "must share the same quantization parameters",
        ):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        torch.use_deterministic_algorithms(False)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _prepare_fx(model: nn.Module, example: Tensor, backend: str) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantize.backend={backend} is not available on this machine; choose one of "
            f"{torch.backends.quantized.supported_engines} (x86 on Intel/AMD, qnnpack on ARM)"
        )
    torch.backends.quantized.engine = backend  # the int8 kernels run on this engine
    float_model = float_copy(model)
    try:
        return prepare_fx(float_model, get_default_qconfig_mapping(backend), (example.cpu(),))
    except Exception as err:
        raise ValueError(
            f"cannot convert {type(model).__name__} to int8: torch.fx cannot trace its forward "
            f"({type(err).__name__}: {err}). FX needs a forward without Python control flow "
            "on tensor values or shapes; rewrite that part, or set quantize.convert=false to "
            "keep the fake-quantized accuracy only"
        ) from err


def check_convertible(model: nn.Module, example: Tensor, backend: str = "x86") -> None:
    """Fails now, not after training, if :func:`convert_int8` could not convert ``model``."""
    with int8_inference():
        _prepare_fx(model, example[:1], backend)


def convert_int8(model: nn.Module, calibration: Iterable[Tensor], backend: str = "x86"):
    """A real int8 CPU model of ``model``'s trained weights (FX graph mode quantization).

    BatchNorm is folded into the convolutions, weights become int8 per channel and
    activations quint8 per tensor with ranges calibrated on ``calibration``.

    Args:
        model: A trained student (fake-quantized or float; it is not changed).
        calibration: Batches of real input images (a few dozen batches suffice).
        backend: Quantized engine, ``x86`` (Intel/AMD) or ``qnnpack`` (ARM).

    Raises:
        ValueError: If torch.fx cannot trace the model, the backend is unavailable, or
            ``calibration`` is empty.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("int8 conversion needs at least one calibration batch")
    with int8_inference(), torch.no_grad():
        prepared = _prepare_fx(model, first, backend)
        for images in (first, *batches):
            prepared(images.cpu().float())
        return convert_fx(prepared)


def packed_size_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state if each quantized weight were stored in its bit width
    (bit-packed, plus a float32 scale per output channel) and each quantized layer kept one
    float32 scale and int32 zero point for its input; everything else as stored now.
    BatchNorm is counted unfolded: a deployed model folds it away and is a little smaller."""
    layers = quantized_layers(model)
    total = 0
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf == "weight":
            total += math.ceil(value.numel() * layer.weight_bits / 8) + 4 * value.shape[0]
        elif layer is not None and leaf in RANGE_BUFFERS:
            total += 4
        else:
            total += value.numel() * value.element_size()
    return total


def top1(model: nn.Module, batches: Batches) -> float:
    """Top-1 accuracy of ``model`` over ``(images, targets)`` batches, on the CPU (``model``
    is moved there)."""
    model = model.cpu().eval()
    correct = total = 0
    with torch.inference_mode():
        for images, targets in batches:
            correct += int((model(images.cpu().float()).argmax(1) == targets.cpu()).sum())
            total += targets.numel()
    if total == 0:
        raise ValueError("no evaluation batches")
    return correct / total


def float_and_int8_report(
    float_model: nn.Module,
    int8_model: nn.Module | None,
    batches: Batches,
    input_shape: tuple[int, ...],
    *,
    evaluate: Evaluate = top1,
    batch_sizes: Iterable[int] = (1, 64),
    runs: int = 20,
) -> dict[str, dict]:
    """Accuracy, file size and CPU latency of the float student and its int8 conversion.

    Args:
        float_model: The student with float layers (:func:`float_copy`).
        int8_model: Its :func:`convert_int8` model, or ``None``.
        batches: Re-iterable ``(images, targets)`` evaluation batches.
        input_shape: Shape of one input, e.g. ``(3, 32, 32)``, for the latency runs.
        evaluate: ``evaluate(model, batches) -> accuracy``.
        batch_sizes: Batch sizes timed.
        runs: Timed forward passes per batch size (the median is reported).

    Returns:
        ``{"float": {...}, "int8": {...}}``, each with ``acc1``, ``weights_file_bytes`` and
        ``cpu_latency_ms_batch<B>`` per batch size (the keys of the compression report).
    """
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG streams alone
    report = {}
    for name, model in (("float", float_model), ("int8", int8_model)):
        if model is None:
            continue
        model = model.cpu().eval()
        with int8_inference():
            row = {
                "acc1": evaluate(model, batches),
                "weights_file_bytes": weights_file_bytes(model),
            }
            for batch in batch_sizes:
                images = torch.randn(batch, *input_shape, generator=generator)
                latency = cpu_latency_ms(model, images, repeats=runs, warmup=3)
                row[f"cpu_latency_ms_batch{batch}"] = round(latency, 4)
        report[name] = row
    return report


class CPUBatches:
    """Re-iterable ``(images, targets)`` CPU batches of a set-up Lightning DataModule's split,
    at most ``limit`` of them (the on-device data path builds its batches here too)."""

    def __init__(self, datamodule, split: str, limit: int | None = None) -> None:
        self.datamodule = datamodule
        self.split = split
        self.limit = limit

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        loader = getattr(self.datamodule, f"{self.split}_dataloader")()
        cpu = torch.device("cpu")
        for count, batch in enumerate(loader):
            if self.limit is not None and count >= self.limit:
                return
            batch = self.datamodule.transfer_batch_to_device(batch, cpu, 0)
            yield batch[0].float(), batch[1]


@dataclass
class QuantSpec:
    """A quantized student, as ``conf/quantize/<name>.yaml`` describes it.

    Attributes:
        weight_bits: Bits of the weights (8 or 4; 2..8 accepted).
        activation_bits: Bits of the layers' inputs.
        edge_weight_bits: Bits of the first and last quantized layers; ``None``: weight_bits.
        momentum: Moving-average weight of the newest batch's input range.
        skip: Layer names left float.
        convert: Also build the real int8 CPU model after training (8/8 bits only).
        backend: Quantized engine of the int8 model: ``x86`` or ``qnnpack`` (ARM).
        calibration_batches: Training batches that calibrate the int8 model.
        eval_batches: Test batches the report evaluates on; ``None``: all.
        latency_runs: Timed forward passes per batch size.
        latency_batch_sizes: Batch sizes whose CPU latency is reported.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    edge_weight_bits: int | None = None
    momentum: float = 0.01
    skip: tuple[str, ...] = ()
    convert: bool = True
    backend: str = "x86"
    calibration_batches: int = 16
    eval_batches: int | None = None
    latency_runs: int = 20
    latency_batch_sizes: tuple[int, ...] = (1, 64)

    def __post_init__(self) -> None:
        bits = {self.weight_bits, self.activation_bits, self.edge_weight_bits or self.weight_bits}
        if self.convert and bits != {8}:
            raise ValueError(
                f"quantize.convert=true builds an int8 model, but weight_bits={self.weight_bits}"
                f", activation_bits={self.activation_bits}, edge_weight_bits="
                f"{self.edge_weight_bits}: there are no int4 CPU kernels; set "
                "quantize.convert=false (the report gives the fake-quantized accuracy and "
                "packed size) or use 8 bits"
            )
        if self.calibration_batches < 1:
            raise ValueError("quantize.calibration_batches must be >= 1")

    @property
    def scheme(self) -> str:
        """E.g. ``w8a8``, ``w4a8``."""
        return f"w{self.weight_bits}a{self.activation_bits}"

    def prepare(self, student: nn.Module, example_input: Tensor | None = None) -> nn.Module:
        """Fake-quantizes ``student`` in place; with ``convert``, first checks (on
        ``example_input``) that it will convert to int8, so a run fails before training."""
        if self.convert and example_input is not None:
            check_convertible(student, example_input, self.backend)
        return prepare_qat(
            student,
            weight_bits=self.weight_bits,
            activation_bits=self.activation_bits,
            edge_weight_bits=self.edge_weight_bits,
            momentum=self.momentum,
            skip=self.skip,
        )

    def report(self, student: nn.Module, datamodule, evaluate: Evaluate = top1) -> dict:
        """The ``quantized`` block of a run's compression report.

        Args:
            student: The trained, fake-quantized student (not changed).
            datamodule: The run's set-up DataModule: training batches calibrate, test
                batches evaluate.
            evaluate: ``evaluate(model, batches) -> accuracy``.

        Returns:
            ``scheme``, bit widths, ``threads``, ``fake_quant`` (``acc1``,
            ``packed_size_bytes``), ``float`` and (with ``convert``) ``int8``, each with
            ``acc1``, ``weights_file_bytes`` and ``cpu_latency_ms_batch<B>``, and a ``note`` for
            sub-8-bit schemes.
        """
        test = CPUBatches(datamodule, "test", self.eval_batches)
        fake = detached_copy(student)
        float_model = float_copy(student)
        int8 = None
        if self.convert:
            calibration = CPUBatches(datamodule, "train", self.calibration_batches)
            int8 = convert_int8(float_model, (x for x, _ in calibration), self.backend)
        images, _ = next(iter(test))
        result = {
            "scheme": self.scheme,
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "edge_weight_bits": self.edge_weight_bits or self.weight_bits,
            "threads": torch.get_num_threads(),
            "fake_quant": {
                "acc1": evaluate(fake, test),
                "packed_size_bytes": packed_size_bytes(student),
            },
            **float_and_int8_report(
                float_model,
                int8,
                test,
                tuple(images.shape[1:]),
                evaluate=evaluate,
                batch_sizes=self.latency_batch_sizes,
                runs=self.latency_runs,
            ),
        }
        if not self.convert:
            result["note"] = (
                f"{self.scheme}: no int8 model built (no int4 CPU kernels in PyTorch); "
                "fake_quant gives the accuracy and the packed size the quantized student has"
            )
        return result
