"""Tasks: what a prediction is, per kind of problem (see :mod:`distill_zoo.tasks.base`)."""

from distill_zoo.tasks.base import TASKS, Monitor, StepOutputs, Task
from distill_zoo.tasks.classification import ClassificationTask
from distill_zoo.tasks.detection import DetectionTask
from distill_zoo.tasks.language_modeling import LanguageModelingTask
from distill_zoo.tasks.regression import RegressionTask
from distill_zoo.tasks.segmentation import SegmentationTask

__all__ = [
    "TASKS",
    "ClassificationTask",
    "DetectionTask",
    "LanguageModelingTask",
    "Monitor",
    "RegressionTask",
    "SegmentationTask",
    "StepOutputs",
    "Task",
]
