"""DDP on CPU with gloo and 2 processes: CRD's memory banks agree across ranks (and with one
process fed the same global batches), every distiller config trains under Lightning's DDP, the
command line launches its second process into the same run folder, and SyncBatchNorm is a
switch. Workers are module-level functions so that ``torch.multiprocessing.spawn`` can pickle
them; each one creates its process group with a short timeout, so a broken collective fails
within a minute instead of hanging."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import CLASSIFICATION_DISTILLERS
from torch import nn

from distill_zoo.distillers.base import DistillContext, StepOutputs
from distill_zoo.distillers.crd import CRD
from distill_zoo.engine.collectives import all_gather_rows, all_reduce_mean, is_distributed
from distill_zoo.models import create_model

WORLD = 2
DISTILLERS = CLASSIFICATION_DISTILLERS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args) -> None:
    """Runs ``worker(rank, port, *args)`` in 2 fresh processes; a failure in either fails
    the test (``mp.spawn`` re-raises it and stops the other process)."""
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


def join_group(rank: int, port: int, backend: str = "gloo") -> None:
    """The environment torchrun gives each process, then a process group. Lightning sees
    ``LOCAL_RANK`` (processes created externally) and the existing group, and joins both."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))


# ---------------------------------------------------------------- CRD's banks across ranks

N_TRAIN, NEGATIVES = 24, 5
# Global batches of 8 (rank 0 takes the first half, rank 1 the second); the last step is
# uneven (3 + 2) and sample 5 appears on both ranks, as a padded distributed shard has it.
GLOBAL_BATCHES = [
    [0, 3, 6, 9, 12, 15, 18, 21],
    [1, 4, 7, 10, 13, 16, 19, 22],
    [2, 5, 8, 11, 14, 17, 20, 23],
    [23, 5, 11, 5, 17],
]


def shard(batch: list[int], rank: int) -> list[int]:
    half = 3 if len(batch) % 2 else len(batch) // 2
    return batch[:half] if rank == 0 else batch[half:]


