"""A network's prediction for one real test image, softened at several temperatures.

The picture behind Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network"
(NIPS 2014 Deep Learning Workshop, https://arxiv.org/abs/1503.02531): ``softmax(z / T)`` of a
trained teacher is nearly one-hot at ``T = 1``; raising ``T`` reveals how the teacher ranks
the wrong classes (the "dark knowledge" a student learns from), until at large ``T`` every
class looks alike. ``python -m distill_zoo.report --softmax <checkpoint or run folder>``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from distill_zoo import teachers
from distill_zoo.build import build_model
from distill_zoo.results.runs import (
    CLASSIFICATION,
    PLOTS,
    evaluation_data,
    load_config,
    task_of_config,
)

log = logging.getLogger(__name__)

TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0)


def softened(logits: Tensor, temperatures: Sequence[float]) -> Tensor:
    """``softmax(logits / T)`` for each ``T``: ``[len(temperatures), num_classes]``.

    Args:
        logits: One sample's logits, ``[num_classes]``.
        temperatures: Positive temperatures.
    """
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
    scaled = logits.detach().float()[None, :] / torch.tensor(temperatures)[:, None]
    return scaled.softmax(dim=1)


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """The weights file and the run folder (the one holding ``config.yaml``) of ``path``.

    The network is the run's student (``cfg.student``): for a teacher, give the run that
    trained it, its checkpoint, or its cached ``teacher.pt`` (a distillation run's teacher
    is its ``teacher.ckpt``, or ``<teacher_store>/<arch>-<hash>/`` when trained on demand).

    ``path`` may be a run folder (its cached ``teacher.pt``, else the checkpoint best on
    validation, else ``last.ckpt``), a Lightning checkpoint in ``<run>/checkpoints/``, or a
    cached teacher ``<teacher_store>/<arch>-<hash>/teacher.pt``.

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no checkpoint, or no ``config.yaml``
            says what network it is.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        run = path
        candidates = [
            run / teachers.TEACHER_FILE,
            *sorted((run / "checkpoints").glob("best-*.ckpt"))[::-1],
            run / "checkpoints" / "last.ckpt",
        ]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{run} holds no {teachers.TEACHER_FILE} and no checkpoints/*.ckpt: pass a run "
                "folder that finished an epoch, or the checkpoint file itself"
            )
        checkpoint = found[0]
    elif path.is_file():
        checkpoint = path
        run = next(
            (p for p in (path.parent, path.parent.parent) if (p / "config.yaml").is_file()), None
        )
        if run is None:
            raise FileNotFoundError(
                f"no config.yaml next to {path} or one folder up, so its architecture and data "
                "are unknown: pass a checkpoint of a distill_zoo run (<run>/checkpoints/*.ckpt) "
                "or a cached teacher (<teacher_store>/<arch>-<hash>/teacher.pt)"
            )
    else:
        raise FileNotFoundError(f"{path} does not exist: pass a checkpoint or a run folder")
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{run} has no config.yaml: pass the folder of a distill_zoo run (or a teacher "
            "store entry <teacher_store>/<arch>-<hash>/)"
        )
    return checkpoint, run


def pick_test_image(datamodule, index: int) -> tuple[Tensor, int]:
    """Test image ``index`` (as the network sees it: transformed, normalised) and its label."""
    dataset = getattr(datamodule, "test_set", None)
    if dataset is not None:
        if not 0 <= index < len(dataset):
            raise IndexError(f"--index {index} is outside the test set (0..{len(dataset) - 1})")
        image, target = dataset[index][:2]
        return torch.as_tensor(image), int(target)
    seen = 0
    for batch in datamodule.test_dataloader():
        images, targets = batch[0], batch[1]
        if index < seen + len(images):
            return images[index - seen], int(targets[index - seen])
        seen += len(images)
    raise IndexError(f"--index {index} is outside the test set (0..{seen - 1})")


def displayable(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` -> ``[H, W]`` (one channel) or ``[H, W, 3]``, rescaled to [0, 1]."""
    image = image.detach().float()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    if image.shape[0] == 1:
        return image[0].numpy()
    return image[:3].permute(1, 2, 0).numpy()


def shown_classes(probabilities: Tensor, target: int, top_k: int) -> list[int]:
    """All classes in order when there are at most ``top_k``; else the ``top_k`` most
    probable, most probable first, with the true class ``target`` in place of the last."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if len(probabilities) <= top_k:
        return list(range(len(probabilities)))
    classes = probabilities.argsort(descending=True)[:top_k].tolist()
    if target not in classes:
        classes[-1] = target
    return classes


def check_classification(cfg: DictConfig, run: Path) -> None:
    """Fails naming the task when the run did not train a classifier: softened class
    probabilities of one image are what a classifier's logits give; a segmenter has one
    distribution per pixel, a detector one per box and a regressor none."""
    task = task_of_config(cfg)
    if task != CLASSIFICATION:
        raise ValueError(
            f"{run} is a task={task} run, and the softened-prediction plot draws one image's "
            "class probabilities softmax(z / T): it serves task=classification runs only "
            "(for other tasks, python -m distill_zoo.report <folder> draws the task's metric)"
        )


def load_network(
    checkpoint: Path, cfg: DictConfig, num_classes: int, in_channels: int
) -> nn.Module:
    """The run's student network (``cfg.student``) with the weights of ``checkpoint``."""
    model = build_model(cfg.student, num_classes, in_channels)
    return teachers.load_weights(model, checkpoint).eval()


def softmax_figure_for(
    path: str | Path,
    out: str | Path | None = None,
    index: int = 0,
    temperatures: Sequence[float] = TEMPERATURES,
    top_k: int = 10,
) -> Path:
    """Draws the network of ``path`` on test image ``index`` of its run's data.

    Args:
        path: A checkpoint or run folder (see :func:`find_checkpoint`).
        out: Folder of the figure (default: the run folder); it goes to ``<out>/plots/``.
        index: Position of the image in the test set.
        temperatures: The temperatures drawn.
        top_k: Classes drawn at most: all of them up to ``top_k``, else the ``top_k`` most
            probable at ``T = 1`` (a CIFAR-100 picture of 500 bars says nothing).

    Returns:
        The PNG written, ``softmax_T_test<index>.png``.

    Raises:
        ValueError: The run is not a classification run (see :func:`check_classification`).
    """
    from distill_zoo.results import plots

    checkpoint, run = find_checkpoint(path)
    cfg = load_config(run)
    check_classification(cfg, run)
    datamodule = evaluation_data(cfg)
    image, target = pick_test_image(datamodule, index)
    model = load_network(checkpoint, cfg, datamodule.num_classes, datamodule.in_channels)
    with torch.no_grad():
        logits = model(image[None].float())[0]
    probabilities = softened(logits, temperatures)
    names = list(getattr(datamodule, "class_names", None) or range(datamodule.num_classes))
    classes = shown_classes(probabilities[0], target, top_k)
    note = "class"
    if len(classes) < len(names):
        note = f"the {top_k} classes most probable at T = {temperatures[0]:g} (of {len(names)})"
    predicted = int(logits.argmax())
    arch = cfg.student.get("name", type(model).__name__)
    title = (
        f"{arch} on test image {index}: predicts {names[predicted]}, "
        f"true {names[target]} ({checkpoint.name})"
    )
    folder = Path(out) if out is not None else run
    return plots.softmax_figure(
        probabilities[:, classes].numpy(),
        temperatures,
        [str(names[c]) for c in classes],
        folder / PLOTS / f"softmax_T_test{index}.png",
        image=displayable(image),
        true_class=classes.index(target) if target in classes else None,
        title=title,
        note=note,
        num_classes=len(names),
    )
