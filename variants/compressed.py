"""Compressed storage of sparse weights: a bitmask plus the non-zero values, in safetensors.

Each sparse-enough tensor `name` is stored as `name.bitmask` (uint8, one bit per entry,
numpy `packbits` order over the flattened tensor) and `name.values` (the entries whose bits
are not all zero, in order); other tensors are stored as they are. The file's metadata
records every compressed tensor's shape and dtype. Zero is tested on the raw bits, so -0.0
and every other value load back bit-exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

META_KEY = "trimserve.sparse"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """True where an entry's bit pattern is not all zeros (so -0.0 counts as non-zero)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()]) != 0


def worth_compressing(tensor: torch.Tensor) -> bool:
    """Bitmask + values is smaller than dense storage (needs > 1/(8*itemsize) zeros)."""
    if tensor.dim() < 2 or tensor.element_size() not in _INT_VIEW:
        return False
    density = float(nonzero_bits(tensor).float().mean())
    return density + 1 / (8 * tensor.element_size()) < 1


def compress_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the compressed form of a state dict (shared tensors stored once)."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if not worth_compressing(tensor):
            tensors[name] = tensor.clone()
            continue
        keep = nonzero_bits(tensor).flatten()
        tensors[f"{name}.bitmask"] = torch.from_numpy(np.packbits(keep.numpy()))
        tensors[f"{name}.values"] = tensor.flatten()[keep].clone()
        layout[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    return tensors, {META_KEY: json.dumps(layout)}


def decompress_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Inverse of `compress_state`."""
    layout = json.loads(metadata.get(META_KEY, "{}"))
    state = {name: t for name, t in tensors.items() if name.rsplit(".", 1)[0] not in layout}
    for name, info in layout.items():
        numel = int(np.prod(info["shape"])) if info["shape"] else 1
        bits = np.unpackbits(tensors[f"{name}.bitmask"].numpy(), count=numel).astype(bool)
        dense = torch.zeros(numel, dtype=getattr(torch, info["dtype"]))
        dense[torch.from_numpy(bits)] = tensors[f"{name}.values"]
        state[name] = dense.view(info["shape"])
    return state


def save_compressed(state: dict[str, torch.Tensor], path: str | Path) -> int:
    """Write the compressed file; returns its size in bytes."""
    tensors, metadata = compress_state(state)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return Path(path).stat().st_size


def load_compressed(path: str | Path) -> dict[str, torch.Tensor]:
    """The exact state dict that was saved."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if META_KEY not in metadata:
            raise ValueError(f"{path}: not a trimserve compressed sparse file (no {META_KEY} metadata)")
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return decompress_state(tensors, metadata)


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (the first name of each shared tensor is kept)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor
    return state


COMPRESSED_PATH = "compressed/model.safetensors"  # inside a variant directory


def load_compressed_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A variant's model rebuilt from its compressed file (config.json next to it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(load_compressed(directory / COMPRESSED_PATH), strict=False)
    model.tie_weights()
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{directory}: compressed weights do not match the config ({missing=}, {unexpected=})")
    return model.eval()
