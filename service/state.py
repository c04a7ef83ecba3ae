"""What the running server holds: its settings, metrics, loaded variants and experiments."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from service.ab import Experiment
from service.engine.types import Engine
from service.errors import APIError, model_not_found
from service.metrics import Metrics
from service.registry import LoadedModel
from service.settings import Settings


class ManagedEngine(Engine, Protocol):
    """An engine the server starts at startup and shuts down at exit."""

    async def start(self) -> None: ...

    async def shutdown(self, timeout: float) -> None: ...


@dataclass
class Variant:
    """One servable model: its engine, tokenizer and load record."""

    name: str
    engine: ManagedEngine
    loaded: LoadedModel

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    variants: dict[str, Variant] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    ready: bool = False
    rng: random.Random = field(default_factory=random.Random)

    def names(self) -> list[str]:
        return [*self.variants, *self.experiments]

    def resolve(self, model: str, key: str | None) -> Variant:
        """A variant by name, or the arm an experiment assigns to this key (404 otherwise)."""
        if model in self.variants:
            return self.variants[model]
        if model in self.experiments:
            return self.variants[self.experiments[model].pick(key, self.rng)]
        raise model_not_found(model, self.names())

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise APIError(404, f"variant {name!r} not found; loaded: {', '.join(self.variants)}", "name", "not_found")
        return self.variants[name]
