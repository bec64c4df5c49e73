"""Factor transfer (FT): a paraphraser of the teacher, a translator on the student."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_zoo.distillers.base import (
    ALL_TASKS,
    DistillContext,
    Distiller,
    StepOutputs,
    select_layers,
)
from distill_zoo.distillers.layers import LayerChoice, as_choice, probe_maps
from distill_zoo.distillers.taps import check_layers
from distill_zoo.losses import ft_loss
from distill_zoo.losses.common import check_formulation

log = logging.getLogger(__name__)

FT_MODES = ("transfer", "paraphraser")


def _conv_stack(channels: list[int], transposed: bool = False) -> nn.Sequential:
    """3x3 (transposed) convs between ``channels``, each followed by LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=False):
        layers += [conv(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Convolutional autoencoder of a teacher feature map (Kim et al., Sec. 3.1): three 3x3
    convs encode ``C`` channels to ``round(C * rate)`` "factors", three 3x3 transposed convs
    decode them back; trained on reconstruction before the transfer."""

    def __init__(self, channels: int, rate: float) -> None:
        super().__init__()
        factors = max(1, round(channels * rate))
        self.encoder = _conv_stack([channels, channels, factors, factors])
        self.decoder = _conv_stack([factors, factors, channels, channels], transposed=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(factor, reconstruction)``."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class FT(Distiller):
    """Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer"
    (NeurIPS 2018), https://arxiv.org/abs/1802.04977. A paraphraser (an autoencoder of the
    teacher's last-stage features) extracts "teacher factors"; a translator on the student
    learns to produce the same factors.

    Two stages, as in the paper: ``mode="paraphraser"`` trains the paraphraser alone on
    reconstruction (``rec = MSE(P(x), x)``, the only term; the student is untouched);
    ``mode="transfer"`` freezes it and trains the student and translator with
    ``loss = ce_weight * CE + kd_weight * KD + weight * ft_loss`` (see
    :func:`~distill_zoo.losses.ft_loss`). ``python -m distill_zoo pipeline=ft_2stage`` runs
    both and carries the paraphraser over; a transfer run whose paraphraser never trained
    says so in the log.

    Defaults follow the CIFAR-100 benchmark of Tian et al. (CRD, ICLR 2020): the last stage
    of each network, paraphrase rate 0.5, ``weight=200``, ``ce_weight=1``, no KD,
    ``formulation="repdistiller"``; ``formulation="paper"`` compares whole normalised factors
    (Eq. 2).

    Args:
        mode: ``"transfer"`` or ``"paraphraser"``.
        weight: Weight ``b`` of the factor-transfer term.
        rate: Paraphrase rate ``k``: factor channels per teacher channel.
        formulation: ``"repdistiller"`` or ``"paper"``.
        student_layers: The student layer translated: a stage index, ``"last"`` or a name.
        teacher_layers: The teacher layer paraphrased, in the same forms.
        ce_weight: Weight of the hard-label cross-entropy.
        kd_weight: Weight of an added Hinton KD term (0: none).
        kd_temperature: Temperature of that KD term.
    """

    tasks = ALL_TASKS

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        mode: str = "transfer",
        weight: float = 200.0,
        rate: float = 0.5,
        formulation: str = "repdistiller",
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
        if mode not in FT_MODES:
            raise ValueError(f"FT mode must be one of {FT_MODES}, got {mode!r}")
        check_formulation(formulation)
        if not 0 < rate <= 4:
            raise ValueError(f"the paraphrase rate must lie in (0, 4], got {rate}")
        if self.context.example_input is None:
            raise ValueError("FT needs context.example_input to build its paraphraser")
        self.mode = mode
        self.weight = weight
        self.formulation = formulation
        self.student_layers = self._one(student_layers, self.context.student_stages, "student")
        self.teacher_layers = self._one(teacher_layers, self.context.teacher_stages, "teacher")
        check_layers(student, self.student_layers, role="student")
        check_layers(teacher, self.teacher_layers, role="teacher")
        s_shape = probe_maps(student, self.student_layers, self.context, "FT")
        t_shape = probe_maps(teacher, self.teacher_layers, self.context, "FT")
        s_channels = s_shape[self.student_layers[0]][1]
        t_channels = t_shape[self.teacher_layers[0]][1]
        self.paraphraser = Paraphraser(t_channels, rate)
        factors = self.paraphraser.encoder[-2].out_channels
        self.translator = _conv_stack([s_channels, s_channels, factors, factors])
        # Steps the paraphraser has trained for: saved with checkpoints and carried into the
        # transfer stage, so a transfer with an untrained paraphraser can be told apart.
        self.register_buffer("paraphraser_steps", torch.zeros((), dtype=torch.long))
        if mode == "transfer":
            self.paraphraser.requires_grad_(False)
        self._warned = False

    @staticmethod
    def _one(choice: LayerChoice, stages: list[str], role: str) -> list[str]:
        names = select_layers(stages, as_choice(choice), "last")
        if len(names) != 1:
            raise ValueError(f"FT uses one {role} layer, but {names} were chosen")
        return names

    def trains_only_part(self) -> bool:
        return self.mode == "paraphraser"

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        teacher = out.teacher_features[self.teacher_layers[0]]
        if self.mode == "paraphraser":
            if self.training:
                self.paraphraser_steps += 1
            _, reconstruction = self.paraphraser(teacher)
            return {"rec": F.mse_loss(reconstruction.float(), teacher.float())}
        if not self._warned:
            self._warned = True  # checked once: .item() would sync the GPU on every step
            if self.paraphraser_steps.item() == 0:
                log.warning(
                    "FT transfers through a paraphraser that was never trained: run the "
                    "paraphraser stage first (python -m distill_zoo pipeline=ft_2stage)"
                )
        with torch.no_grad():
            teacher_factor, _ = self.paraphraser(teacher)
        student_factor = self.translator(out.student_features[self.student_layers[0]])
        loss = ft_loss(student_factor, teacher_factor, formulation=self.formulation)
        return {**self.logit_terms(out), "ft": self.weight * loss}
