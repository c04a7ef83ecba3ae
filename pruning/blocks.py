"""Architecture adapter: where a causal LM keeps its decoder blocks, and how to run them one by one.

Every pruning method reaches the model through this module, so supporting a new family means
adding one `Layout` entry, not copying a pipeline. Block-0 inputs are captured by running the
model until the first block and stopping there; each block then runs alone on the captured
(or already-pruned) hidden states with the same keyword arguments (masks, rotary embeddings).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class Layout:
    layers: str  # dotted path of the decoder ModuleList
    final_norm: str  # dotted path of the norm before the LM head


LLAMA_LIKE = Layout(layers="model.layers", final_norm="model.norm")
LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "phi3": LLAMA_LIKE,
    "opt": Layout(layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm"),
}


class UnsupportedArchitecture(ValueError):
    pass


def layout_of(model: PreTrainedModel) -> Layout:
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.get_submodule(layout_of(model).layers)


def final_norm(model: PreTrainedModel) -> nn.Module:
    return model.get_submodule(layout_of(model).final_norm)


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linear sub-layers of a block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


class _StopForward(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@torch.no_grad()
def capture_block_inputs(
    model: PreTrainedModel, windows: torch.Tensor, device: torch.device | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering block 0 for each window, and the keyword arguments blocks receive.

    windows: (n, seqlen) token ids. Returns (n, seqlen, hidden) on `device` (default: where
    block 0 lives) and the kwargs of the first window (identical for equal-length windows).
    """
    first = decoder_layers(model)[0]
    device = device or next(first.parameters()).device
    inputs: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kw: dict) -> None:
        hidden = args[0] if args else kw["hidden_states"]
        inputs.append(hidden.to(device))
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in windows:
            with contextlib.suppress(_StopForward):
                model(row.unsqueeze(0).to(model.device), use_cache=False)
    finally:
        handle.remove()
    # Caches and cache flags are irrelevant when blocks run alone on full windows.
    for key in ("past_key_values", "past_key_value", "cache", "use_cache", "cache_position"):
        kwargs.pop(key, None)
    return torch.cat(inputs), to_device(kwargs, device)


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside `value` (nested tuples, lists, dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One block on (batch, seqlen, hidden) states; returns the output hidden states."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_layers(
    layers: Sequence[nn.Module],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    batch_size: int | None = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consecutive layers over cached states (n, seqlen, hidden), `batch_size` windows at a time (None:
    all at once), each batch moved to the layers' device; the results are written into `out`
    (any device, e.g. host memory when offloading) or returned as a new tensor. Gradients follow the
    caller: calibration passes run this under no_grad, training steps through it."""
    device = next(layers[0].parameters()).device if layers else hidden.device
    step = batch_size or len(hidden)
    pieces = []
    for start in range(0, len(hidden), step):
        h = hidden[start : start + step].to(device)
        for layer in layers:
            h = run_block(layer, h, kwargs)
        if out is None:
            pieces.append(h)
        else:
            out[start : start + step] = h.to(out.device)
    return torch.cat(pieces) if out is None else out
