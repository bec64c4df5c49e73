"""Small collectives for state that every DDP process must keep identical (CRD's memory banks).

Lightning's DDP averages gradients, so parameters agree on every rank; state that a module
changes itself from its own batch (a memory bank, a running estimate) does not, unless each
process applies the updates of all processes. These helpers gather what is needed for that.
Outside a process group (one process) they return their inputs, so library code calls them
unconditionally. They work with any backend: gloo on CPU, NCCL on GPUs (tensors must be on the
device the backend serves, which is where the model's tensors already are).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def all_gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Every process's ``tensors``, concatenated along dim 0 in rank order, without gradient.

    All ``tensors`` of one call have the same number of rows on a process; that number may
    differ between processes (a last, smaller batch): the row counts are gathered first and
    each tensor is padded to the largest count, gathered, and trimmed again. Every rank gets
    the same result, so updates made from it keep replicated state identical.

    Costs one small collective for the row counts (read on the host, one device sync) and one
    collective per tensor. With a single process the tensors come back detached.

    Args:
        tensors: Tensors with the same number of rows; their trailing shapes and dtypes must
            agree across processes.

    Returns:
        One tensor per input, ``[sum of all ranks' rows, ...]``.
    """
    if not tensors:
        return ()
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise ValueError(
            f"all_gather_rows needs tensors with the same number of rows, got "
            f"{[tuple(t.shape) for t in tensors]}"
        )
    if not is_distributed():
        return tuple(t.detach() for t in tensors)
    world = dist.get_world_size()
    count = torch.tensor([rows], dtype=torch.long, device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = torch.cat(counts).tolist()
    longest = max(counts)
    if longest == 0:
        return tuple(t.detach() for t in tensors)
    gathered = []
    for tensor in tensors:
        padded = tensor.detach()
        if rows < longest:
            padding = padded.new_zeros((longest - rows, *padded.shape[1:]))
            padded = torch.cat([padded, padding])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)]))
    return tuple(gathered)


@torch.no_grad()
def all_reduce_mean(values: Tensor, weight: float | int = 1) -> Tensor:
    """The mean of ``values`` over all processes, each process weighted by ``weight`` (its
    number of samples, so that the result is the mean over the global batch).

    Args:
        values: A floating tensor of the same shape on every process.
        weight: This process's weight, ``> 0``.

    Returns:
        ``sum_r weight_r * values_r / sum_r weight_r`` (a new tensor, no gradient); ``values``
        detached with a single process.
    """
    if not is_distributed():
        return values.detach()
    packed = torch.cat([values.detach().flatten() * weight, values.new_full((1,), weight)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return (packed[:-1] / packed[-1]).view_as(values)
