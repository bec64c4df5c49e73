"""Mixed precision (issue 6): every loss computes in fp32 under autocast, and every distiller
trains under ``trainer.precision=bf16-mixed`` (and fp16 autocast) with CRD's banks kept fp32.

Each loss is checked twice: against the fp32 maths on the *same* bf16-rounded inputs (tight:
any step done in bf16 would miss it by far more), and against an all-fp32 run (loose: only
the bf16 rounding of the network's outputs separates them).

Lightning 2.6 does not run ``precision="16-mixed"`` on the CPU: it warns and switches to
``bf16-mixed`` (``_AcceleratorConnector._check_and_init_precision``). So fp16 is checked here by
calling ``training_step`` under ``torch.autocast("cpu", dtype=torch.float16)`` and stepping the
optimizer without a GradScaler, and through Lightning's ``16-mixed`` only on CUDA (``gpu`` mark).
"""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import CLASSIFICATION_DISTILLERS, quiet_trainer
from hydra.utils import get_class, instantiate
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from distill_zoo.build import build_model
from distill_zoo.config import compose
from distill_zoo.distillers.base import DistillContext
from distill_zoo.distillers.crd_memory import init_memory_bank
from distill_zoo.losses import (
    ab_loss,
    at_loss,
    cc_loss,
    crd_loss,
    ctkd_loss,
    darkrank_loss,
    dist_loss,
    dkd_loss,
    fsp_loss,
    ft_loss,
    hcl_loss,
    hint_loss,
    kd_loss,
    nst_loss,
    ofd_loss,
    pkt_loss,
    prob_mse_loss,
    rkd_loss,
    sp_loss,
    standardize_logits,
    tf_kd_reg_loss,
    vid_loss,
    virtual_teacher,
)
from distill_zoo.losses.common import fp32
from distill_zoo.module import DistillationModule

TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 20.0)
BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}

EXACT = {"rel": 1e-5, "abs": 1e-7}
"""fp32 maths inside autocast vs the same maths outside it, on the same bf16-rounded inputs."""

ROUNDING = {"rel": 0.02, "abs": 1e-4}
"""bf16 network outputs vs fp32 ones: the cases below differ by at most 0.65% (PKT)."""


def finite_grads(*params: Tensor) -> bool:
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


# ---------------------------------------------------------------- the fp32 decorator


def test_fp32_upcasts_keyword_and_listed_tensors_and_disables_autocast():
    @fp32
    def gram_sum(*, first: list[Tensor], second: Tensor) -> Tensor:
        return (first[0] @ second.t()).sum()

    torch.manual_seed(0)
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with torch.autocast(**BF16):
        low = gram_sum(first=[a], second=b)  # every tensor is a keyword argument
        plain = (a @ b.t()).sum()
    assert plain.dtype == torch.bfloat16  # what the decorator prevents
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx((a.float() @ b.float().t()).sum().item(), rel=1e-6)


def test_fp32_leaves_float64_and_integer_tensors_alone():
    @fp32
    def dtypes(x: Tensor, y: Tensor) -> tuple[torch.dtype, torch.dtype]:
        return x.dtype, y.dtype

    assert dtypes(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.long)) == (
        torch.float64,
        torch.long,
    )
    assert dtypes(torch.zeros(2, dtype=torch.float16), torch.zeros(2)) == (
        torch.float32,
        torch.float32,
    )


# ---------------------------------------------------------------- losses with a temperature

