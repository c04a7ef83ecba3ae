"""Which models the server serves, and with which backend (no loading here; no torch).

Three sources, first match wins: `--model NAME=SOURCE` (settings.models), a config file (TOML or
YAML: `models = [{name, source|path|url, backend, dtype, device, ...}]`, optional `ab`), or the
default: the embedded default model as `full` plus every variant in the variants directory built
from it.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from service.settings import ModelSpec, Settings
from service.shadow import ShadowSpec
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


@dataclass(frozen=True)
class Plan:
    """What a server runs: its models, the A/B experiments over them, and the shadows."""

    models: list[ModelSpec]
    ab: dict[str, dict[str, int]] = field(default_factory=dict)  # experiment -> {variant: weight}
    shadow: list[ShadowSpec] = field(default_factory=list)


def shadow_specs(shadow: dict[str, dict[str, object]], where: str) -> list[ShadowSpec]:
    """`{reference: {variants: [...], rate: 0.1}}` (the config file's and the settings' form)."""
    specs = []
    for reference, entry in shadow.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("variants"), list):
            raise ValueError(f"{where}: shadow.{reference} needs `variants: [NAME, ...]` (and optionally `rate`)")
        specs.append(ShadowSpec(str(reference), tuple(map(str, entry["variants"])), float(entry.get("rate", 1.0))))
    return specs


def read_config(path: Path) -> Plan:
    """Models, A/B experiments and shadows from a TOML or YAML file."""
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
    experiments = {str(k): {str(v): int(w) for v, w in arms.items()} for k, arms in ab.items()}
    shadow = data.get("shadow", {})
    if not isinstance(shadow, dict):
        raise ValueError(f"{path}: `shadow` must map reference names to {{variants, rate}}")
    return Plan(specs, experiments, shadow_specs(shadow, str(path)))


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


def serve_plan(settings: Settings) -> Plan:
    """The models to load (dtype/device defaults filled in), the experiments and the shadows to run;
    the settings' experiments and shadows win over a config file's of the same name."""
    ab = dict(settings.ab)
    shadow = {spec.reference: spec for spec in shadow_specs(settings.shadow, "settings")}
    if settings.models:
        specs = list(settings.models)
    elif settings.config_file is not None:
        plan = read_config(settings.config_file)
        specs, ab = plan.models, {**plan.ab, **ab}
        shadow = {spec.reference: spec for spec in plan.shadow} | shadow
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
    for spec in shadow.values():
        unknown = sorted({spec.reference, *spec.variants} - set(names))
        if unknown:
            raise ValueError(f"shadow of {spec.reference!r} names unknown variants {unknown}; loaded: {names}")
    return Plan(filled, ab, list(shadow.values()))


def read_manifest_json(directory: Path) -> dict | None:
    """A variant directory's manifest as JSON (None when it is not a variant)."""
    return read_manifest(directory).model_dump(mode="json") if (directory / MANIFEST).is_file() else None
