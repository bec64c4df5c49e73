"""The teacher store's lock: processes that need the same on-demand teacher at once train it
once (the first), while the others wait and then load it; a dead holder blocks nobody; the
other ranks of a DDP run never wait on their own rank 0."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

from distill_zoo import train
from distill_zoo.engine import launch
from distill_zoo.models import create_model
from distill_zoo.teachers import store

WAITING = "Waiting for another process that trains teacher"


def random_teacher(path: Path) -> Path:
    """A random resnet14's weights for the synthetic data, written where ``path`` says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(create_model("resnet14", num_classes=4, in_channels=3).state_dict(), path)
    return path


def held_elsewhere(path: Path) -> bool:
    """Whether another open file (another process, or another lock of this one) holds
    ``path``'s flock."""
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_lock_file_sits_beside_the_entry(tiny_config, tmp_path):
    entry = store.entry(tiny_config(f"teacher_store={tmp_path}"))
    assert store.lock_file(entry) == tmp_path / f".{entry.run_dir.name}.lock"
    with store.lock(entry):
        assert held_elsewhere(store.lock_file(entry))
        assert not entry.run_dir.exists()  # the lock does not create the run folder
    assert not held_elsewhere(store.lock_file(entry))


def test_a_killed_holder_releases_the_lock(tmp_path):
    entry = store.StoreEntry(None, tmp_path / "resnet14-abc", tmp_path / "resnet14-abc" / "t.pt")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from distill_zoo.teachers import store\n"
            f"entry = store.StoreEntry(None, Path({str(entry.run_dir)!r}), None)\n"
            "with store.lock(entry):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert held_elsewhere(store.lock_file(entry))
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
        holder.wait()
    assert not held_elsewhere(store.lock_file(entry))


def ensure_in_thread(cfg) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["file"] = train.ensure_teacher(cfg)
        except BaseException as err:  # reported by the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_a_waiting_process_loads_the_teacher_trained_meanwhile(
    tiny_config, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    cfg = tiny_config(f"teacher_store={tmp_path}")
    entry = store.entry(cfg)

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained a teacher another process had trained meanwhile")

    monkeypatch.setattr(train, "run", must_not_train)
    with store.lock(entry):  # another process is training it
        thread, result = ensure_in_thread(cfg)
        wait_for(lambda: WAITING in caplog.text)
        assert thread.is_alive()
        random_teacher(entry.file)  # ... and hands it to the store
    thread.join(30)
    assert not thread.is_alive() and "error" not in result, result
    assert result["file"] == entry.file
    assert "trained meanwhile by another process" in caplog.text


def test_other_ranks_of_a_ddp_run_never_wait_on_the_lock(tiny_config, tmp_path, monkeypatch):
    """Rank 0 holds the lock while the run's ranks train the teacher together: rank 1 must
    train along rather than wait for a lock its rank 0 releases only after that training."""
    cfg = tiny_config(f"teacher_store={tmp_path}")
    entry = store.entry(cfg)

    def trains(run_cfg, run_dir):
        return {"best_checkpoint": str(random_teacher(Path(run_dir) / "best.ckpt"))}

    monkeypatch.setattr(train, "run", trains)
    monkeypatch.setattr(launch, "leads_its_job", lambda: False)
    with store.lock(entry):  # held by rank 0
        thread, result = ensure_in_thread(cfg)
        thread.join(30)
        assert not thread.is_alive(), "rank 1 waited on its own rank 0's lock"
    assert result.get("file") == entry.file, result


@pytest.mark.slow
def test_two_processes_at_once_train_the_teacher_once(tmp_path):
    """Two runs started together that need the same on-demand teacher (a fresh store): one
    trains it, the other waits or finds it cached; both students finish."""
    env = {**os.environ, "DISTILL_ZOO_TEACHERS": str(tmp_path / "store"), "HYDRA_FULL_ERROR": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "distill_zoo", *TINY, "epochs=1", f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (0, 1)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]
    logs = "\n".join(outputs)
    assert logs.count("training teacher") == 1, logs[-5000:]
    (trained,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    assert (trained / "teacher.pt").is_file()
    assert len(list(trained.glob("checkpoints/best-*.ckpt"))) == 1  # one training run
    assert len(list((tmp_path / "outputs").glob("*/*/metrics.json"))) == 2
    for metrics in (tmp_path / "outputs").glob("*/*/metrics.json"):
        assert json.loads(metrics.read_text())["teacher_test_acc1"] is not None
