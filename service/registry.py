"""Which models the server loads, and loading them with their manifests and measurements.

Three sources, first match wins: `--model NAME=PATH` (settings.models), a config file (TOML or
YAML: `models = [{name, source|path, dtype, device}]`, optional `ab`), or the default: the
embedded default model as `full` plus every variant in the variants directory built from it.
"""

from __future__ import annotations

import logging
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pruning.artifacts import MANIFEST, VariantError, VariantManifest, read_manifest, weight_stats
from pruning.models import DEFAULT_MODEL, ModelLoadError, load_model, resolve_dtype, resolve_model, variants_dir
from service.memory import process_rss_bytes
from service.settings import ModelSpec, Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model in memory plus what the server reports about it."""

    name: str
    source: str
    dtype: str
    dtype_reason: str  # why this dtype (`requested`, or what `auto` found)
    device: torch.device
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    manifest: VariantManifest | None
    load_seconds: float
    load_rss_bytes: int
    params_total: int
    params_nonzero: int
    weight_bytes: int
    loaded_at: float


def parse_model_arg(text: str) -> ModelSpec:
    """`depth8=PATH` (native), `depth8=http://host:8000/v1` (url) or `depth8=vllm:PATH` (vllm)."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--model {text!r}: expected NAME=PATH, NAME=URL or NAME=vllm:PATH")
    backend = "vllm" if source.startswith("vllm:") else None
    try:
        return ModelSpec(name=name, source=source.removeprefix("vllm:"), backend=backend)
    except ValidationError as err:
        raise ValueError(f"--model {text!r}: {err.errors()[0]['msg']}") from None


def read_config(path: Path) -> tuple[list[ModelSpec], dict[str, dict[str, int]]]:
    """Models and A/B experiments from a TOML or YAML file."""
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"{path}: config must be .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot parse: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
        raise ValueError(f"{path}: expected a table with a `models` list")
    specs = []
    for i, entry in enumerate(data.get("models", [])):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: models[{i}] is not a table")
        entry = dict(entry)
        if "path" in entry and "source" not in entry:
            entry["source"] = entry.pop("path")
        try:
            specs.append(ModelSpec(**entry))
        except (ValidationError, TypeError) as err:
            raise ValueError(f"{path}: models[{i}]: {err}") from None
    ab = data.get("ab", {})
    if not isinstance(ab, dict):
        raise ValueError(f"{path}: `ab` must map experiment names to {{variant: weight}}")
    return specs, {str(k): {str(v): int(w) for v, w in arms.items()} for k, arms in ab.items()}


def default_specs(directory: Path, base: str = DEFAULT_MODEL) -> list[ModelSpec]:
    """The default model as `full`, then each variant directory whose manifest says it came from it."""
    specs = [ModelSpec(name="full", source=base)]
    if not directory.is_dir():
        return specs
    for folder in sorted(p for p in directory.iterdir() if (p / MANIFEST).is_file()):
        try:
            manifest = read_manifest(folder)
        except VariantError as err:
            log.warning("skipping %s: %s", folder, err)
            continue
        if manifest.base.source != base:
            continue
        name = folder.name
        if any(s.name == name for s in specs):
            log.warning("skipping %s: a model named %r is already listed", folder, name)
            continue
        try:
            specs.append(ModelSpec(name=name, source=str(folder)))
        except ValidationError:
            log.warning("skipping %s: %r is not a usable model name", folder, name)
    return specs


def model_specs(settings: Settings) -> tuple[list[ModelSpec], dict[str, dict[str, int]]]:
    """The models to load and the experiments to run, with dtype/device defaults filled in."""
    ab = dict(settings.ab)
    if settings.models:
        specs = list(settings.models)
    elif settings.config_file is not None:
        specs, file_ab = read_config(settings.config_file)
        ab = {**file_ab, **ab}
        if not specs:
            raise ValueError(f"{settings.config_file}: no models listed")
    else:
        specs = default_specs(settings.variants_dir or variants_dir())
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model names must be unique; repeated: {duplicates}")
    filled = [
        spec.model_copy(update={"dtype": spec.dtype or settings.dtype, "device": spec.device or settings.device})
        for spec in specs
    ]
    return filled, ab


def read_manifest_json(directory: Path) -> dict | None:
    """A variant directory's manifest as JSON (None when it is not a variant)."""
    return read_manifest(directory).model_dump(mode="json") if (directory / MANIFEST).is_file() else None


def _manifest_of(source: str) -> VariantManifest | None:
    path = Path(resolve_model(source))
    return read_manifest(path) if (path / MANIFEST).is_file() else None


def weight_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def load_one(spec: ModelSpec) -> LoadedModel:
    """Load, verify (manifest hashes) and measure one model."""
    device = spec.device or "cpu"
    dtype, dtype_reason = resolve_dtype(spec.dtype or "auto", device)
    log.info("%s: dtype %s, %s", spec.name, dtype, dtype_reason)
    rss_before, start = process_rss_bytes(), time.perf_counter()
    try:
        model, tokenizer = load_model(spec.source, dtype=dtype, device=device, verify=True)
        manifest = _manifest_of(spec.source)
    except (ModelLoadError, VariantError) as err:
        raise type(err)(f"model {spec.name!r}: {err}") from err
    seconds = time.perf_counter() - start
    counts, _ = weight_stats(model)
    loaded = LoadedModel(
        name=spec.name,
        source=spec.source,
        dtype=dtype,
        dtype_reason=dtype_reason,
        device=next(model.parameters()).device,
        model=model,
        tokenizer=tokenizer,
        manifest=manifest,
        load_seconds=seconds,
        load_rss_bytes=max(0, process_rss_bytes() - rss_before),
        params_total=counts.total,
        params_nonzero=counts.nonzero,
        weight_bytes=weight_bytes(model),
        loaded_at=time.time(),
    )
    log.info(
        "loaded %s from %s (%s, %s) in %.1f s: %.1fM params (%.1fM non-zero), %.0f MB weights%s",
        spec.name,
        spec.source,
        dtype,
        loaded.device,
        seconds,
        counts.total / 1e6,
        counts.nonzero / 1e6,
        loaded.weight_bytes / 1e6,
        f", manifest method {manifest.method}" if manifest else "",
    )
    return loaded
