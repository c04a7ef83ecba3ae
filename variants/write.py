"""Writing variants: the checkpoint, its measured manifest, and for sparse variants a compressed copy.

`save_variant` measures the model (parameter counts, per-layer sparsity), writes the checkpoint
with `save_pretrained` (FFN-only replacement blocks recorded in the config, `variants.noop`) and
the manifest with every weight file's sha256, atomically. `write_sparse_variant` adds the bitmask
copy (`variants.compressed`) and the storage sizes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from variants.compressed import COMPRESSED_PATH, save_compressed, unique_state
from variants.format import (
    ParamCounts,
    VariantManifest,
    library_versions,
    sha256_file,
    staged_directory,
    weight_files,
    write_manifest,
)
from variants.noop import mark_noop_layers


def decoder_layer_of(name: str) -> str | None:
    """'model.layers.3.mlp.up_proj.weight' -> 'layers.3' (None outside the decoder stack)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return f"{part}.{parts[i + 1]}"
    return None


def weight_stats(model: torch.nn.Module) -> tuple[ParamCounts, dict[str, float]]:
    """Parameter counts, and the fraction of zeros in each decoder layer's 2-D weights."""
    total = nonzero = 0
    zeros: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embeddings count once
            continue
        seen.add(id(param))
        n, nz = param.numel(), int(torch.count_nonzero(param))
        total, nonzero = total + n, nonzero + nz
        layer = decoder_layer_of(name)
        if layer is not None and param.dim() == 2:
            acc = zeros.setdefault(layer, [0, 0])
            acc[0] += n - nz
            acc[1] += n
    sparsity = {layer: z / n for layer, (z, n) in zeros.items()}
    return ParamCounts(total=total, nonzero=nonzero), sparsity


def save_variant(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    manifest: VariantManifest,
) -> VariantManifest:
    """Write the checkpoint and its manifest atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    params, sparsity = weight_stats(model)
    manifest = manifest.model_copy(
        update={
            "versions": manifest.versions or library_versions(),
            "created": manifest.created or datetime.now(UTC).isoformat(timespec="seconds"),
            "num_layers": model.config.num_hidden_layers,
            "params": params,
            "layer_sparsity": sparsity,
        }
    )
    with staged_directory(out_dir) as tmp:
        mark_noop_layers(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "generation_config.json").is_file():
            model.generation_config.save_pretrained(tmp)
        manifest.files = {f.name: sha256_file(f) for f in weight_files(tmp)}
        write_manifest(tmp, manifest)
    return manifest


def write_sparse_variant(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    manifest: VariantManifest,
    compressed: bool = True,
) -> VariantManifest:
    """Dense checkpoint (+ compressed copy) staged next to out_dir, then renamed into place."""
    with staged_directory(out_dir) as staging:
        manifest = save_variant(model, tokenizer, staging, manifest)
        storage = {"dense_bytes": sum(f.stat().st_size for f in weight_files(staging))}
        if compressed:
            storage["compressed_bytes"] = save_compressed(unique_state(model), staging / COMPRESSED_PATH)
            storage["compressed_file"] = COMPRESSED_PATH
            storage["compressed_sha256"] = sha256_file(staging / COMPRESSED_PATH)
        manifest.stats["storage"] = storage
        write_manifest(staging, manifest)
    return manifest
