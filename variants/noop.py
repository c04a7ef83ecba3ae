"""The export layout of FFN-only decoder layers (LLM-Streamline's `ffn` replacement, `pruning.depth.ffn`).

Such a variant is an ordinary checkpoint of the base architecture in which the listed layers have
no attention weights and no input norm, and the config lists them under
`trimserve_noop_attention`. `variants.load.load_model` restores those layers; standard runtimes
(vanilla transformers, vLLM, llama.cpp) cannot load such a checkpoint correctly. `noop_layers`
tells which layers of a loaded model are attention-free (the serving engine skips their attention).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from pruning.blocks import decoder_layers, layout_of
from pruning.depth.ffn import NoOpAttention, make_noop

NOOP_KEY = "trimserve_noop_attention"
NOOP_NOTE = (
    "FFN replacement: decoder layer(s) {layers} have no attention (config key trimserve_noop_attention); "
    "trimserve's loader restores them, standard runtimes (vanilla transformers, vLLM, llama.cpp) "
    "cannot load this checkpoint correctly"
)


def noop_layers(model: PreTrainedModel | nn.Module) -> list[int]:
    """Indices of the decoder layers whose attention is a no-op."""
    layers = decoder_layers(model)
    return [i for i, layer in enumerate(layers) if isinstance(getattr(layer, "self_attn", None), NoOpAttention)]


def mark_noop_layers(model: PreTrainedModel) -> list[int]:
    """Record the current no-op layers in the config before saving (after surgery renumbered them)."""
    noop = noop_layers(model)
    if noop or hasattr(model.config, NOOP_KEY):
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


def load_noop_checkpoint(source: str, dtype: torch.dtype, config: PreTrainedConfig | None = None) -> PreTrainedModel:
    """Load a checkpoint with no-op layers; every missing weight must belong to a no-op layer."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loader would list the deliberately absent weights
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = set(info.get("missing_keys", ())) - missing_noop_keys(model)
    if unexpected or info.get("unexpected_keys"):
        raise ValueError(
            f"{source}: checkpoint does not match its no-op layout "
            f"(missing {sorted(unexpected)[:5]}, unexpected {sorted(info.get('unexpected_keys', ()))[:5]})"
        )
    return restore_noop_layers(model)