class FixedNegatives(nn.Module):
    """Negatives decided by the anchor alone (``anchor + 1, ..., anchor + K`` modulo N), so
    one process fed the global batch draws exactly what the ranks draw for their shards."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(NEGATIVES + 1)
        return (indices.unsqueeze(1) + offsets) % N_TRAIN


def make_crd() -> CRD:
    torch.manual_seed(0)
    context = DistillContext(
        student_stages=["layer1", "layer2", "layer3"],
        teacher_stages=["layer1", "layer2", "layer3"],
        example_input=torch.zeros(2, 3, 8, 8),
        num_classes=3,
        num_train_samples=N_TRAIN,
        train_targets=torch.arange(N_TRAIN) % 3,
    )
    student, teacher = create_model("resnet8", 3), create_model("resnet8", 3)
    crd = CRD(student, teacher, context=context, num_negatives=NEGATIVES, embed_dim=16)
    crd.sampler = FixedNegatives()
    return crd


def global_step(step: int) -> StepOutputs:
    """The features of one global batch (same on every process), fabricated: CRD only reads
    the pooled 64-d features of both networks and the logits."""
    g = torch.Generator().manual_seed(100 + step)
    indices = torch.tensor(GLOBAL_BATCHES[step])
    b = len(indices)
    return StepOutputs(
        images=torch.zeros(b, 3, 8, 8),
        targets=indices % 3,
        indices=indices,
        student_logits=torch.randn(b, 3, generator=g),
        teacher_logits=torch.randn(b, 3, generator=g),
        student_features={"avgpool": torch.randn(b, 64, 1, 1, generator=g)},
        teacher_features={"avgpool": torch.randn(b, 64, 1, 1, generator=g)},
    )


def rows_of(out: StepOutputs, keep: list[int]) -> StepOutputs:
    take = torch.tensor(keep)
    return StepOutputs(
        images=out.images[take],
        targets=out.targets[take],
        indices=out.indices[take],
        student_logits=out.student_logits[take],
        teacher_logits=out.teacher_logits[take],
        student_features={k: v[take] for k, v in out.student_features.items()},
        teacher_features={k: v[take] for k, v in out.teacher_features.items()},
    )


def train_crd(rank: int | None) -> dict[str, torch.Tensor]:
    """Steps of SGD on CRD's embeddings over GLOBAL_BATCHES: one rank's shards with gradients
    averaged across ranks (what DDP does), or, for ``rank=None``, one process fed each global
    batch whole. Returns the state after the steps."""
    crd = make_crd()
    optimizer = torch.optim.SGD(crd.parameters(), lr=0.5)
    for step in range(len(GLOBAL_BATCHES)):
        out = global_step(step)
        if rank is not None:
            batch = GLOBAL_BATCHES[step]
            mine = shard(batch, rank)
            start = 0 if rank == 0 else len(batch) - len(mine)
            out = rows_of(out, list(range(start, start + len(mine))))
        optimizer.zero_grad()
        crd(out)["crd"].backward()
        if rank is not None:
            for p in crd.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        optimizer.step()
    return {k: v.clone() for k, v in crd.state_dict().items()}


def direct_update(rank: int | None) -> dict[str, torch.Tensor]:
    """``update_memory`` with the last, uneven global batch (duplicate sample included)."""
    crd = make_crd()
    batch = GLOBAL_BATCHES[-1]
    g = torch.Generator().manual_seed(7)
    v_s = F.normalize(torch.randn(len(batch), 16, generator=g), dim=1)
    v_t = F.normalize(torch.randn(len(batch), 16, generator=g), dim=1)
    indices = torch.tensor(batch)
    if rank is not None:
        half = len(shard(batch, 0))
        part = slice(0, half) if rank == 0 else slice(half, None)
        indices, v_s, v_t = indices[part], v_s[part], v_t[part]
    crd.update_memory(indices, v_s.bfloat16(), v_t.bfloat16())  # banks stay fp32
    return {"memory_student": crd.memory_student, "memory_teacher": crd.memory_teacher}


def _crd_worker(rank: int, port: int, out: Path) -> None:
    join_group(rank, port)
    try:
        # The collectives alone: unequal batches (3 rows and 1 row).
        rows = 3 if rank == 0 else 1
        gathered = all_gather_rows(
            torch.arange(rows) + 10 * rank, torch.full((rows, 2), rank + 1.0)
        )
        mean = all_reduce_mean(torch.tensor([float(rank), 4.0 * rank]), weight=rows)
        result = {
            "distributed": is_distributed(),
            "gathered": gathered,
            "mean": mean,
            "trained": train_crd(rank),
            "direct": direct_update(rank),
        }
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def crd_ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 gloo processes computed (one spawn serves the tests below)."""
    out = tmp_path_factory.mktemp("crd_ddp")
    spawn(_crd_worker, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_gather_and_mean_across_unequal_batches(crd_ranks):
    for result in crd_ranks:
        assert result["distributed"]
        indices, values = result["gathered"]
        assert indices.tolist() == [0, 1, 2, 10]  # rank order, padding trimmed
        assert values.tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]]
        # Weighted by batch size: (3 * [0, 0] + 1 * [1, 4]) / 4.
        assert result["mean"].tolist() == [0.25, 1.0]
    # One process: the inputs, detached.
    x = torch.ones(2, 3, requires_grad=True)
    (same,) = all_gather_rows(x)
    assert not is_distributed() and torch.equal(same, x) and not same.requires_grad
    assert torch.equal(all_reduce_mean(x, weight=3), x)
    with pytest.raises(ValueError, match="same number of rows"):
        all_gather_rows(torch.zeros(2), torch.zeros(3))


def test_crd_banks_identical_across_ranks_and_equal_to_one_process(crd_ranks):
    for part in ("trained", "direct"):
        for key, value in crd_ranks[0][part].items():
            assert torch.equal(value, crd_ranks[1][part][key]), (part, key)  # bit-identical
    # One process fed the global batch (rank 0's rows, then rank 1's): the same update,
    # exactly; embeddings came in bf16, the banks stay fp32.
    reference = direct_update(None)
    for key, value in reference.items():
        assert value.dtype == torch.float32
        assert torch.equal(crd_ranks[0]["direct"][key], value), key
    # Trained: the same up to the order of float sums (gradients averaged across ranks).
    trained, single, fresh = crd_ranks[0]["trained"], train_crd(None), make_crd()
    for key in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
        torch.testing.assert_close(trained[key], single[key], rtol=1e-5, atol=1e-6)
    # Every sample was in one rank's batch or the other's: every row moved, on both ranks.
    for bank in ("memory_student", "memory_teacher"):
        assert ((trained[bank] - getattr(fresh, bank)).abs().sum(1) > 0).all()
    assert bool(trained["z_ready"]) and trained["z_student"] > 0 and trained["z_teacher"] > 0


