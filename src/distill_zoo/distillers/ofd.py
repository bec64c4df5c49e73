"""OFD: a comprehensive overhaul of feature distillation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.connectors import ConvConnector
from distill_zoo.distillers.layers import LayerChoice, leaf_calls, pair_stages, probe_maps
from distill_zoo.distillers.taps import INPUT_SUFFIX, check_layers, module_name
from distill_zoo.losses import ofd_loss, ofd_margin


def preactivation_and_bn(
    model: nn.Module, name: str, calls: list[tuple[str, nn.Module]]
) -> tuple[str, str | None]:
    """Where OFD reads layer ``name`` before its ReLU, and the BatchNorm whose statistics
    describe that tensor.

    Returns ``(tap, bn)``, ``bn`` being ``None`` when no BatchNorm is found. For a stage
    (a module whose leaves ``calls`` lists), by its last leaf call:

    - an ``nn.ReLU`` (CIFAR/torchvision ResNet blocks, VGG blocks, ShuffleNetV1): the ReLU's
      input (``layer3.2.relu2:input``, as
      :func:`~distill_zoo.distillers.layers.preactivation` finds it) and the last
      ``BatchNorm2d`` called inside the stage before it (``bn2``). In a residual block that
      tensor is ``bn2(...) + shortcut``, not ``bn2``'s output alone; the official code uses
      ``bn2``'s statistics all the same, and so do we.
    - a ``BatchNorm2d`` (MobileNetV2's linear bottleneck): the stage output and that BN.
    - otherwise, if the next two leaf calls after the stage are a ``BatchNorm2d`` and an
      ``nn.ReLU`` (pre-activation WRN groups, whose output is the next block's ``bn1`` input):
      that BN's output, as the official code does for its WideResNets
      (``get_bn_before_relu`` returns the next group's ``bn1``, the last one the final ``bn``).
    - otherwise the stage output and no BN.

    Explicit names: ``<relu>:input`` gives that tap and the last ``BatchNorm2d`` called
    before it; a ``BatchNorm2d`` gives its output and itself.

    Raises:
        ValueError: ``name`` is not a submodule, or never runs in the forward pass.
    """
    check_layers(model, [name])
    base = module_name(name)
    names = [n for n, _ in calls]

    def last_bn(before: list[int]) -> str | None:
        for i in reversed(before):
            if isinstance(calls[i][1], nn.BatchNorm2d):
                return calls[i][0]
        return None

    if name.endswith(INPUT_SUFFIX):
        if base not in names:
            raise ValueError(f"layer '{base}' is never called in the forward pass")
        at = len(names) - 1 - names[::-1].index(base)
        return name, last_bn(list(range(at)))
    if isinstance(model.get_submodule(name), nn.BatchNorm2d):
        return name, name
    inside = [i for i, n in enumerate(names) if n == name or n.startswith(f"{name}.")]
    if not inside:
        raise ValueError(f"no module of layer '{name}' is called in the forward pass")
    last_name, last = calls[inside[-1]]
    if isinstance(last, nn.ReLU):
        return f"{last_name}{INPUT_SUFFIX}", last_bn(inside[:-1])
    if isinstance(last, nn.BatchNorm2d):
        return name, last_name
    after = calls[inside[-1] + 1 : inside[-1] + 3]
    if (
        len(after) == 2
        and isinstance(after[0][1], nn.BatchNorm2d)
        and isinstance(after[1][1], nn.ReLU)
    ):
        return after[0][0], after[0][0]
    return name, None


def bn_margin(bn: nn.BatchNorm2d) -> Tensor:
    """The margin of :func:`~distill_zoo.losses.ofd_margin` from a BatchNorm's affine
    parameters (weight 1 and bias 0 for a BatchNorm without them)."""
    weight = bn.weight if bn.weight is not None else torch.ones(bn.num_features)
    return ofd_margin(weight, bn.bias)


class OFD(Distiller):
    """Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019),
    https://arxiv.org/abs/1904.01866. The student's pre-ReLU features, through a connector,
    match the teacher's pre-ReLU features clipped from below by a per-channel margin, with
    a partial L2 distance that ignores a student below a negative teacher response.

    ``loss = ce_weight * CE + kd_weight * KD + weight * ofd_loss`` (see
    :func:`~distill_zoo.losses.ofd_loss`): per pair
    ``1/B * sum (s - max(t, m))^2 * [(s > max(t, m)) or (t > 0)]``, each earlier pair at half
    the weight of the next. Positions and margins (:func:`preactivation_and_bn`): each stage
    is read before its final ReLU, on both sides; the margin ``m_c = E[x | x < 0]`` of the
    teacher channel comes, in closed form (:func:`~distill_zoo.losses.ofd_margin`), from the
    affine parameters of the teacher BatchNorm feeding that ReLU, computed once here from the
    (trained, frozen) teacher and kept in buffers (``margin0``, ``margin1``, ...). Each
    student map passes a connector (1x1 conv + BN to the teacher's channels, resized to the
    teacher's resolution, :class:`ConvConnector`), initialised as in the official code
    (conv ``N(0, 2 / (k^2 * out_channels))``, BN weight 1, bias 0).

    Defaults follow the official CIFAR-100 code (clovaai/overhaul-distillation,
    ``train_with_distillation.py``: ``CE + loss_distill.sum() / batch_size / 1000``; mdistiller
    uses the same ``CE_WEIGHT=1``, ``FEAT_WEIGHT=0.001``): ``ce_weight=1``, ``weight=1e-3``,
    no KD, all stages (with different stage counts the last ``k`` of each). Approximations:
    for a residual block the margin uses the statistics of its last BN although the tensor
    is ``BN + shortcut`` (as in the official code); where the connector resizes (the
    official CIFAR code assumes equal resolutions, mdistiller pools the teacher instead) the
    student is brought to the teacher's grid.

    Args:
        weight: Weight ``b`` of the OFD term (the official ``1/1000``).
        student_layers: Student stages: ``"all"``, stage indices, layer names, or explicit
            taps (``layer3.2.relu2:input``); ``None`` for all stages.
        teacher_layers: Teacher stages, in the same forms (or a ``BatchNorm2d`` name, whose
            output is read); each must be fed by a ``BatchNorm2d``.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of an added Hinton KD term (0: none).
        kd_temperature: Temperature of that KD term.

    Raises:
        ValueError: no example input, a teacher layer without a BatchNorm before its ReLU
            (e.g. a ShuffleNetV2 stage, which ends in a channel shuffle), or a BN whose
            channels differ from the tapped tensor's.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 1e-3,
        student_layers: LayerChoice = None,
        teacher_layers: LayerChoice = None,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            kd_temperature=kd_temperature,
        )
        if self.context.example_input is None:
            raise ValueError("OFD needs context.example_input to find its layers and margins")
        self.weight = weight
        stages_s, stages_t = pair_stages(
            student, teacher, self.context, student_layers, teacher_layers, method="OFD"
        )
        example = self.context.example_input
        s_calls, t_calls = leaf_calls(student, example), leaf_calls(teacher, example)
        self.student_layers = [preactivation_and_bn(student, n, s_calls)[0] for n in stages_s]
        teacher_positions = [preactivation_and_bn(teacher, n, t_calls) for n in stages_t]
        self.teacher_layers = [tap for tap, _ in teacher_positions]
        s_shapes = probe_maps(student, self.student_layers, self.context, "OFD")
        t_shapes = probe_maps(teacher, self.teacher_layers, self.context, "OFD")
        for i, (stage, (tap, bn_name)) in enumerate(zip(stages_t, teacher_positions, strict=True)):
            channels = t_shapes[tap][1]
            if bn_name is None:
                raise ValueError(
                    f"OFD needs the BatchNorm2d feeding the teacher's pre-activation at "
                    f"'{stage}' (read as '{tap}') to compute its margin, but none precedes "
                    "it: set teacher_layers to a BatchNorm2d layer or to '<relu>:input' of a "
                    "ReLU fed by a BatchNorm2d"
                )
            bn = teacher.get_submodule(bn_name)
            if bn.num_features != channels:
                raise ValueError(
                    f"OFD: the teacher BatchNorm '{bn_name}' has {bn.num_features} channels "
                    f"but the pre-activation '{tap}' has {channels}: set teacher_layers to "
                    "a tap fed directly by a BatchNorm2d"
                )
            self.register_buffer(f"margin{i}", bn_margin(bn).detach().clone().float())
        self.connectors = nn.ModuleList(
            ConvConnector(s_shapes[s][1], t_shapes[t][1], t_shapes[t][2:])
            for s, t in zip(self.student_layers, self.teacher_layers, strict=True)
        )
        for connector in self.connectors:
            nn.init.kaiming_normal_(connector.conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.ones_(connector.bn.weight)
            nn.init.zeros_(connector.bn.bias)

    def margins(self) -> list[Tensor]:
        """The per-channel margins of the teacher layers, in pair order."""
        return [getattr(self, f"margin{i}") for i in range(len(self.teacher_layers))]

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        student = [
            connect(out.student_features[name])
            for name, connect in zip(self.student_layers, self.connectors, strict=True)
        ]
        teacher = [out.teacher_features[name] for name in self.teacher_layers]
        loss = ofd_loss(student, teacher, self.margins())
        return {**self.logit_terms(out), "ofd": self.weight * loss}
