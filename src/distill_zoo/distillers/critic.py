"""The critic of structured KD's holistic term: scores (image, class-probability map) pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProbabilityMapCritic(nn.Module):
    """A small Wasserstein critic of segmentation maps conditioned on their image (Liu et
    al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019, Sec. 3.2:
    the holistic term; Gulrajani et al., NeurIPS 2017, for the WGAN-GP critic).

    Input: the image and a class-probability map of the same size, stacked along channels;
    output: one unbounded score per sample. ``depth`` strided 4x4 convs (width doubling from
    ``width``) with LeakyReLU, global average pooling, a linear score. No normalisation
    layers: the gradient penalty is taken per sample, which batch statistics would couple
    (Gulrajani et al., Sec. 4). The authors' critic is a larger self-attention GAN
    discriminator with spectral norm; a few convs suffice for small canvases.

    Args:
        image_channels: Channels of the images.
        num_classes: Channels of the probability maps.
        width: Channels of the first conv.
        depth: Number of strided convs.
    """

    def __init__(self, image_channels: int, num_classes: int, width: int = 32, depth: int = 3):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"the critic needs depth >= 1 and width >= 1, got {depth}, {width}")
        layers: list[nn.Module] = []
        channels = image_channels + num_classes
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(channels, 1)

    def forward(self, pairs: Tensor) -> Tensor:
        return self.score(self.features(pairs).mean(dim=(2, 3))).squeeze(1)


def image_map_pairs(images: Tensor, logits: Tensor) -> Tensor:
    """The critic's input: images (resized to the map's size when they differ) stacked with
    ``softmax(logits)`` over classes."""
    if images.shape[-2:] != logits.shape[-2:]:
        images = F.interpolate(images, size=logits.shape[-2:], mode="bilinear")
    return torch.cat([images.to(logits.dtype), logits.softmax(dim=1)], dim=1)
