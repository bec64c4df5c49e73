"""Distillation methods: one file per method, each a :class:`Distiller`."""

from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.kd import KD
from distill_zoo.distillers.vanilla import CrossEntropyOnly

__all__ = ["KD", "CrossEntropyOnly", "DistillContext", "Distiller", "StepOutputs"]
