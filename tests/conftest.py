"""Shared fixtures: tiny configs that run the real training path in seconds on a CPU."""

import os

# Tiny models gain nothing from a second OpenMP thread, and two threads spinning beside any
# other busy process slow every step several-fold; CLI tests' subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import lightning as L
import pytest
import torch

from distill_zoo.config import compose

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory) -> Path:
    """One teacher store per test session, so each tiny teacher is trained once."""
    return tmp_path_factory.mktemp("teachers")


TINY = [
    "data=synthetic",
    "student=resnet8",
    "teacher=resnet14",
    "trainer=cpu",
    "logger=csv",
    "callbacks=none",
]
"""Overrides of a few-second run: resnet14 teaches resnet8 on 16x16 synthetic images."""


@pytest.fixture
def tiny_config(teacher_store):
    """Composes the real config tree for a few-second run on synthetic data."""

    def make(*overrides: str):
        return compose(
            [
                *TINY,
                "epochs=2",
                "report_compression=false",  # tests/test_compression.py covers it
                f"teacher_store={teacher_store}",
                *overrides,
            ]
        )

    return make


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, teacher_store):
    """One finished 1-epoch KD run, ``(run dir, metrics)``, for tests that read a run."""
    from distill_zoo import train

    cfg = compose([*TINY, "epochs=1", f"teacher_store={teacher_store}"])
    run_dir = tmp_path_factory.mktemp("finished_run")
    return run_dir, train.run(cfg, run_dir)


class Interrupt(L.Callback):
    """Stops a run at the start of an epoch, as a killed job would.

    Args:
        at_epoch: The epoch at whose start the run stops.
        folder: Only stop runs whose output folder ends with this name (a pipeline stage).
    """

    def __init__(self, at_epoch: int, folder: str | None = None) -> None:
        self.at_epoch = at_epoch
        self.folder = folder

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.folder and Path(trainer.default_root_dir).name != self.folder:
            return
        if trainer.current_epoch == self.at_epoch:
            raise RuntimeError("simulated interruption")


@pytest.fixture
def interrupt():
    """The :class:`Interrupt` callback class."""
    return Interrupt
