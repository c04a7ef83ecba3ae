"""Layer surgery: delete or replace decoder layers so the result is a standard checkpoint.

After surgery the layers are renumbered `0 .. N-1` (the ModuleList is rebuilt), the config's
`num_hidden_layers` and every per-layer list (`layer_types`, ...) match the new depth, and each
module's `layer_idx` is its new position, so the KV cache indexes the right slot.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import PreTrainedModel

from pruning.blocks import decoder_layers, layout_of

log = logging.getLogger(__name__)

# Config lists that happen to be short but are not per-layer.
NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"})


def check_removal(num_layers: int, remove: list[int]) -> list[int]:
    """Validated, sorted, unique layer indices; raises ValueError before any work."""
    unique = sorted(set(remove))
    if not unique:
        raise ValueError("no layers to remove")
    if len(unique) != len(remove):
        raise ValueError(f"duplicate layer indices in {remove}")
    if unique[0] < 0 or unique[-1] >= num_layers:
        raise ValueError(f"layer indices must be in 0 .. {num_layers - 1}, got {remove}")
    if len(unique) >= num_layers:
        raise ValueError(f"cannot remove {len(unique)} of {num_layers} layers: at least one must remain")
    return unique


def per_layer_lists(config, num_layers: int) -> list[str]:
    """Names of config attributes that are lists with one entry per layer."""
    names = []
    for key, value in vars(config).items():
        if key not in NOT_PER_LAYER and isinstance(value, list | tuple) and len(value) == num_layers:
            names.append(key)
    return names


def set_layers(model: PreTrainedModel, layers: list[nn.Module], keep: list[int]) -> None:
    """Install `layers` as the decoder stack; `keep[j]` is the old position (or -1) of new layer j.

    Slices per-layer config lists by `keep` (a replacement at -1 takes its window's first entry,
    given as the old index in `keep`), sets num_hidden_layers and renumbers `layer_idx`.
    """
    config = model.config
    old = config.num_hidden_layers
    for key in per_layer_lists(config, old):
        value = getattr(config, key)
        setattr(config, key, type(value)(value[i] for i in keep))
    layout = layout_of(model)
    parent_name, _, attr = layout.layers.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, nn.ModuleList(layers))
    config.num_hidden_layers = len(layers)
    renumber(model)
    log.info("depth: %d -> %d layers", old, len(layers))


def renumber(model: PreTrainedModel) -> None:
    """Set every `layer_idx` attribute inside layer j to j (attention modules read it for the cache)."""
    for j, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j


def remove_layers(model: PreTrainedModel, remove: list[int]) -> PreTrainedModel:
    """Delete the given layers in place; returns the model."""
    layers = list(decoder_layers(model))
    drop = set(check_removal(len(layers), list(remove)))
    keep = [i for i in range(len(layers)) if i not in drop]
    set_layers(model, [layers[i] for i in keep], keep)
    return model


def replace_window(model: PreTrainedModel, start: int, size: int, replacement: nn.Module) -> PreTrainedModel:
    """Replace layers start .. start+size-1 by one module in place (net removal size - 1)."""
    layers = list(decoder_layers(model))
    num_layers = len(layers)
    if size < 2:
        raise ValueError(f"a replaced window needs at least 2 layers (got {size})")
    if start < 0 or start + size > num_layers:
        raise ValueError(f"window {start} .. {start + size - 1} runs past the last layer ({num_layers - 1})")
    if size >= num_layers:
        raise ValueError(f"window of {size} layers covers the whole {num_layers}-layer model")
    keep = [*range(start), start, *range(start + size, num_layers)]
    new = [*layers[:start], replacement, *layers[start + size :]]
    set_layers(model, new, keep)
    return model
