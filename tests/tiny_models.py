"""Tiny randomly initialised models built from a config, for fast unit tests."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_VOCAB = 49152  # the default model's tokenizer, so tiny models can share it


def tiny_llama(layers: int = 4, seed: int = 0, vocab_size: int = TINY_VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(layers: int = 4, seed: int = 0, vocab_size: int = TINY_VOCAB) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_opt(layers: int = 4, seed: int = 0, vocab_size: int = TINY_VOCAB) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        word_embed_proj_dim=64,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
    )
    return OPTForCausalLM(config).eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "opt": tiny_opt}