LOGIT_LOSSES = {
    "kd": lambda s, t, y, T: kd_loss(s, t, T),
    "kd_standardized": lambda s, t, y, T: kd_loss(standardize_logits(s), standardize_logits(t), T),
    "kd_keywords": lambda s, t, y, T: kd_loss(student_logits=s, teacher_logits=t, temperature=T),
    "prob_mse": lambda s, t, y, T: prob_mse_loss(s, t, T),
    "dkd": lambda s, t, y, T: dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=T),
    "dist": lambda s, t, y, T: dist_loss(s, t, beta=1.0, gamma=1.0, tau=T),
    "ctkd": lambda s, t, y, T: ctkd_loss(s, t, torch.tensor([T])),
    "tf_kd": lambda s, t, y, T: tf_kd_reg_loss(s, y, 0.99, T, "official"),
    "tf_kd_paper": lambda s, t, y, T: tf_kd_reg_loss(s, y, 0.9, T, "paper"),
}


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_logit_loss_from_a_bf16_layer_matches_fp32(name, temperature):
    loss = LOGIT_LOSSES[name]
    torch.manual_seed(0)
    features = torch.randn(16, 32) * 8  # logits of spread ~5, as a trained network's
    head_s, head_t = nn.Linear(32, 100), nn.Linear(32, 100)
    targets = torch.randint(0, 100, (16,))
    with torch.autocast(**BF16):
        student, teacher = head_s(features), head_t(features).detach()
        low = loss(student, teacher, targets, temperature)
    assert student.dtype == torch.bfloat16
    assert low.dtype == torch.float32 and torch.isfinite(low)
    same_inputs = loss(student.detach().float(), teacher.float(), targets, temperature)
    assert low.item() == pytest.approx(same_inputs.item(), **EXACT)
    all_fp32 = loss(head_s(features), head_t(features).detach(), targets, temperature)
    assert low.item() == pytest.approx(all_fp32.item(), **ROUNDING)
    low.backward()
    assert finite_grads(head_s.weight, head_s.bias)
    assert head_s.weight.grad.abs().sum() > 0


def extreme_logits() -> tuple[Tensor, Tensor, Tensor]:
    """bf16 logits of +-50 (exact in bf16): a confidently wrong student, a confidently right
    one, a tie and a flat row; the teacher confident throughout."""
    student = torch.full((4, 10), -50.0)
    teacher = torch.full((4, 10), -50.0)
    student[0, 3], teacher[0, 7] = 50.0, 50.0  # disagree completely
    student[1, 2], teacher[1, 2] = 50.0, 50.0  # agree
    student[2, :2], teacher[2, 0] = 50.0, 50.0  # a tie in the student
    student[3] = 0.0  # flat student row
    teacher[3, 9] = 50.0
    targets = torch.tensor([7, 2, 0, 9])
    return student.bfloat16(), teacher.bfloat16(), targets


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_logit_loss_on_extreme_bf16_logits_is_finite(name, temperature):
    loss = LOGIT_LOSSES[name]
    student, teacher, targets = extreme_logits()
    student.requires_grad_()
    with torch.autocast(**BF16):
        low = loss(student, teacher, targets, temperature)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # +-50 is exact in bf16: the fp32 loss of the same values is the reference.
    exact = loss(student.detach().float(), teacher.float(), targets, temperature)
    assert low.item() == pytest.approx(exact.item(), **EXACT)
    low.backward()
    assert finite_grads(student)


