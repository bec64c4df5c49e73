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

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision

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


class BlockShardedFSDP(FSDPStrategy):
    """Lightning's FSDP that first checks that its block classes name modules of the run (a
    misspelt class would leave everything in one unit: nothing sharded)."""

    block_classes: frozenset[str] = frozenset()

    def setup(self, trainer) -> None:
        present = {type(m).__name__ for m in self.lightning_module.modules()}
        if not present & self.block_classes:
            candidates = sorted(c for c in present if c.endswith(("Block", "Layer")))
            raise ValueError(
                f"trainer.strategy.block_classes={sorted(self.block_classes)} names no module "
                "of the teacher or the student: nothing would be sharded. Their block classes: "
                f"{', '.join(candidates) or '(none found)'}"
            )
        super().setup(trainer)


def is_sharded(trainer) -> bool:
    """Whether ``trainer`` shards the models over several processes (FSDP, world size > 1):
    a model then runs only inside a step every process takes together."""
    return isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1


def fsdp_strategy(
    block_classes: Sequence[str] = ("GPT2Block", "LlamaDecoderLayer"),
    sharding_strategy: str = "FULL_SHARD",
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    precision: str | None = None,
):
    """Lightning's ``FSDPStrategy`` sharding each block of ``block_classes`` separately.

    ``use_orig_params=True``: the frozen teacher's and the trainable student's parameters
    may share a sharded unit (the root's), which FSDP's flat parameters allow only then.
    Under ``precision="bf16-mixed"`` weights are gathered and used in bfloat16, but gradients
    are reduced in float32 and buffers keep their dtype (a top-k cache of log-probabilities,
    Llama's rotary frequencies); Lightning's own bf16 FSDP policy would cast both.

    Args:
        block_classes: Names of the classes whose instances become one FSDP unit each.
        sharding_strategy: ``FULL_SHARD`` (weights, gradients and optimizer state sharded),
            ``SHARD_GRAD_OP``, ``NO_SHARD`` (DDP-like) or ``HYBRID_SHARD``.
        cpu_offload: Keep the shards in CPU memory between uses.
        activation_checkpointing: Recompute each block's activations in the backward pass.
        precision: The trainer's precision (the config passes ``trainer.precision``).
    """
    if sharding_strategy not in SHARDING:
        raise ValueError(f"sharding_strategy={sharding_strategy!r} is not one of {SHARDING}")
    policy = wraps_blocks(block_classes)
    mixed = None
    if precision == "bf16-mixed":
        mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    strategy = BlockShardedFSDP(
        auto_wrap_policy=policy,
        activation_checkpointing_policy=policy if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        mixed_precision=mixed,
        use_orig_params=True,
        state_dict_type="full",
    )
    strategy.block_classes = frozenset(block_classes)
    return strategy
