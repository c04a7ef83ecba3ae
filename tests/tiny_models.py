"""Tiny randomly initialised models built from a config, for fast unit tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from variants.format import BaseModelRef, VariantManifest
from variants.write import save_variant

TINY_VOCAB = 49152  # the default model's tokenizer, so tiny models can share it


# Fields every tiny config shares; each builder adds its architecture's own names.
COMMON = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=512, eos_token_id=2, pad_token_id=2)


def _build(model_cls, config_cls, seed: int, **fields):
    torch.manual_seed(seed)
    return model_cls(config_cls(**COMMON, **fields)).eval()


def tiny_llama(layers: int = 4, seed: int = 0, vocab_size: int = TINY_VOCAB) -> LlamaForCausalLM:
    return _build(
        LlamaForCausalLM,
        LlamaConfig,
        seed,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        bos_token_id=1,
    )


def tiny_qwen2(layers: int = 4, seed: int = 0, vocab_size: int = TINY_VOCAB) -> Qwen2ForCausalLM:
    return _build(
        Qwen2ForCausalLM,
        Qwen2Config,
        seed,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_key_value_heads=2,
        vocab_size=vocab_size,
    )


def tiny_opt(layers: int = 4, seed: int = 0, vocab_size: int = TINY_VOCAB) -> OPTForCausalLM:
    return _build(
        OPTForCausalLM,
        OPTConfig,
        seed,
        ffn_dim=128,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        word_embed_proj_dim=64,
        bos_token_id=1,
    )


def save_tiny_variant(out: Path, tokenizer, layers: int = 2) -> Path:
    """A tiny random Llama saved as a trimserve variant (the input of CLI tests)."""
    manifest = VariantManifest(name="tiny", base=BaseModelRef(source="random"), method="none")
    save_variant(tiny_llama(layers=layers), tokenizer, out, manifest)
    return out


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "opt": tiny_opt}
