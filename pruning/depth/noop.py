"""Decoder layers whose attention is a no-op: the export layout of an FFN (SwiGLU) replacement.

An FFN replacement is a Llama-style decoder layer with no attention: h + MLP(norm(h)). It is saved
as an ordinary checkpoint of the base architecture in which the listed layers have no attention
weights and no input norm, and the config lists them under `trimserve_noop_attention`.
`pruning.models.load_model` restores those layers (see `restore_noop_layers`); standard runtimes
(vanilla transformers, vLLM, llama.cpp) cannot load such a checkpoint correctly.

`NoOpAttention` subclasses `nn.Identity` so the serving engine's compact Llama forward treats the
layer as attention-free; under the Hugging Face forward it returns zeros (an exact residual skip)
and writes a one-value-per-token placeholder to a dynamic KV cache so the cache still reports the
right sequence length when the no-op layer is layer 0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from pruning.blocks import decoder_layers, layout_of

NOOP_KEY = "trimserve_noop_attention"
NOOP_NOTE = (
    "FFN replacement: decoder layer(s) {layers} have no attention (config key trimserve_noop_attention); "
    "pruning.models.load_model restores them, standard runtimes (vanilla transformers, vLLM, llama.cpp) "
    "cannot load this checkpoint correctly"
)


class NoOpAttention(nn.Identity):
    """Attention that contributes nothing: returns (zeros, None)."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        if cache is not None:
            b, t = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(b, 1, t, 1)  # (batch, 1 head, tokens, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


def check_ffn_support(model: PreTrainedModel) -> None:
    """FFN replacement needs a Llama-like layer (self_attn, input_layernorm, gated mlp)."""
    layer = decoder_layers(model)[0]
    if layout_of(model).layers != "model.layers" or not all(
        hasattr(layer, name) for name in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
    ):
        raise ValueError(f"FFN replacement needs a Llama-like architecture, not {model.config.model_type!r}")


def make_noop(layer: nn.Module, layer_idx: int) -> nn.Module:
    """The layer with its attention and input norm removed (in place); returns it."""
    layer.self_attn = NoOpAttention(layer_idx)
    layer.input_layernorm = nn.Identity()
    return layer


def ffn_layer(template: nn.Module, layer_idx: int) -> nn.Module:
    """A SwiGLU FFN block (pre-norm, residual) initialised from `template`'s MLP and its norm."""
    return make_noop(copy.deepcopy(template), layer_idx)


def mark_noop_layers(model: PreTrainedModel) -> list[int]:
    """Record the current no-op layers in the config (after surgery renumbered them)."""
    noop = [i for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.self_attn, NoOpAttention)]
    setattr(model.config, NOOP_KEY, noop)
    return noop


def restore_noop_layers(model: PreTrainedModel) -> PreTrainedModel:
    """Turn the layers listed in the config back into no-op layers (after a plain load)."""
    noop = getattr(model.config, NOOP_KEY, None) or []
    layers = decoder_layers(model)
    for i in noop:
        if not 0 <= i < len(layers):
            raise ValueError(f"{NOOP_KEY} lists layer {i}, but the model has {len(layers)} layers")
        make_noop(layers[i], i)
    return model


def missing_noop_keys(model: PreTrainedModel) -> set[str]:
    """State-dict keys a plain load reports missing for the no-op layers (attention, input norm)."""
    prefix = layout_of(model).layers
    noop = getattr(model.config, NOOP_KEY, None) or []
    keys = set()
    for i in noop:
        layer = decoder_layers(model)[i]
        for part in ("self_attn", "input_layernorm"):
            module = getattr(layer, part)
            keys |= {f"{prefix}.{i}.{part}.{name}" for name, _ in module.named_parameters()}
    return keys


def has_noop_layers(source: str) -> bool:
    """Whether a checkpoint directory's config lists no-op layers (cheap: reads config.json only)."""
    path = Path(source) / "config.json"
    return path.is_file() and bool(json.loads(path.read_text()).get(NOOP_KEY))


def load_noop_checkpoint(source: str, dtype: torch.dtype) -> PreTrainedModel:
    """Load a checkpoint with no-op layers; every missing weight must belong to a no-op layer."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loader would list the deliberately absent weights
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = set(info.get("missing_keys", ())) - missing_noop_keys(model)
    if unexpected or info.get("unexpected_keys"):
        raise ValueError(
            f"{source}: checkpoint does not match its no-op layout "
            f"(missing {sorted(unexpected)[:5]}, unexpected {sorted(info.get('unexpected_keys', ()))[:5]})"
        )
    return restore_noop_layers(model)
