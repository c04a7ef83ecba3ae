"""FFN-only decoder layers: a Llama-style layer whose attention contributes nothing, h + MLP(norm(h)).

LLM-Streamline's `ffn` replacement is such a layer. `NoOpAttention` returns zeros (an exact
residual skip under the Hugging Face forward) and writes a one-value-per-token placeholder to a
dynamic KV cache, so the cache still reports the right sequence length when the layer is layer 0.
How such layers are saved and loaded is the variant format's business (`variants.noop`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from pruning.blocks import decoder_layers, layout_of


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
