"""Which models the server serves, and with which backend (no loading here; no torch).

Three sources, first match wins: `--model NAME=SOURCE` (settings.models), a config file (TOML or
YAML: `models = [{name, source|path|url, backend, dtype, device, ...}]`, optional `ab`), or the
default: the embedded default model as `full` plus every variant in the variants directory built
from it.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import yaml
from pydantic import ValidationError

from service.settings import ModelSpec, Settings
from variants.format import MANIFEST, VariantError, read_manifest
from variants.store import DEFAULT_MODEL, variants_dir

log = logging.getLogger(__name__)


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
