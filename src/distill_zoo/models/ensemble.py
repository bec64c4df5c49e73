"""Several trained networks acting as one teacher (Hinton et al., NIPS-W 2014, Sec. 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TeacherEnsemble(nn.Module):
    """Averages its members' softened predictions, so one student learns from all of them.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (NIPS-W 2014),
    https://arxiv.org/abs/1503.02531, distil an ensemble by matching the arithmetic mean of
    the members' softened distributions. The forward pass returns logits whose softmax at
    ``temperature`` is exactly that mean::

        out = T * log(mean_i softmax(z_i / T))   =>   softmax(out / T) = mean_i softmax(z_i / T)

    so every logit-based method (KD, DKD, DIST, ...) that softens the teacher's logits at the
    same ``T`` sees the ensemble's averaged soft targets without knowing it is an ensemble;
    set ``temperature`` to the method's. The prediction (``argmax``) is that of the averaged
    distribution. Members are ``members.0``, ``members.1``, ... for feature taps.

    Args:
        members: Trained networks with the same number of classes.
        temperature: The softmax temperature at which predictions are averaged.
    """

    def __init__(self, members: list[nn.Module], temperature: float = 1.0) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        if temperature <= 0:
            raise ValueError(f"the ensemble temperature must be > 0, got {temperature}")
        self.members = nn.ModuleList(members)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.stack([member(x).float() for member in self.members])
        t = self.temperature
        mean_log_probs = torch.logsumexp(torch.log_softmax(logits / t, dim=-1), dim=0)
        return t * (mean_log_probs - math.log(len(self.members)))
