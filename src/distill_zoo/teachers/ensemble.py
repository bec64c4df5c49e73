"""Several trained networks acting as one teacher (Hinton et al., NIPS-W 2014, Sec. 1)."""

from __future__ import annotations

import itertools
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


class TeacherRoute(nn.Module):
    """Checkpoints along a teacher's training route, used one after another (RCO).

    Jin et al., "Knowledge Distillation via Route Constrained Optimization" (ICCV 2019),
    https://arxiv.org/abs/1904.09149: the student learns from the teacher's intermediate
    states in training order (easy to hard) rather than from its final state only. Anchor
    ``i`` teaches from student epoch ``start_epochs[i]`` until the next anchor starts; the
    module calls :meth:`set_epoch` at the start of every epoch.

    Args:
        anchors: The teacher at each anchor checkpoint, in route order.
        start_epochs: First student epoch of each anchor (increasing, the first 0).
    """

    def __init__(self, anchors: list[nn.Module], start_epochs: list[int]) -> None:
        super().__init__()
        if len(anchors) != len(start_epochs) or not anchors:
            raise ValueError(
                f"a route needs one start epoch per anchor: {len(anchors)} anchors, "
                f"start epochs {list(start_epochs)}"
            )
        if start_epochs[0] != 0 or any(b <= a for a, b in itertools.pairwise(start_epochs)):
            raise ValueError(
                f"route start epochs must begin at 0 and increase, got {list(start_epochs)}"
            )
        self.members = nn.ModuleList(anchors)
        self.start_epochs = list(start_epochs)
        self.active = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the anchor that teaches at student epoch ``epoch``."""
        self.active = max(i for i, start in enumerate(self.start_epochs) if start <= epoch)

    def forward(self, x: Tensor) -> Tensor:
        return self.members[self.active](x)