def test_virtual_teacher_is_fp32_under_a_bf16_default_dtype():
    # precision=bf16-true sets the default dtype to bf16 around each step; 0.99 would round
    # to 0.98828125.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        probs = virtual_teacher(torch.tensor([0, 2]), 3, 0.99)
    finally:
        torch.set_default_dtype(previous)
    assert probs.dtype == torch.float32
    assert probs[0, 0].item() == pytest.approx(0.99, rel=1e-7)
    assert probs[1, 0].item() == pytest.approx(0.005, rel=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_ctkd_temperature_gradient_is_finite_under_bf16(temperature):
    student, teacher, _ = extreme_logits()
    learned = torch.tensor([temperature], requires_grad=True)
    with torch.autocast(**BF16):
        low = ctkd_loss(student, teacher, learned)
    low.backward()
    assert torch.isfinite(low) and finite_grads(learned)


@pytest.mark.parametrize("temperature", (0.07, *TEMPERATURES))
def test_crd_nce_loss_from_bf16_embeddings_matches_fp32(temperature):
    torch.manual_seed(0)
    n, batch, negatives = 64, 8, 16
    features = torch.randn(batch, 32)
    embed_s, embed_t = nn.Linear(32, 16), nn.Linear(32, 16)
    memory_s = F.normalize(init_memory_bank(n, 16), dim=1)
    memory_t = F.normalize(init_memory_bank(n, 16), dim=1)
    indices = torch.cat([torch.arange(batch).unsqueeze(1), torch.randint(8, n, (8, 16))], 1)
    assert indices.shape == (batch, 1 + negatives)

    def loss(v_s: Tensor, v_t: Tensor) -> Tensor:
        return crd_loss(v_s, v_t, memory_s, memory_t, indices, temperature, n)

    with torch.autocast(**BF16):
        v_s = F.normalize(embed_s(features), dim=1)
        v_t = F.normalize(embed_t(features), dim=1)
        low = loss(v_s, v_t)
    assert v_s.dtype == torch.bfloat16
    assert low.dtype == torch.float32 and torch.isfinite(low)
    same_inputs = loss(v_s.detach().float(), v_t.detach().float())
    assert low.item() == pytest.approx(same_inputs.item(), **EXACT)
    all_fp32 = loss(F.normalize(embed_s(features), dim=1), F.normalize(embed_t(features), dim=1))
    assert low.item() == pytest.approx(all_fp32.item(), **ROUNDING)
    low.backward()
    assert finite_grads(embed_s.weight, embed_t.weight)


# ---------------------------------------------------------------- feature and relational losses


class TinyPair(nn.Module):
    """Student and teacher maps and embeddings made by small convolutions and linears, so that
    under autocast they come out in bf16 as a real network's would. Batch of 8, 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.s1, self.t1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.s2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.t2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.t_wide = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.e_s, self.e_t = nn.Linear(8, 16), nn.Linear(16, 16)
        self.raw_variance = nn.Parameter(torch.zeros(8))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        s1, t1, t_wide = self.s1(x), self.t1(x), self.t_wide(x)
        s2, t2 = self.s2(s1), self.t2(t1)
        pool_s, pool_t = s2.mean(dim=(2, 3)), t_wide.mean(dim=(2, 3))
        return {
            "s1": s1,  # [8, 8, 8, 8]
            "t1": t1,
            "s2": s2,  # [8, 8, 4, 4]
            "t2": t2,
            "t_wide": t_wide,  # [8, 16, 4, 4]
            "pool_s": pool_s,  # [8, 8]
            "pool_t": pool_t,  # [8, 16]
            "emb_s": self.e_s(pool_s),  # [8, 16]
            "emb_t": self.e_t(pool_t),
            "variance": F.softplus(self.raw_variance) + 0.1,  # [8]
        }


MARGIN = torch.full((8,), -0.5)

FEATURE_LOSSES = {
    "hint": lambda f: hint_loss(f["s1"], f["t1"]),
    "hint_paper": lambda f: hint_loss(f["s1"], f["t1"], formulation="paper"),
    "at": lambda f: at_loss([f["s1"], f["s2"]], [f["t1"], f["t_wide"]]),
    "ab": lambda f: ab_loss([f["s1"]], [f["t1"]]),
    "ft": lambda f: ft_loss(f["s2"], f["t_wide"]),
    "ft_paper": lambda f: ft_loss(f["s2"], f["t2"], formulation="paper"),
    "fsp": lambda f: fsp_loss([f["s1"], f["s2"]], [f["t1"], f["t2"]]),
    "fsp_paper": lambda f: fsp_loss([f["s1"], f["s2"]], [f["t1"], f["t2"]], "paper"),
    "nst": lambda f: nst_loss(f["s2"], f["t_wide"]),
    "nst_c1": lambda f: nst_loss([f["s1"]], [f["t1"]], degree=2, c=1.0),
    "ofd": lambda f: ofd_loss([f["s1"]], [f["t1"]], [MARGIN]),
    "hcl": lambda f: hcl_loss([f["s1"], f["s2"]], [f["t1"], f["t2"]]),
    "sp": lambda f: sp_loss(f["s1"], f["t_wide"]),
    "sp_keywords": lambda f: sp_loss(student_features=f["s1"], teacher_features=f["t_wide"]),
    "cc": lambda f: cc_loss(f["emb_s"], f["emb_t"]),
    "cc_gaussian": lambda f: cc_loss(f["emb_s"], f["emb_t"], mode="gaussian"),
    "cc_bilinear": lambda f: cc_loss(f["emb_s"], f["emb_t"], mode="bilinear"),
    "rkd": lambda f: rkd_loss(f["pool_s"], f["pool_t"]),
    "pkt": lambda f: pkt_loss(f["pool_s"], f["pool_t"]),
    "vid": lambda f: vid_loss(f["s1"], f["t1"], f["variance"]),
    "darkrank": lambda f: darkrank_loss(f["pool_s"], f["pool_t"]),
    "darkrank_soft": lambda f: darkrank_loss(f["pool_s"], f["pool_t"], transfer="soft"),
}


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_feature_loss_from_bf16_layers_matches_fp32(name):
    loss = FEATURE_LOSSES[name]
    torch.manual_seed(0)
    pair, images = TinyPair(), torch.randn(8, 3, 8, 8)
    with torch.autocast(**BF16):
        features = pair(images)
        low = loss(features)
    assert features["s1"].dtype == features["emb_t"].dtype == torch.bfloat16
    assert low.dtype == torch.float32 and torch.isfinite(low)
    upcast = {k: v.detach().float() for k, v in features.items()}
    assert low.item() == pytest.approx(loss(upcast).item(), **EXACT)
    assert low.item() == pytest.approx(loss(pair(images)).item(), **ROUNDING)
    low.backward()
    student = [pair.s1.weight, pair.s2.weight, pair.e_s.weight]
    assert finite_grads(*(p for p in student if p.grad is not None))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)


# ---------------------------------------------------------------- every distiller, end to end

METHODS = CLASSIFICATION_DISTILLERS
SMALL = {"crd": ["distiller.num_negatives=16"], "crd_kd": ["distiller.num_negatives=16"]}
NUM_CLASSES, NUM_TRAIN, SIZE = 4, 32, 16


def tiny_data() -> TensorDataset:
    """``(image, target, index)`` of 32 learnable 16x16 images (a pattern per class + noise)."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(NUM_TRAIN) % NUM_CLASSES
    patterns = torch.randn(NUM_CLASSES, 3, SIZE, SIZE, generator=generator)
    noise = torch.randn(NUM_TRAIN, 3, SIZE, SIZE, generator=generator)
    return TensorDataset(patterns[targets] + 0.5 * noise, targets, torch.arange(NUM_TRAIN))


def build_module(method: str) -> DistillationModule:
    """The distiller of ``conf/distiller/<method>.yaml`` on resnet8 <- resnet14 (untrained:
    precision, not accuracy, is under test), in a DistillationModule."""
    models = ["student=resnet8", "teacher=resnet14"]
    cfg = compose([f"distiller={method}", *models, *SMALL.get(method, [])])
    torch.manual_seed(0)
    needs_teacher = get_class(cfg.distiller._target_).requires_teacher
    teacher = build_model(cfg.teacher, NUM_CLASSES, 3) if needs_teacher else None
    student = build_model(cfg.student, NUM_CLASSES, 3)
    context = DistillContext(
        student_stages=list(cfg.student.feature_layers),
        teacher_stages=list(cfg.teacher.feature_layers) if teacher is not None else [],
        example_input=torch.zeros(2, 3, SIZE, SIZE),
        num_classes=NUM_CLASSES,
        num_train_samples=NUM_TRAIN,
        train_targets=tiny_data().tensors[1],
    )
    distiller = instantiate(cfg.distiller, student=student, teacher=teacher, context=context)
    return DistillationModule(
        student,
        teacher,
        distiller,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        scheduler=None,
        num_classes=NUM_CLASSES,
    )


class StepLosses(L.Callback):
    """Records the loss each training step returned."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


def fit_two_steps(
    module: DistillationModule, precision: str, accelerator: str = "cpu"
) -> tuple[list[Tensor], set[torch.dtype]]:
    """Two optimizer steps through Lightning; returns the step losses and the dtypes the
    student's logits came out in."""
    recorder, dtypes = StepLosses(), set()
    hook = module.student.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=2,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    loader = DataLoader(tiny_data(), batch_size=8, shuffle=True)
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        hook.remove()
    return recorder.losses, dtypes


@pytest.mark.parametrize("method", METHODS)
def test_every_distiller_trains_under_bf16_mixed(method):
    module = build_module(method)
    before = [p.detach().clone() for p in module.student.parameters()]
    losses, dtypes = fit_two_steps(module, "bf16-mixed")
    assert dtypes == {torch.bfloat16}  # autocast was on for the student
    assert len(losses) == 2
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses), losses
    after = list(module.student.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("method", METHODS)
def test_every_distiller_steps_under_fp16_autocast(method):
    # Lightning turns 16-mixed into bf16-mixed on the CPU: call the step as its AMP plugin
    # would, and step the optimizer without a GradScaler.
    module = build_module(method).train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05)
    dtypes = set()
    hook = module.student.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    loader = DataLoader(tiny_data(), batch_size=8)
    for step, batch in zip(range(2), loader, strict=False):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = module.training_step(batch, step)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in trainable if p.grad is not None)
        optimizer.step()
    hook.remove()
    assert dtypes == {torch.float16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("method", METHODS)
def test_every_distiller_trains_under_mixed_precision_on_cuda(method, precision):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    losses, dtypes = fit_two_steps(build_module(method), precision, accelerator="gpu")
    assert dtypes == {torch.float16 if precision == "16-mixed" else torch.bfloat16}
    # 16-mixed's GradScaler may skip a step whose gradients overflowed; losses stay finite.
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses), losses