def test_duplicate_samples_move_once_towards_their_last_embedding():
    crd = make_crd()
    before = crd.memory_student.clone()
    v = F.normalize(torch.randn(3, 16), dim=1)
    crd.update_memory(torch.tensor([4, 9, 4]), v, v)
    expected = F.normalize(0.5 * before[4] + 0.5 * v[2], dim=0)  # once, the last embedding
    torch.testing.assert_close(crd.memory_student[4], expected)
    torch.testing.assert_close(
        crd.memory_student[9], F.normalize(0.5 * before[9] + 0.5 * v[1], dim=0)
    )


def test_banks_stay_fp32_under_whole_model_casts():
    crd = make_crd()
    before = crd.memory_student.clone()
    crd.to(torch.bfloat16)
    assert crd.embed_student.weight.dtype == torch.bfloat16
    for name in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
        assert getattr(crd, name).dtype == torch.float32, name
    assert torch.equal(crd.memory_student, before)  # not rounded through bf16
    crd.half()
    assert crd.memory_teacher.dtype == torch.float32
    assert "memory_student" in dict(crd.named_buffers())


# ---------------------------------------------------------------- Lightning DDP, every config

# Tiny runs: 2 training batches per rank, one validation and one test batch. The data's own
# loaders (on-device by default) shard by rank; the command-line test below uses DataLoaders.
TINY = [
    "data=synthetic",
    "data.num_samples=128",
    "data.num_test_samples=32",
    "data.batch_size=16",
    "student=resnet8",
    "teacher=resnet14",
    "epochs=1",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    f"trainer.devices={WORLD}",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "logger=none",
    "callbacks=none",
]
SMALL = {"crd": ["distiller.num_negatives=16"], "crd_kd": ["distiller.num_negatives=16"]}


def write_teacher(folder: Path) -> Path:
    """A random resnet14 for the synthetic data (4 classes, 3 channels): a valid teacher.ckpt."""
    torch.manual_seed(0)
    path = folder / "teacher.pt"
    torch.save(create_model("resnet14", num_classes=4, in_channels=3).state_dict(), path)
    return path


# Runs that train part of the model only (an initialisation stage; the distiller's connectors
# after distill_epochs) leave parameters without gradients: train.ddp_strategy switches DDP
# to look for them by itself, without the user saying so.
RUNS = {
    **{name: [f"distiller={name}", *SMALL.get(name, [])] for name in DISTILLERS},
    "fitnets_hint_only": ["distiller=fitnets", "distiller.hint_only=true"],
    "fitnets_distill_epochs": ["distiller=fitnets", "epochs=2", "distill_epochs=1"],
    "kd_teacher_cache": [
        "distiller=kd",
        "speed.teacher_cache=true",
        "data.augment_rounds=1",
        "trainer.limit_train_batches=1.0",  # every sample once
        "data.num_samples=120",  # 108 training samples: equal shards, no padded repeats
    ],
}
PRUNED = {
    # Every process prunes its own copy before DDP exists: Taylor importance (gradients of the
    # first batches) must still give one structure, which DDP's buckets need.
    "kd_pruned_taylor": [
        "distiller=kd",
        "student=resnet14",
        "init_from={teacher}",
        "prune=structured",
        "prune.importance=taylor",
        "prune.ratio=0.5",
    ],
}
SYNC_BN = ["distiller=fitnets", "trainer.sync_batchnorm=true"]  # its regressor has a BN too
CPU_REFUSES_SYNC_BN = r"(?i)sync_?batch_?norm.*gpu"  # PyTorch's SyncBatchNorm: no CPU kernel


