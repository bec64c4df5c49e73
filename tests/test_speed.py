"""Fast paths (conf/speed/): each switch changes how a step runs, never what it computes."""

import json
import logging

import pytest
import torch
from helpers import CLASSIFICATION_DISTILLERS, conv_net
from torch import nn

from distill_zoo.config import compose
from distill_zoo.distillers import KD, DistillContext
from distill_zoo.distillers.fitnets import FitNets
from distill_zoo.engine import speed
from distill_zoo.module import DistillationModule
from distill_zoo.teachers.cache import TeacherOutputCache
from distill_zoo.train import run

DISTILLERS = CLASSIFICATION_DISTILLERS


class CountingTeacher(nn.Module):
    """A frozen network that counts how many images it has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net(16)
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += x.shape[0]
        return self.net(x)


def module_with(teacher, distiller_cls=KD, **speed) -> DistillationModule:
    torch.manual_seed(0)
    student = conv_net(8)
    context = DistillContext(num_classes=4, example_input=torch.zeros(2, 3, 8, 8))
    return DistillationModule(
        student,
        teacher,
        distiller_cls(student, teacher, context=context),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        scheduler=None,
        num_classes=4,
        **speed,
    )


def batch(indices, keys, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = len(indices)
    return (
        torch.randn(n, 3, 8, 8, generator=generator),
        torch.randint(0, 4, (n,), generator=generator),
        torch.as_tensor(indices),
        torch.as_tensor(keys),
    )


def test_cache_serves_only_the_same_sample_under_the_same_augmentation():
    cache = TeacherOutputCache(num_samples=5, rounds=2, num_classes=3)
    logits = torch.arange(6.0).view(2, 3)
    found, _ = cache.lookup(torch.tensor([0, 1]), torch.tensor([7, 8]))
    assert found.tolist() == [False, False]
    cache.store(torch.tensor([0, 1]), torch.tensor([7, 8]), logits, round_=0)
    found, cached = cache.lookup(torch.tensor([1, 0]), torch.tensor([8, 7]))
    assert found.all() and torch.equal(cached, logits.flip(0))
    found, _ = cache.lookup(torch.tensor([0, 1, 2]), torch.tensor([7, 9, 8]))
    assert found.tolist() == [True, False, False]  # other crop of 1; sample 2 never seen
    cache.store(torch.tensor([0]), torch.tensor([3]), -logits[:1], round_=1)  # second round
    found, cached = cache.lookup(torch.tensor([0, 0]), torch.tensor([3, 7]))
    assert found.all() and torch.equal(cached, torch.stack([-logits[0], logits[0]]))
    assert cache.hit_rate() == pytest.approx(5 / 9)
    assert cache.hit_rate() == 0.0  # reset by the first call
    assert cache.state_dict() == {}  # never written into checkpoints


def test_cached_epochs_skip_the_teacher_and_distil_from_the_same_logits():
    teacher = CountingTeacher()
    cached = module_with(teacher, teacher_cache=TeacherOutputCache(8, 1, 4))
    plain = module_with(CountingTeacher())
    plain.teacher.load_state_dict(teacher.state_dict())
    first = batch([0, 1, 2, 3], [5, 6, 7, 8])
    # Losses agree to float rounding: a sub-batch of misses runs other conv kernels.
    for _epoch in range(3):
        loss = cached.training_step(first, 0)
        assert teacher.images_seen == 4  # only the first epoch ran the teacher
        assert loss.item() == pytest.approx(plain.training_step(first, 0).item(), rel=1e-5)
    other_crop = batch([0, 1, 2, 3], [5, 6, 7, 9])
    loss = cached.training_step(other_crop, 0)
    assert teacher.images_seen == 5  # only the sample with a new crop
    assert loss.item() == pytest.approx(plain.training_step(other_crop, 0).item(), rel=1e-5)


def test_cache_refuses_distillers_that_read_teacher_features():
    with pytest.raises(ValueError, match="teacher_cache=false"):
        module_with(conv_net(16), FitNets_on_first_conv, teacher_cache=TeacherOutputCache(8, 1, 4))


def FitNets_on_first_conv(student, teacher, context):  # noqa: N802 (stands in for a class)
    return FitNets(
        student, teacher, context=context, student_layers=["0"], teacher_layers=["0"], weight=1.0
    )


@pytest.mark.parametrize("inference_mode", [True, False])
def test_teacher_features_from_inference_mode_can_be_backpropagated_through(inference_mode):
    module = module_with(
        conv_net(16), FitNets_on_first_conv, teacher_inference_mode=inference_mode
    )
    loss = module.training_step(batch([0, 1], [0, 0])[:3], 0)
    loss.backward()
    assert all(p.grad is not None for p in module.student.parameters())


def test_inference_mode_and_no_grad_give_the_same_loss():
    teacher = conv_net(16)
    losses = [
        module_with(teacher, FitNets_on_first_conv, teacher_inference_mode=mode)
        .training_step(batch([0, 1], [0, 0])[:3], 0)
        .item()
        for mode in (True, False)
    ]
    assert losses[0] == losses[1]


def test_bf16_teacher_hands_float32_logits_close_to_the_fp32_teacher():
    torch.manual_seed(1)
    teacher = conv_net(16).eval()
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        reference = teacher(images)
    module = module_with(teacher, teacher_bf16=True)
    assert next(module.teacher.parameters()).dtype == torch.bfloat16
    logits, _ = module._teacher_forward(images)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=0.05, rtol=0.05)


def test_channels_last_converts_models_and_trains():
    module = module_with(conv_net(16), channels_last=True)
    conv = module.student[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    loss = module.training_step(batch([0, 1], [0, 0])[:3], 0)
    loss.backward()
    assert torch.isfinite(loss)


def test_run_switches_fast_paths_from_the_config_and_reports_peak_memory(tmp_path, tiny_config):
    cfg = tiny_config(
        "epochs=1",
        "speed.channels_last=true",
        "speed.teacher_bf16=true",
        "optim.fused=true",
    )
    metrics = run(cfg, tmp_path)
    assert metrics["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["peak_rss_mb"] > 0


def test_teacher_cache_without_replayed_augmentations_names_the_fix(tmp_path, tiny_config):
    cfg = tiny_config("speed.teacher_cache=true", "data.on_device=false")
    with pytest.raises(ValueError, match="augment_rounds"):
        run(cfg, tmp_path)


def test_teacher_cache_run_hits_from_the_second_round_on(tmp_path, tiny_config):
    cfg = tiny_config(
        "epochs=3", "speed.teacher_cache=true", "data.on_device=true", "data.augment_rounds=1"
    )
    run(cfg, tmp_path)
    log = (tmp_path / "logs").rglob("metrics.csv")
    rows = next(log).read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train/teacher_cache_hit_rate")
    rates = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert rates == [0.0, 1.0, 1.0]


@pytest.mark.slow
def test_compiled_student_and_teacher_train_and_reload(tmp_path, tiny_config):
    metrics = run(tiny_config("epochs=1", "speed.compile=true", "distiller=fitnets"), tmp_path)
    assert metrics["test_acc1_best"] is not None
    state = torch.load(metrics["last_checkpoint"], weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # checkpoints keep plain names


@pytest.mark.parametrize("distiller", DISTILLERS)
def test_every_distiller_trains_with_the_fast_switches_on(tmp_path, tiny_config, distiller):
    # channels_last features (views of NHWC maps), a bf16 teacher's features (upcast) and
    # bf16 autocast all reach every loss; a few batches must give finite losses.
    cfg = tiny_config(
        f"distiller={distiller}",
        "epochs=1",
        "speed.channels_last=true",
        "speed.teacher_bf16=true",
        "trainer.precision=bf16-mixed",
        "logger=none",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
    )
    metrics = run(cfg, tmp_path)
    assert metrics["test_acc1_last"] is not None


@pytest.mark.parametrize(
    ("flags", "overrides", "warns"),
    [
        ("fpu avx2", ["trainer=cpu", "trainer.precision=bf16-mixed"], True),
        ("fpu avx2", ["trainer=cpu", "speed.teacher_bf16=true"], True),
        ("fpu avx512_bf16 avx2", ["trainer=cpu", "trainer.precision=bf16-mixed"], False),
        ("fpu amx_bf16", ["trainer=cpu", "speed.teacher_bf16=true"], False),
        ("fpu avx2", ["trainer=cpu"], False),
    ],
)
def test_bf16_on_a_cpu_without_native_bf16_warns_at_start_up(
    flags, overrides, warns, tmp_path, caplog
):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    with caplog.at_level(logging.WARNING):
        warned = speed.warn_if_bf16_is_emulated(compose(overrides), cpuinfo)
    assert warned is warns
    assert ("bf16 is emulated" in caplog.text) is warns
