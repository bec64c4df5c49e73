"""Distillation methods: one file per method, each a :class:`Distiller`."""

from distill_zoo.distillers.attentive_hints import AttentiveHints
from distill_zoo.distillers.attentive_imitation import AttentiveImitation
from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.distillers.kd import KD
from distill_zoo.distillers.vanilla import CrossEntropyOnly

__all__ = [
    "KD",
    "AttentiveHints",
    "AttentiveImitation",
    "CrossEntropyOnly",
    "DistillContext",
    "Distiller",
    "StepOutputs",
]
