"""Models: the CIFAR zoo of the distillation benchmarks, and a torchvision adapter.

Every model's ``forward`` returns logits only; features are read with forward hooks on named
submodules (each zoo config lists its stage names as ``feature_layers``).
"""

from distill_zoo.models.registry import ZOO_NAMES, create_model
from distill_zoo.models.torchvision_adapter import torchvision_model

__all__ = ["ZOO_NAMES", "create_model", "torchvision_model"]
