"""Causal language models from Hugging Face ``transformers`` (the ``text`` extra).

:func:`causal_lm` builds a GPT-2- or Llama-style decoder from a handful of sizes (the
``conf/student/lm_*`` and ``conf/teacher/lm_*`` configs), or loads one saved with
``save_pretrained`` from a local folder (``pretrained: <path>``; nothing is downloaded).
The models are the library's own classes, unchanged: their forward returns an output object
whose ``logits`` are ``[B, L, V]``; :func:`lm_logits` reads them (and works on any module
that returns the logits tensor itself). Feature taps name the decoder blocks as the library
does: ``transformer.h.<i>`` (GPT-2), ``model.layers.<i>`` (Llama); each built model lists its
blocks as ``feature_layers`` (:func:`decoder_blocks`), the stages that stage indices and
``last`` choose from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FAMILIES = ("gpt2", "llama")

BLOCK_PREFIX = {"gpt2": "transformer.h", "llama": "model.layers"}
"""Where each family keeps its decoder blocks (the names feature taps use)."""


def require_transformers():
    """The ``transformers`` module, or an error that names the extra to install."""
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "task=language_modeling needs Hugging Face transformers: pip install -e '.[text]'"
        ) from error
    return transformers


def causal_lm(
    num_classes: int,
    in_channels: int | None = None,
    *,
    family: str = "gpt2",
    layers: int = 2,
    width: int = 128,
    heads: int = 4,
    mlp_ratio: int = 4,
    max_positions: int = 512,
    dropout: float = 0.0,
    pretrained: str | None = None,
    name: str = "lm",
) -> nn.Module:
    """A causal LM over a vocabulary of ``num_classes`` tokens.

    Args:
        num_classes: Vocabulary size (the data's tokenizer; 256 for bytes).
        in_channels: Unused (the shared model interface).
        family: ``gpt2`` (learned positions, LayerNorm, GELU MLP, tied embeddings) or
            ``llama`` (rotary positions, RMSNorm, SwiGLU MLP, untied head).
        layers: Decoder blocks.
        width: Hidden size.
        heads: Attention heads (``width`` must divide by it).
        mlp_ratio: MLP hidden size over ``width``.
        max_positions: Longest sequence the model accepts (GPT-2's position table).
        dropout: Dropout of embeddings, attention and residuals.
        pretrained: A local folder written by ``save_pretrained``: the model is loaded from it
            and the sizes above are ignored (its vocabulary must cover the data's).
        name: A label for summaries; it does not change the model.
    """
    transformers = require_transformers()
    if pretrained:
        return load_pretrained(pretrained, num_classes)
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    if layers < 1 or width < 1 or heads < 1 or width % heads:
        raise ValueError(
            f"a causal LM needs layers >= 1 and a width divisible by heads, got layers={layers}, "
            f"width={width}, heads={heads}"
        )
    # No bos/eos ids: generation here never stops early, and byte vocabularies have no such
    # tokens (GPT-2's defaults, 50256, lie outside a 256-token vocabulary).
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=num_classes,
            n_positions=max_positions,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_inner=mlp_ratio * width,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **special,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=num_classes,
            hidden_size=width,
            intermediate_size=mlp_ratio * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
            **special,
        )
        model = transformers.LlamaForCausalLM(config)
    model.name = name
    model.feature_layers = decoder_blocks(model)
    return model


def load_pretrained(path: str | Path, vocab_size: int) -> nn.Module:
    """A causal LM saved with ``save_pretrained`` in the local folder ``path``."""
    transformers = require_transformers()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained={path}: no config.json there. Give a local folder written by "
            "model.save_pretrained(folder) (nothing is downloaded from the hub)"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    check_vocabulary(model, vocab_size, f"the model in {folder}")
    model.feature_layers = decoder_blocks(model)
    return model


def decoder_blocks(model: nn.Module) -> list[str]:
    """Names of the decoder blocks in forward order (the stages feature methods choose from
    when a config lists no ``feature_layers``): the children of the first ``ModuleList``
    with one entry per hidden layer (``transformer.h.<i>``, ``model.layers.<i>``)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (count is None or len(module) == count):
            return [f"{name}.{i}" for i in range(len(module))]
    return []


def model_vocabulary(model: nn.Module) -> int | None:
    """The vocabulary size a Hugging Face model declares (``None`` for other modules)."""
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def check_vocabulary(model: nn.Module, vocab_size: int, what: str) -> None:
    """Fails when ``model`` cannot predict every token id of a ``vocab_size`` tokenizer."""
    own = model_vocabulary(model)
    if own is not None and own < vocab_size:
        raise ValueError(
            f"{what} has a vocabulary of {own} tokens, but the data's tokenizer has "
            f"{vocab_size}: teacher, student and data must share a vocabulary (use the "
            "model's own tokenizer: data.tokenizer=<its folder>)"
        )


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a Hugging Face model reads (``None``: no limit it declares)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)  # GPT-2: its n_positions
    return None if positions is None else int(positions)


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generate")


def lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``[B, L, V]`` next-token logits of ``model`` for ``input_ids`` (no key/value cache
    is built: training and evaluation see whole sequences)."""
    output: Any = model(input_ids, use_cache=False) if is_hf_model(model) else model(input_ids)
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"{type(model).__name__} returned {type(output).__name__}: a language model must "
            "return the logits tensor or an object with .logits"
        )
    return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Tensor,
    new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    num_beams: int = 1,
) -> Tensor:
    """``prompts`` ``[B, P]`` followed by ``new_tokens`` tokens drawn from ``model``.

    ``temperature == 0``: greedy (the most probable token each step), or beam search with
    ``num_beams > 1`` (Hugging Face models); otherwise sampling from
    ``softmax(logits / temperature)`` (over the ``top_k`` most probable tokens when set). The
    library's ``generate`` (with its key/value cache) runs Hugging Face models; other modules
    are run on the whole sequence at every step. The model's train/eval mode is restored.
    """
    if new_tokens < 1:
        return prompts
    was_training = model.training
    model.eval()
    try:
        if is_hf_model(model):
            options: dict[str, Any] = {"do_sample": temperature > 0, "num_beams": num_beams}
            if temperature > 0:
                options.update(temperature=temperature, top_k=top_k or 0, top_p=1.0)
            else:  # the library's sampling defaults would only raise warnings here
                options.update(temperature=None, top_k=None, top_p=None)
            return model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **options,
            )
        if num_beams > 1:
            raise ValueError("beam search (num_beams > 1) needs a Hugging Face model")
        sequence = prompts
        for _ in range(new_tokens):
            logits = lm_logits(model, sequence)[:, -1].float()
            if temperature > 0:
                if top_k:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial((logits / temperature).softmax(-1), 1)
            else:
                token = logits.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], 1)
        return sequence
    finally:
        model.train(was_training)
