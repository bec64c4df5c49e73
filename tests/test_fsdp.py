"""FSDP for language models: the strategy shards exactly the decoder blocks (CPU), and a
sharded distillation run trains and saves a checkpoint a plain run loads (GPU only: Lightning's
FSDP strategy refuses a CPU accelerator)."""

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from distill_zoo import train
from distill_zoo.config import compose
from distill_zoo.engine.fsdp import fsdp_strategy, wraps_blocks
from distill_zoo.models.language import causal_lm
from distill_zoo.teachers import load_weights


def test_the_strategy_wraps_each_named_block_and_nothing_else() -> None:
    model = causal_lm(64, family="gpt2", layers=2, width=16, heads=2)
    policy = wraps_blocks(["GPT2Block", "LlamaDecoderLayer"])
    wrapped = [
        name
        for name, module in model.named_modules()
        if policy(module=module, recurse=False, nonwrapped_numel=0)
    ]
    assert wrapped == ["transformer.h.0", "transformer.h.1"]
    # FSDP walks the whole tree: the policy always says to look inside.
    assert policy(module=model, recurse=True, nonwrapped_numel=0)


def test_the_fsdp_config_builds_lightnings_strategy() -> None:
    cfg = compose(["task=language_modeling", "trainer=fsdp"])
    assert cfg.trainer.strategy._target_ == "distill_zoo.engine.fsdp.fsdp_strategy"
    strategy = fsdp_strategy(**{k: v for k, v in cfg.trainer.strategy.items() if k[0] != "_"})
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"]  # frozen teacher and student in one unit
    # bf16-mixed: bf16 weights, fp32 gradient reduction, buffers (a top-k cache) untouched.
    mixed = strategy.mixed_precision
    assert cfg.trainer.precision == "bf16-mixed"
    assert (mixed.param_dtype, mixed.reduce_dtype, mixed.buffer_dtype) == (
        torch.bfloat16,
        torch.float32,
        None,
    )
    with pytest.raises(ValueError, match="sharding_strategy='FULL' is not one of"):
        fsdp_strategy(sharding_strategy="FULL")
    with pytest.raises(ValueError, match="block_classes is empty"):
        fsdp_strategy(block_classes=[])


def test_a_misspelt_block_class_fails_before_anything_is_sharded() -> None:
    strategy = fsdp_strategy(block_classes=["GPT2block"])
    module = torch.nn.Module()
    module.student = causal_lm(64, family="gpt2", layers=1, width=16, heads=2)
    strategy._lightning_module = module
    with pytest.raises(ValueError, match="names no module.*Their block classes: GPT2Block"):
        strategy.setup(trainer=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_token_kd_trains_under_fsdp(tmp_path, teacher_store) -> None:
    cfg = compose(
        [
            "task=language_modeling",
            "trainer=fsdp",
            "trainer.devices=1",
            "distiller=token_kd",
            "student.width=64",
            "teacher=lm_gpt2_2x128",
            "data.block_size=64",
            "logger=csv",
            "callbacks=none",
            "report_compression=false",
            "epochs=1",
            "+trainer.limit_train_batches=8",
            "+trainer.limit_val_batches=2",
            "+trainer.limit_test_batches=2",
            f"teacher_store={teacher_store}",
        ]
    )
    metrics = train.run(cfg, tmp_path)
    assert metrics["test_perplexity_best"] < 256
    student = causal_lm(256, family="gpt2", layers=1, width=64, heads=4)
    load_weights(student, metrics["last_checkpoint"])  # a full, unsharded state dict