def recorder():
    """A Lightning callback that keeps, per rank, what the tests compare: the samples each
    rank trained on in each epoch, the final loss, the student's and distiller's state, and
    the kinds of BatchNorm layers during the fit (with sync_batchnorm Lightning converts them
    at setup and back at teardown) with the layers the student's taps still record."""
    import lightning as L  # here, so that the CRD workers need not import Lightning

    class Record(L.Callback):
        def __init__(self) -> None:
            self.state: dict = {"seen": []}

        def on_train_start(self, trainer, module) -> None:
            for part in ("student", "distiller"):
                self.state[f"{part}_bn"] = sorted(
                    {type(m).__name__ for m in getattr(module, part).modules() if _is_bn(m)}
                )
            was_training = module.training
            module.eval()
            with torch.no_grad():
                module.student(torch.zeros(2, 3, 16, 16, device=module.device))
            self.state["tapped"] = sorted(module.student_tap.pop())
            module.train(was_training)

        def on_train_epoch_start(self, trainer, module) -> None:
            self.state["seen"].append([])

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.state["seen"][-1] += batch[2].tolist()

        def on_train_end(self, trainer, module) -> None:
            self.state.update(
                world_size=trainer.world_size,
                loss=float(trainer.callback_metrics["train/loss"]),
                student={k: v.clone() for k, v in module.student.state_dict().items()},
                distiller={k: v.clone() for k, v in module.distiller.state_dict().items()},
            )
            if module.teacher_cache is not None:
                self.state["cache_keys"] = module.teacher_cache.keys.clone()

    return Record()


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _lightning_worker(rank: int, port: int, out: Path, teacher: Path) -> None:
    join_group(rank, port)
    from distill_zoo import train
    from distill_zoo.config import compose

    base = [*TINY, f"teacher.ckpt={teacher}"]
    runs = {**RUNS, **(PRUNED if importlib.util.find_spec("torch_pruning") else {})}
    for name, overrides in runs.items():
        overrides = [o.replace("{teacher}", str(teacher)) for o in overrides]
        record = recorder()
        train.run(compose([*base, *overrides]), out / name, [record])
        torch.save(record.state, out / name / f"rank{rank}.pt")
    with pytest.raises(ValueError, match=CPU_REFUSES_SYNC_BN) as refused:
        train.run(compose([*base, *SYNC_BN]), out / "sync_bn", [recorder()])
    (out / "sync_bn" / f"rank{rank}.txt").write_text(str(refused.value))


