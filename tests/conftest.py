"""Shared fixtures: tiny configs that run the real training path in seconds on a CPU."""

from pathlib import Path

import pytest

from distill_zoo.config import compose

REPO = Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory) -> Path:
    """One teacher store per test session, so each tiny teacher is trained once."""
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture
def tiny_config(teacher_store):
    """Composes the real config tree for a few-second run on synthetic data."""

    def make(*overrides: str):
        return compose(
            [
                "data=synthetic",
                "student=resnet8",
                "teacher=resnet14",
                "epochs=2",
                "trainer=cpu",
                "logger=csv",
                "callbacks=none",
                f"teacher_store={teacher_store}",
                *overrides,
            ]
        )

    return make
