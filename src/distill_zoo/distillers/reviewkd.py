"""Knowledge review (ReviewKD): multi-level student features fused deep-to-shallow."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs, probe_shapes
from distill_zoo.distillers.layers import (
    LayerChoice,
    pair_stages,
    penultimate_layer,
    preactivation,
)
from distill_zoo.losses import HCL_LEVELS, hcl_loss

MAX_MID_CHANNELS = 512
"""Cap of the default fusion width (the authors' ``min(512, C_last)``)."""


class ABF(nn.Module):
    """Attention-based fusion: one level of ReviewKD's residual review path.

    ``x = BN(conv1x1(feature))`` brings the student feature to ``mid_channels``; when
    ``fuse``, the residual from the deeper level is resized (nearest) to ``x``'s grid and
    the two are mixed by a learned two-channel spatial attention,
    ``[a, r] = sigmoid(conv1x1([x, residual]))``, ``x = a * x + r * residual``. ``x`` is then
    resized (nearest) to the teacher's grid ``out_size`` and becomes the residual passed to
    the next shallower level; the output is ``BN(conv3x3(x))`` with the teacher's width.

    Args:
        in_channels: Width of the student feature.
        mid_channels: Width of the fused (residual) features.
        out_channels: Width of the teacher feature this level is compared with.
        fuse: Whether a deeper level feeds a residual in (all but the deepest level).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
            if fuse
            else None
        )
        # The authors' initialisation of the two convs (kaiming uniform with a=1).
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(output, residual)``: the teacher-shaped output and the fused
        ``mid_channels`` map at ``out_size`` for the next shallower level."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("this ABF fuses a deeper level, so it needs its residual")
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _as_map(x: Tensor) -> Tensor:
    """A feature as ``[B, C, H, W]``: a pooled ``[B, C]`` vector becomes ``[B, C, 1, 1]``."""
    return x.reshape(x.shape[0], -1, 1, 1) if x.dim() != 4 else x


def _map_shape(name: str, shape: tuple[int, ...], role: str) -> tuple[int, int, int]:
    if len(shape) == 4:
        return shape[1], shape[2], shape[3]
    if len(shape) == 2:
        return shape[1], 1, 1
    raise ValueError(
        f"ReviewKD needs [B, C, H, W] maps (or a pooled [B, C] vector), but {role} layer "
        f"'{name}' gives {tuple(shape)}: choose convolutional stages"
    )


class ReviewKD(Distiller):
    """Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021),
    https://arxiv.org/abs/2104.09044. Each teacher level is taught by the student's features
    of the same and all deeper levels: a residual path fuses the student's features from the
    deepest to the shallowest with attention-based fusion (:class:`ABF`), and every fused
    output is compared with the teacher's feature at its level by the hierarchical context
    loss (:func:`~distill_zoo.losses.hcl_loss`: MSE at full resolution and after pooling to
    4x4, 2x2, 1x1, weighted 1, 1/2, 1/4, 1/8).

    ``loss = ce_weight * CE + kd_weight * KD + weight * warmup * HCL`` with the linear warm-up
    ``warmup = min(1, (epoch + 1) / warmup_epochs)`` (epochs counted from 0).

    Layers, as in the authors' CIFAR code (and mdistiller): every stage of ``feature_layers``
    plus the pooled penultimate embedding (the classifier's input, compared as a ``1 x 1``
    map); the student's stages read after their final ReLU, the teacher's before it
    (:func:`~distill_zoo.distillers.layers.preactivation`; the teacher's embedding is its
    ordinary pooled output). With different stage counts the last ``k`` of each are paired.
    All shapes come from one dry forward pass, so any pair works: where resolutions differ,
    each fused map is resized (nearest) to the teacher's grid before its 3x3 conv, as the
    authors do for ShuffleNet/MobileNet students.

    Defaults (the authors' CIFAR-100 script and mdistiller): ``weight=5`` (their value for
    most pairs, e.g. resnet32x4 -> resnet8x4; they use 8 for ShuffleNetV2, 0.6 for
    resnet56 -> resnet20, 1 for resnet110 -> resnet32), ``warmup_epochs=20`` (mdistiller's
    epoch count; the authors' own script, counting from 0, gives each epoch the weight of the
    one before; ``conf/distiller/reviewkd.yaml`` sets 0 so short runs see the term at once),
    ``ce_weight=1``, no KD, fusion width ``min(512, C)`` of the student's deepest feature,
    pyramid levels ``(4, 2, 1)``. The penultimate level, the teacher's pre-activations and the
    HCL level weights come from the authors' code; the first two are switchable here
    (``include_penultimate``, ``teacher_preact``, ``student_preact``).

    Args:
        weight: Weight of the HCL term after warm-up.
        warmup_epochs: Epochs of linear warm-up of ``weight`` (0: none).
        mid_channels: Width of the fused features; ``None`` for ``min(512, C)`` of the
            student's deepest layer.
        levels: Pooled sizes of the HCL pyramid.
        include_penultimate: Add the classifier's input as the deepest level.
        teacher_preact: Read the teacher's stages before their final ReLU.
        student_preact: Read the student's stages before their final ReLU.
        student_layers: Student stages: ``"all"``, stage indices, layer names; ``None``
            for all stages.
        teacher_layers: Teacher stages, in the same forms.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of an added Hinton KD term (0: none).
        kd_temperature: Temperature of that KD term.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 5.0,
        warmup_epochs: float = 20.0,
        mid_channels: int | None = None,
        levels: Sequence[int] = HCL_LEVELS,
        include_penultimate: bool = True,
        teacher_preact: bool = True,
        student_preact: bool = False,
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
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if mid_channels is not None and mid_channels <= 0:
            raise ValueError(
                f"mid_channels must be > 0 (or null for the default), got {mid_channels}"
            )
        self.levels = tuple(int(level) for level in levels)
        if any(level <= 0 for level in self.levels):
            raise ValueError(f"the HCL levels must be positive sizes, got {self.levels}")
        if self.context.example_input is None:
            raise ValueError("ReviewKD needs context.example_input to build its fusion modules")
        self.weight = weight
        self.warmup_epochs = warmup_epochs
        example = self.context.example_input
        stages_s, stages_t = pair_stages(
            student, teacher, self.context, student_layers, teacher_layers, method="ReviewKD"
        )
        if student_preact:
            stages_s = [preactivation(student, name, example) for name in stages_s]
        if teacher_preact:
            stages_t = [preactivation(teacher, name, example) for name in stages_t]
        if include_penultimate:
            stages_s.append(penultimate_layer(student, example, "student"))
            stages_t.append(penultimate_layer(teacher, example, "teacher"))
        self.student_layers, self.teacher_layers = stages_s, stages_t
        s_probe = probe_shapes(student, stages_s, example)
        t_probe = probe_shapes(teacher, stages_t, example)
        s_shapes = [_map_shape(n, s_probe[n], "student") for n in stages_s]
        t_shapes = [_map_shape(n, t_probe[n], "teacher") for n in stages_t]
        mid = mid_channels or min(MAX_MID_CHANNELS, s_shapes[-1][0])
        self.out_sizes = [shape[1:] for shape in t_shapes]
        last = len(s_shapes) - 1
        # abfs[i] belongs to level i (shallow to deep); the deepest has no residual input.
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i < last)
            for i, (s, t) in enumerate(zip(s_shapes, t_shapes, strict=True))
        )

    def warmup_factor(self, epoch: int) -> float:
        """``min(1, (epoch + 1) / warmup_epochs)`` for the 0-based ``epoch`` (1 without
        warm-up): mdistiller's ``min(1, e / warmup)`` with its epochs counted from 1."""
        return 1.0 if self.warmup_epochs == 0 else min(1.0, (epoch + 1) / self.warmup_epochs)

    def review(self, student_features: list[Tensor]) -> list[Tensor]:
        """The fused, teacher-shaped outputs of all levels, shallow to deep, computed from
        the deepest level up."""
        outputs: list[Tensor] = []
        residual = None
        for i in reversed(range(len(self.abfs))):
            output, residual = self.abfs[i](
                _as_map(student_features[i]), residual, self.out_sizes[i]
            )
            outputs.insert(0, output)
        return outputs

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        fused = self.review([out.student_features[name] for name in self.student_layers])
        teacher = [_as_map(out.teacher_features[name]) for name in self.teacher_layers]
        loss = hcl_loss(fused, teacher, levels=self.levels)
        factor = self.warmup_factor(out.epoch)
        return {**self.logit_terms(out), "reviewkd": self.weight * factor * loss}