@pytest.fixture(scope="module")
def lightning_ranks(tmp_path_factory) -> Path:
    """Folder of tiny ``train.run`` fits by 2 processes under Lightning's DDP (one spawn):
    ``<run>/rank<r>.pt`` per run of ``RUNS``, and ``sync_bn/``."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    spawn(_lightning_worker, out, write_teacher(out))
    return out


def load_ranks(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def check_in_sync(folder: Path) -> None:
    a, b = load_ranks(folder)
    assert a["world_size"] == b["world_size"] == WORLD
    assert math.isfinite(a["loss"]) and math.isfinite(b["loss"])
    for mine, other in zip(a["seen"], b["seen"], strict=True):  # epochs
        assert mine and not set(mine) & set(other)  # each rank trains on its own shard
    for part in ("student", "distiller"):  # DDP kept parameters (and buffers) in sync
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    assert len(list(folder.glob("metrics.json"))) == 1  # written by rank 0 only


@pytest.mark.parametrize("name", DISTILLERS)
def test_every_distiller_trains_under_lightning_ddp(lightning_ranks, name):
    check_in_sync(lightning_ranks / name)


@pytest.mark.parametrize("name", ["fitnets_hint_only", "fitnets_distill_epochs"])
def test_partial_training_finds_unused_parameters_by_itself(lightning_ranks, name):
    check_in_sync(lightning_ranks / name)


def test_a_pruned_student_is_pruned_alike_on_every_rank(lightning_ranks):
    pytest.importorskip("torch_pruning")
    check_in_sync(lightning_ranks / "kd_pruned_taylor")
    a, _ = load_ranks(lightning_ranks / "kd_pruned_taylor")
    unpruned = create_model("resnet14", num_classes=4, in_channels=3)
    assert sum(v.numel() for v in a["student"].values()) < sum(
        v.numel() for v in unpruned.state_dict().values()
    )


def test_teacher_cache_holds_every_ranks_samples_on_every_rank(lightning_ranks):
    check_in_sync(lightning_ranks / "kd_teacher_cache")
    a, b = load_ranks(lightning_ranks / "kd_teacher_cache")
    assert torch.equal(a["cache_keys"], b["cache_keys"])
    assert (a["cache_keys"] >= 0).all()  # one epoch filled it with both ranks' shards


def test_sync_batchnorm_is_a_switch(lightning_ranks):
    # Off by default: plain BatchNorm during the fit.
    for state in load_ranks(lightning_ranks / "fitnets"):
        assert state["student_bn"] == state["distiller_bn"] == ["BatchNorm2d"]
    # On: Lightning converts the layers for DDP; PyTorch's SyncBatchNorm has no CPU kernel, so
    # a CPU run fails before training with a message naming SyncBatchNorm and the GPU.
    for rank in range(WORLD):
        message = (lightning_ranks / "sync_bn" / f"rank{rank}.txt").read_text()
        assert re.search(CPU_REFUSES_SYNC_BN, message), message


def test_taps_survive_the_sync_batchnorm_conversion():
    """Lightning converts every BatchNorm of the LightningModule into a new SyncBatchNorm
    module; forward hooks sit on stages, never on those layers, so the features still come.
    (With one process, SyncBatchNorm computes plain batch statistics: it trains on CPU.)"""
    from distill_zoo.distillers.fitnets import FitNets
    from distill_zoo.distillers.taps import FeatureTap

    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 4), create_model("resnet14", 4)
    context = DistillContext(
        student_stages=["layer1", "layer2", "layer3"],
        teacher_stages=["layer1", "layer2", "layer3"],
        example_input=torch.zeros(2, 3, 16, 16),
        num_classes=4,
    )
    distiller = FitNets(student, teacher, context=context)
    model = nn.ModuleDict({"student": student, "distiller": distiller})
    tap = FeatureTap(student, distiller.layers()[0])
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = {type(m).__name__ for m in model.modules() if _is_bn(m)}
    assert kinds == {"SyncBatchNorm"}
    logits = model["student"](torch.randn(4, 3, 16, 16))
    assert set(tap.pop()) == set(distiller.layers()[0])
    logits.sum().backward()


def _gpu_worker(rank: int, port: int, out: Path, teacher: Path) -> None:
    torch.cuda.set_device(rank)
    join_group(rank, port, backend="nccl")
    from distill_zoo import train
    from distill_zoo.config import compose

    gpu = [o for o in TINY if not o.startswith("trainer.accelerator")] + [
        "trainer.accelerator=gpu"
    ]
    record = recorder()
    train.run(compose([*gpu, f"teacher.ckpt={teacher}", *SYNC_BN]), out / "sync_bn", [record])
    torch.save(record.state, out / "sync_bn" / f"rank{rank}.pt")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 CUDA devices")
def test_sync_batchnorm_trains_on_two_gpus(tmp_path):
    spawn(_gpu_worker, tmp_path, write_teacher(tmp_path))
    for state in load_ranks(tmp_path / "sync_bn"):
        assert state["student_bn"] == state["distiller_bn"] == ["SyncBatchNorm"]
        assert state["tapped"] == ["layer2"]
    check_in_sync(tmp_path / "sync_bn")


# ---------------------------------------------------------------- the command line

CLI = [
    "trainer=ddp",
    f"trainer.devices={WORLD}",
    "trainer.accelerator=cpu",
    "data=synthetic",
    "data.on_device=false",  # DataLoaders: Lightning gives them a DistributedSampler
    "data.num_samples=128",
    "data.num_test_samples=32",
    "data.batch_size=16",
    "student=resnet8",
    "teacher=resnet14",
    "epochs=1",
    "logger=csv",
    "callbacks=none",
]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill_zoo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def the_one_run(cwd: Path) -> Path:
    """The single run folder below ``cwd/outputs``, with the one ``metrics.json``."""
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # rank 1 wrote into rank 0's folder, not a folder of its own
    assert list((cwd / "outputs").rglob("metrics.json")) == [runs[0] / "metrics.json"]
    return runs[0]


def test_command_line_launches_rank_1_into_the_same_run_folder(tmp_path):
    """Lightning starts rank 1 by re-running the command with ``hydra.run.dir`` set to rank
    0's folder (and a log file of its own there)."""
    result = cli(*CLI, f"teacher.ckpt={write_teacher(tmp_path)}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = the_one_run(tmp_path)
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran, in this folder
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list(run.rglob("metrics.csv"))) == 1
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_command_line_trains_a_missing_teacher_once_under_ddp(tmp_path):
    """With no ``teacher.ckpt`` the teacher is trained on demand, by both processes together
    (rank 1 reaches the same point of the same command), and cached once."""
    result = cli(*CLI, f"teacher_store={tmp_path / 'store'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    the_one_run(tmp_path)
    assert len(list((tmp_path / "store").glob("*/teacher.pt"))) == 1
    assert not list((tmp_path / "store").rglob("*.tmp"))
