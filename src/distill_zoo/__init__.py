"""distill_zoo: knowledge distillation on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
