"""DDP on CPU (gloo, 2 processes) for every task: each rank trains on its own shard, the
ranks stay in sync, and the test metrics (mIoU, mAP, MAE, perplexity) are gathered over both
processes: they equal one process's evaluation of the same checkpoint on the whole test set.
Language models run GKD: its on-policy steps and the teacher's top-k cache under DDP."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_ddp import WORLD, join_group, spawn
from test_task_training import TASKS

from distill_zoo.build import build_model, build_run
from distill_zoo.config import compose

RUNS = {
    # The methods that change how a step runs: SKD's critic has its own optimizer (manual
    # optimization, two backward passes per step), Chen et al.'s teacher runs after the student.
    "segmentation": ["distiller=skd"],
    "detection": ["distiller=det_kd"],
    "regression": ["distiller=kd"],
    # GKD: on-policy steps drawn alike on both ranks, and the teacher's top-k cache gathered
    # from both ranks at every step.
    "language_modeling": ["distiller=gkd", "distiller.topk=4", "epochs=2"],
}
OVERRIDES = {
    **TASKS,
    "language_modeling": [
        "task=language_modeling",
        "student.width=32",
        "student.heads=2",
        "teacher=lm_gpt2_2x128",
        "teacher.width=64",
        "teacher.heads=2",
        "data.block_size=32",
        "data.batch_size=16",
        "+trainer.limit_train_batches=6",
        "+trainer.limit_val_batches=2",
    ],
}
BASE = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    f"trainer.devices={WORLD}",
    "logger=csv",
    "callbacks=none",
    "epochs=1",
]
BASE += ["report_compression=false"]


def config(task: str, teacher: Path):
    return compose([*OVERRIDES[task], *BASE, *RUNS[task], f"teacher.ckpt={teacher}"])


def write_teachers(folder: Path) -> dict[str, Path]:
    """A randomly initialised teacher of each task's default architecture."""
    paths = {}
    for task in RUNS:
        cfg = compose(OVERRIDES[task])
        data = {
            "segmentation": (11, 3),
            "detection": (11, 3),
            "regression": (5, 3),
            "language_modeling": (256, 0),
        }[task]
        torch.manual_seed(0)
        paths[task] = folder / f"{task}_teacher.pt"
        torch.save(build_model(cfg.teacher, *data).state_dict(), paths[task])
    return paths


class Record(L.Callback):
    """Per rank: the samples trained on, the student's weights, the test metrics."""

    def __init__(self) -> None:
        self.state: dict = {"seen": []}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:  # one epoch's shards are disjoint
            self.state["seen"] += batch[2].tolist()
        if hasattr(module.distiller, "_on_policy_now"):  # drawn before the step counts itself
            on_policy = module.distiller._on_policy_now()
            self.state.setdefault("on_policy", []).append(on_policy)
            if not on_policy:
                self.state.setdefault("cached", []).extend(batch[2].tolist())

    def on_train_end(self, trainer, module) -> None:
        self.state["world_size"] = trainer.world_size
        self.state["student"] = {k: v.clone() for k, v in module.student.state_dict().items()}
        self.state["distiller"] = {k: v.clone() for k, v in module.distiller.state_dict().items()}
        cache = getattr(module.distiller, "cache", None)
        if cache is not None:  # not in the state dict: compared here
            self.state["cache"] = {k: b.clone() for k, b in cache.named_buffers()}

    def on_test_end(self, trainer, module) -> None:
        self.state["test"] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _worker(rank: int, port: int, out: Path, teachers: dict[str, Path]) -> None:
    join_group(rank, port)
    from distill_zoo import train

    for task in RUNS:
        record = Record()
        train.run(config(task, teachers[task]), out / task, [record])
        torch.save(record.state, out / task / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("ddp_tasks")
    teachers = write_teachers(out)
    spawn(_worker, out, teachers)
    return out, teachers


def single_process_test(task: str, teacher: Path, checkpoint: Path) -> dict[str, float]:
    cfg = config(task, teacher)
    cfg.trainer = {"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1}
    datamodule, module = build_run(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    return trainer.test(module, datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False)[0]


@pytest.mark.parametrize("task", list(RUNS))
def test_each_task_trains_under_ddp_with_metrics_over_all_processes(ddp_runs, task) -> None:
    out, teachers = ddp_runs
    ranks = [torch.load(out / task / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["world_size"] for r in ranks] == [WORLD, WORLD]
    assert ranks[0]["seen"] and not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    for part in ("student", "distiller"):  # SKD's critic and det_kd's adaptations too
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), key
    metric = {
        "segmentation": "test/miou",
        "detection": "test/map",
        "regression": "test/mae",
        "language_modeling": "test/perplexity",
    }
    name = metric[task]
    assert ranks[0]["test"][name] == pytest.approx(ranks[1]["test"][name], abs=1e-6)
    # The last test of each rank is on the best checkpoint.
    best = next((out / task / "checkpoints").glob("best-*.ckpt"))
    alone = single_process_test(task, teachers[task], best)
    assert ranks[0]["test"][name] == pytest.approx(alone[name], abs=1e-5)
    if task == "language_modeling":
        # GKD drew the same on-policy steps on both ranks (some of each kind), and every rank
        # cached the teacher's top-k of every sequence any rank met on an off-policy step.
        assert ranks[0]["on_policy"] == ranks[1]["on_policy"]
        assert 0 < sum(ranks[0]["on_policy"]) < len(ranks[0]["on_policy"])
        for key, value in ranks[0]["cache"].items():
            assert torch.equal(value, ranks[1]["cache"][key]), key
        met = set(ranks[0]["cached"]) | set(ranks[1]["cached"])
        assert int(ranks[0]["cache"]["filled"].sum()) == len(met)
