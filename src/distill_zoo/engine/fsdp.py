"""Fully sharded data parallel (FSDP) for teachers and students larger than one device.

:func:`fsdp_strategy` builds Lightning's ``FSDPStrategy`` from names a config can hold: the
decoder-block classes to shard one by one, by class name (``GPT2Block``,
``LlamaDecoderLayer``), the sharding strategy and CPU offload. Each block of the
frozen teacher and of the student then keeps only its shard of the weights on each device
and gathers the rest for its own forward pass (Zhao et al., "PyTorch FSDP: Experiences on
Scaling Fully Sharded Data Parallel", VLDB 2023, https://arxiv.org/abs/2304.11277).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def wraps_blocks(block_classes: Sequence[str]):
    """An FSDP wrap policy making one unit of each module whose class is named in
    ``block_classes`` (by class name, so that no model library is imported here)."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    names = frozenset(block_classes)
    if not names:
        raise ValueError("trainer.strategy.block_classes is empty: name the decoder-block class")
    return functools.partial(
        lambda_auto_wrap_policy, lambda_fn=lambda module: type(module).__name__ in names
    )


def fsdp_strategy(
    block_classes: Sequence[str] = ("GPT2Block", "LlamaDecoderLayer"),
    sharding_strategy: str = "FULL_SHARD",
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
):
    """Lightning's ``FSDPStrategy`` sharding each block of ``block_classes`` separately.

    ``use_orig_params=True``: the frozen teacher's and the trainable student's parameters
    may share a sharded unit (the root's), which FSDP's flat parameters allow only then.

    Args:
        block_classes: Names of the classes whose instances become one FSDP unit each.
        sharding_strategy: ``FULL_SHARD`` (weights, gradients and optimizer state sharded),
            ``SHARD_GRAD_OP``, ``NO_SHARD`` (DDP-like) or ``HYBRID_SHARD``.
        cpu_offload: Keep the shards in CPU memory between uses.
        activation_checkpointing: Recompute each block's activations in the backward pass.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if sharding_strategy not in SHARDING:
        raise ValueError(f"sharding_strategy={sharding_strategy!r} is not one of {SHARDING}")
    policy = wraps_blocks(block_classes)
    return FSDPStrategy(
        auto_wrap_policy=policy,
        activation_checkpointing_policy=policy if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        use_orig_params=True,
        state_dict_type="full",
    )
