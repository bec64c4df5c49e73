"""Contrastive representation distillation (CRD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_zoo.distillers.base import (
    DistillContext,
    Distiller,
    StepOutputs,
    probe_shapes,
    select_layers,
)
from distill_zoo.distillers.crd_memory import NegativeSampler, init_memory_bank
from distill_zoo.distillers.layers import PENULTIMATE, embedding, penultimate_layer
from distill_zoo.engine.collectives import all_gather_rows, all_reduce_mean
from distill_zoo.losses import crd_logits, crd_nce_loss, crd_normaliser

_FP32_BUFFERS = ("memory_student", "memory_teacher", "z_student", "z_teacher")
"""Buffers kept in fp32 whatever the model is cast to (see ``CRD._apply``)."""


class CRD(Distiller):
    """Contrastive Representation Distillation (Yonglong Tian, Dilip Krishnan, Phillip Isola,
    ICLR 2020), https://arxiv.org/abs/1910.10699. Maximise a bound on the mutual information
    of student and teacher representations by telling matched pairs from mismatched ones.

    Both networks' penultimate features (the globally average-pooled output of the last stage)
    are embedded by a linear layer into ``embed_dim`` dimensions and L2-normalised. Two memory
    banks hold an embedding of every training sample, one for each network. The student
    embedding of sample ``i`` is contrasted with the teacher bank's row ``i`` (its positive)
    and ``num_negatives`` other rows, and the teacher embedding likewise with the student bank:
    ``crd = NCE(student anchor, teacher bank) + NCE(teacher anchor, student bank)`` (see
    :func:`crd_nce_loss`; critic ``h = P / (P + K/N)``, ``P = exp(<v_t, v_s> / T) / Z``). After
    the loss is computed, the batch's rows of each bank move towards the new embeddings with
    ``momentum`` and are re-normalised (:meth:`update_memory`). As in the reference code
    (RepDistiller's ``crd/``), each ``Z`` is estimated once, from the first batch, as
    ``mean(exp(logits)) * N``; it is kept in a buffer, with the banks, so a resumed run
    continues exactly.

    ``loss = ce_weight * CE + kd_weight * KD + weight * crd``. Defaults follow the paper's
    CIFAR-100 benchmark (its "CRD" row, and the reference code): ``ce_weight=1``, ``kd_weight=0``,
    ``weight=0.8``, 16384 negatives, ``T=0.07``, momentum 0.5, 128 dimensions, class-aware
    ("exact") negatives. The paper's "CRD+KD" row sets ``kd_weight=1`` (``T=4``):
    ``distiller=crd_kd``.

    Negatives (``sampling``): ``"exact"`` draws them from training samples of other classes
    (the paper's CIFAR-100 setup, needs ``context.train_targets``); ``"uniform"`` from any
    sample but the positive. Distinct negatives per anchor where enough exist, as in the
    reference's data set; ``replacement=True`` draws with replacement (cheaper on huge sets).

    Multi-GPU (DDP): every process sees a different batch, yet the banks must stay one memory.
    :meth:`update_memory` all-gathers the indices and both embeddings of every process and
    applies the concatenation, in rank order, on every rank, so the banks stay bit-identical
    across ranks and equal to one process's banks fed the concatenated batches; ``Z`` is
    estimated from the whole first global batch (an all-reduced mean), so every rank uses the
    same ``Z``. Each rank draws negatives for its own anchors. (Without the gather, each rank's
    banks would only ever see its own batches, and DDP's default per-step broadcast of buffers
    would replace them all with rank 0's: most rows would lag or never move.) Per step under
    DDP this costs two all-gathers (indices, embeddings) and two tiny collectives (the ranks'
    batch sizes, read on the host, and ``Z``'s all-reduce); one process pays nothing.
    The banks and ``Z`` stay fp32 under any precision, including a whole-model cast such as
    ``precision=bf16-true``.

    Args:
        student: The student network (read for shapes only).
        teacher: The frozen teacher.
        context: Needs ``example_input``, ``num_train_samples`` and, for ``"exact"`` sampling,
            ``train_targets``; stage names for the default layers.
        weight: Weight ``b`` of the CRD term.
        num_negatives: Negatives per positive (``K``, the reference's ``nce_k``).
        temperature: NCE temperature (``nce_t``).
        momentum: Memory-bank momentum (``nce_m``).
        embed_dim: Embedding dimension (``feat_dim``).
        sampling: ``"exact"`` (class-aware) or ``"uniform"`` negatives.
        replacement: Always draw negatives with replacement.
        student_layers: Student layer whose pooled output is embedded: ``None`` (or
            ``"penultimate"``) for the classifier's input, as in the reference, else a portable
            choice for :func:`select_layers` or a layer name.
        teacher_layers: Likewise for the teacher.
        ce_weight: Weight ``g`` of the hard-label cross-entropy.
        kd_weight: Weight ``a`` of Hinton's KD term.
        kd_temperature: Temperature of that KD term.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        weight: float = 0.8,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        embed_dim: int = 128,
        sampling: str = "exact",
        replacement: bool = False,
        student_layers: str | int | list | None = None,
        teacher_layers: str | int | list | None = None,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
    ) -> None:
        super().__init__(
            student,
            teacher,
            context=context,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            kd_temperature=kd_temperature,
        )
        context = self.context
        if temperature <= 0:
            raise ValueError(f"CRD temperature must be > 0, got {temperature}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"CRD momentum must lie in [0, 1], got {momentum}")
        if embed_dim < 1:
            raise ValueError(f"CRD embed_dim must be >= 1, got {embed_dim}")
        if context.num_train_samples < 1:
            raise ValueError(
                "CRD keeps a memory bank row per training sample and needs "
                f"context.num_train_samples >= 1, got {context.num_train_samples}"
            )
        if context.example_input is None:
            raise ValueError("CRD needs context.example_input to find its feature sizes")
        self.weight = weight
        self.temperature = temperature
        self.momentum = momentum
        self.num_train_samples = context.num_train_samples
        self.student_layer = _one_layer(
            student, context.example_input, context.student_stages, student_layers, "student"
        )
        self.teacher_layer = _one_layer(
            teacher, context.example_input, context.teacher_stages, teacher_layers, "teacher"
        )
        self.embed_student = nn.Linear(
            _feature_dim(student, self.student_layer, context.example_input, "student"), embed_dim
        )
        self.embed_teacher = nn.Linear(
            _feature_dim(teacher, self.teacher_layer, context.example_input, "teacher"), embed_dim
        )
        self.sampler = NegativeSampler(
            context.num_train_samples,
            num_negatives,
            sampling,
            context.train_targets,
            replacement,
        )
        self.register_buffer("memory_student", init_memory_bank(self.num_train_samples, embed_dim))
        self.register_buffer("memory_teacher", init_memory_bank(self.num_train_samples, embed_dim))
        self.register_buffer("z_student", torch.zeros((), dtype=torch.float32))
        self.register_buffer("z_teacher", torch.zeros((), dtype=torch.float32))
        self.register_buffer("z_ready", torch.zeros((), dtype=torch.bool))

    def layers(self) -> tuple[list[str], list[str]]:
        return [self.student_layer], [self.teacher_layer]

    def replicated_buffers(self) -> list[str]:
        """Names of the buffers that stay identical on every DDP rank without DDP's help: all
        of them (banks updated from all ranks' batches, an all-reduced ``Z``, sampler tables
        derived from the labels). A wrapper may exclude them from DDP's per-step broadcast
        from rank 0, which would otherwise resend both banks (``2 x N x embed_dim`` floats)
        before every step."""
        return [name for name, _ in self.named_buffers()]

    def embed(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        """L2-normalised fp32 ``[B, embed_dim]`` embeddings of the student and the teacher."""
        student = self.embed_student(embedding(out.student_features[self.student_layer]))
        teacher = self.embed_teacher(embedding(out.teacher_features[self.teacher_layer]))
        return F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.logit_terms(out)
        v_s, v_t = self.embed(out)
        indices = out.indices.to(self.memory_student.device, torch.long)
        contrast = self.sampler(indices)
        # Copies of the banks: the backward pass needs them as they are now, and
        # update_memory changes the banks in place below.
        memory_s, memory_t = self.memory_student.clone(), self.memory_teacher.clone()
        student_logits = crd_logits(v_s, memory_t, contrast, self.temperature)
        teacher_logits = crd_logits(v_t, memory_s, contrast, self.temperature)
        z_s, z_t = self._normalisers(student_logits, teacher_logits)
        loss = crd_nce_loss(student_logits, z_s, self.num_train_samples) + crd_nce_loss(
            teacher_logits, z_t, self.num_train_samples
        )
        self.update_memory(indices, v_s, v_t)
        terms["crd"] = self.weight * loss
        return terms

    @torch.no_grad()
    def _normalisers(
        self, student_logits: Tensor, teacher_logits: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``Z`` of each side: estimated from the first batch, then fixed (the reference's way).

        Under DDP the first batch is the global one: the ranks' estimates are averaged, each
        weighted by its batch size, so all ranks hold the same ``Z``. Branch-free
        (``torch.where``), so no step waits for a device-to-host read.
        """
        estimates = torch.stack(
            [
                crd_normaliser(student_logits, self.num_train_samples),
                crd_normaliser(teacher_logits, self.num_train_samples),
            ]
        )
        estimates = all_reduce_mean(estimates, weight=student_logits.shape[0])
        for buffer, estimate in zip((self.z_student, self.z_teacher), estimates, strict=True):
            buffer.copy_(torch.where(self.z_ready, buffer, estimate))
        self.z_ready.fill_(True)
        return self.z_student.clone(), self.z_teacher.clone()

    @torch.no_grad()
    def update_memory(self, indices: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Moves the banks' rows ``indices`` towards the batch's embeddings and re-normalises
        them: ``row = normalise(momentum * row + (1 - momentum) * v)``; other rows stay as
        they are. Called after the loss has read the banks, as in the reference.

        Under DDP, ``indices``, ``v_s`` and ``v_t`` of all processes are all-gathered first
        (batches may differ in size) and every rank applies the same concatenated update, so
        the banks stay identical on every rank. A sample present twice (a distributed sampler
        pads the last shard with repeated samples) is moved once, towards its last embedding
        in rank order, so the result never depends on the order of duplicate writes.
        Embeddings of any precision are cast to the banks' fp32.
        """
        v = torch.cat([v_s, v_t], dim=1).to(self.memory_student.dtype)
        indices, v = all_gather_rows(indices.to(self.memory_student.device, torch.long), v)
        v = v.index_select(0, _last_occurrence(indices))
        v_s, v_t = v.split([self.memory_student.shape[1], self.memory_teacher.shape[1]], dim=1)
        for bank, update in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = bank.index_select(0, indices).mul_(self.momentum)
            rows.add_(update, alpha=1 - self.momentum)
            bank.index_copy_(0, indices, F.normalize(rows, dim=1))

    def _apply(self, fn, recurse: bool = True):
        """Moves the banks and ``Z`` with the module, but keeps them fp32 through casts of the
        whole model (``.half()``, Lightning's ``bf16-true``): rounding would blur every row."""
        kept = {name: self._buffers[name] for name in _FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        return self


def _last_occurrence(indices: Tensor) -> Tensor:
    """For each position of ``indices``, the last position holding the same value (itself
    when the value is unique), without a device-to-host read."""
    positions = torch.arange(len(indices), device=indices.device)
    same = indices.unsqueeze(0) == indices.unsqueeze(1)
    return torch.where(same, positions.unsqueeze(0), -1).amax(dim=1)


def _one_layer(
    model: nn.Module, example_input: Tensor, stages: list[str], choice, role: str
) -> str:
    if choice is None or choice == PENULTIMATE:  # what the classifier head reads
        return penultimate_layer(model, example_input, role)
    layers = select_layers(stages, choice, "last")
    if len(layers) != 1:
        raise ValueError(f"CRD embeds one {role} layer, got {layers}")
    return layers[0]


def _feature_dim(model: nn.Module, layer: str, example_input: Tensor, role: str) -> int:
    shape = probe_shapes(model, [layer], example_input)[layer]
    if len(shape) < 2:
        raise ValueError(
            f"CRD needs a [batch, channels, ...] feature from {role} layer '{layer}', "
            f"got shape {shape}"
        )
    return shape[1]