# ---------------------------------------------------------------- CRD's memory banks


@pytest.mark.parametrize("method", ["crd", "crd_kd"])
def test_crd_memory_banks_stay_fp32_under_bf16_mixed(method):
    module = build_module(method)
    crd = module.distiller
    banks = {name: getattr(crd, name).clone() for name in ("memory_student", "memory_teacher")}
    fit_two_steps(module, "bf16-mixed")
    for name, before in banks.items():
        after = getattr(crd, name)
        assert after.dtype == torch.float32, name
        updated = (after != before).any(dim=1)
        assert updated.sum() == 16  # two batches of 8 distinct samples
        # Updated rows are re-normalised in fp32: unit norm to fp32 accuracy (bf16: ~1e-3).
        norms = after[updated].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6), norms
    assert crd.z_student.dtype == crd.z_teacher.dtype == torch.float32
    assert bool(crd.z_ready) and math.isfinite(crd.z_student.item())


def test_crd_memory_banks_stay_fp32_when_the_module_is_cast_to_bf16():
    # What precision=bf16-true does to the LightningModule (HalfPrecision.convert_module).
    module = build_module("crd")
    before = module.distiller.memory_student.clone()
    module.to(torch.bfloat16)
    crd = module.distiller
    assert crd.embed_student.weight.dtype == torch.bfloat16  # the rest is cast
    for bank in (crd.memory_student, crd.memory_teacher, crd.z_student, crd.z_teacher):
        assert bank.dtype == torch.float32
    assert torch.equal(crd.memory_student, before)  # not rounded through bf16 either
