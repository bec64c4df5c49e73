"""DistillationModule: the teacher is frozen (eval, no grad, fixed BN statistics, no optimiser)."""

import lightning as L
import torch
from helpers import conv_net, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill_zoo.distillers import KD, CrossEntropyOnly, DistillContext
from distill_zoo.module import DistillationModule


def loaders(n: int = 64) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    data = TensorDataset(x, y, torch.arange(n))
    return DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=32)


def make_module(teacher: nn.Module | None, distiller_cls=KD) -> DistillationModule:
    student = conv_net(8)
    distiller = distiller_cls(student, teacher, context=DistillContext(num_classes=4))
    return DistillationModule(
        student,
        teacher,
        distiller,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        scheduler=None,
        num_classes=4,
    )


def fit(module: DistillationModule, steps: int = 6) -> L.Trainer:
    train, val = loaders()
    trainer = quiet_trainer(max_steps=steps, num_sanity_val_steps=2)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return trainer


def test_teacher_weights_and_batchnorm_statistics_never_change():
    torch.manual_seed(0)
    teacher = conv_net(16)
    with torch.no_grad():  # give the BN statistics non-default values worth protecting
        teacher[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = make_module(teacher)
    student_before = [p.clone() for p in module.student.parameters()]
    fit(module)
    after = teacher.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"teacher {key} changed"
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(student_before, module.student.parameters(), strict=True)
    )


def test_teacher_stays_in_eval_when_module_switches_to_train():
    module = make_module(conv_net(16))
    module.train()
    assert module.student.training and not module.teacher.training


def test_optimizer_holds_student_not_teacher():
    teacher = conv_net(16)
    module = make_module(teacher)
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.student.parameters()}
    assert not optimised & {id(p) for p in teacher.parameters()}


def test_logs_every_loss_term_and_teacher_metrics():
    module = make_module(conv_net(16))
    trainer = fit(module, steps=8)
    logged = trainer.callback_metrics
    for key in (
        "train/loss",
        "train/loss_ce",
        "train/loss_kd",
        "train/acc1",
        "val/acc1",
        "val/acc5",
        "val/teacher_acc1",
        "val/agreement",
    ):
        assert key in logged, key
    assert 0.0 <= float(logged["val/agreement"]) <= 1.0


def test_runs_without_teacher():
    module = make_module(None, distiller_cls=CrossEntropyOnly)
    trainer = fit(module)
    assert "val/acc1" in trainer.callback_metrics
    assert "val/agreement" not in trainer.callback_metrics
