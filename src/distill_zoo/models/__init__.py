"""Models: the CIFAR zoo of the distillation benchmarks, and a torchvision adapter.

Every model's ``forward`` returns logits only; features are read with forward hooks on named
submodules (each zoo config lists its stage names as ``feature_layers``).
Dense tasks: segmentation (logits ``(B, K, H, W)``), detection (torchvision's detection API) and
regression (an MLP for tabular data; image regressors are the classification models).
"""

from distill_zoo.models.detection import detection_model
from distill_zoo.models.registry import ZOO_NAMES, create_model
from distill_zoo.models.regression import MLP
from distill_zoo.models.segmentation import segmentation_model
from distill_zoo.models.torchvision_adapter import torchvision_model

__all__ = ["ZOO_NAMES", "create_model", "torchvision_model"]
__all__ += ["MLP", "detection_model", "segmentation_model"]
