"""Adversarial losses: Wasserstein GAN with gradient penalty (WGAN-GP).

Gulrajani et al., "Improved Training of Wasserstein GANs" (NeurIPS 2017),
https://arxiv.org/abs/1704.00028, as the holistic term of structured KD uses it (Liu et al.,
"Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019,
https://arxiv.org/abs/1903.04197): a critic scores teacher ("real") and student ("fake")
outputs, and the student learns to raise its score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from distill_zoo.losses.common import fp32


@fp32
def wgan_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """The WGAN critic's loss ``E[D(fake)] - E[D(real)]``, which the critic minimises
    (Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017,
    https://arxiv.org/abs/1704.00028, Algorithm 1, without the gradient penalty: add
    ``lambda *`` :func:`gradient_penalty`).

    Args:
        real_scores: Critic scores of real (teacher) samples, any shape.
        fake_scores: Critic scores of fake (student) samples, any shape.
    """
    return fake_scores.float().mean() - real_scores.float().mean()


@fp32
def wgan_generator_loss(fake_scores: Tensor) -> Tensor:
    """The WGAN generator's loss ``-E[D(fake)]`` (Gulrajani et al., "Improved Training of
    Wasserstein GANs", NeurIPS 2017, https://arxiv.org/abs/1704.00028, Algorithm 1).

    Args:
        fake_scores: Critic scores of fake (student) samples, any shape.
    """
    return -fake_scores.float().mean()


def _per_sample(epsilon: Tensor, like: Tensor) -> Tensor:
    """``epsilon`` (one value per sample) as ``[B, 1, ..., 1]`` in ``like``'s dtype/device."""
    if epsilon.numel() != like.shape[0]:
        raise ValueError(
            f"gradient_penalty needs one epsilon per sample: {epsilon.numel()} values for a "
            f"batch of {like.shape[0]}"
        )
    shape = (like.shape[0],) + (1,) * (like.dim() - 1)
    return epsilon.detach().reshape(shape).to(device=like.device, dtype=like.dtype)


def gradient_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    epsilon: Tensor | None = None,
) -> Tensor:
    """The two-sided gradient penalty of WGAN-GP (Gulrajani et al., "Improved Training of
    Wasserstein GANs", NeurIPS 2017, https://arxiv.org/abs/1704.00028, Eq. 3):

    ``E_{x_hat}[(||grad_{x_hat} D(x_hat)||_2 - 1)^2]``, ``x_hat = eps*real + (1-eps)*fake``,

    with one ``eps ~ U[0, 1]`` per sample and the norm over all non-batch dimensions. Real
    and fake are detached; the graph of the gradient is kept (``create_graph=True``), so the
    penalty back-propagates into the critic's parameters. The weight ``lambda`` (10 in the
    paper) is the caller's. Computed in the inputs' dtype (no fp32 upcast: the critic is
    the caller's module).

    Args:
        critic: Maps a ``[B, ...]`` batch to its scores (any shape; they are summed).
        real: ``[B, ...]`` real (teacher) samples.
        fake: ``[B, ...]`` fake (student) samples, same shape.
        epsilon: Optional interpolation weights, one per sample (``[B]`` or ``[B, 1, ...]``);
            drawn from ``U[0, 1]`` when ``None``.
    """
    if real.shape != fake.shape or real.dim() < 1:
        raise ValueError(
            f"gradient_penalty needs real and fake batches of one shape, got "
            f"{tuple(real.shape)} and {tuple(fake.shape)}"
        )
    real, fake = real.detach(), fake.detach()
    if epsilon is None:
        epsilon = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    eps = _per_sample(epsilon, real)
    with torch.enable_grad():
        x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
        (grads,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
        norms = grads.flatten(1).norm(dim=1)
        return (norms - 1).pow(2).mean()
