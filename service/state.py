"""What the running server holds: its settings, metrics, one backend per variant, and experiments."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from service.ab import Experiment
from service.backend import Backend
from service.errors import APIError, model_not_found
from service.metrics import Metrics
from service.settings import Settings
from service.shadow import Shadow


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    variants: dict[str, Backend] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    shadow: Shadow | None = None
    ready: bool = False
    rng: random.Random = field(default_factory=random.Random)

    def names(self) -> list[str]:
        return [*self.variants, *self.experiments]

    def resolve(self, model: str, key: str | None) -> Backend:
        """A variant by name, or the arm an experiment assigns to this key (404 otherwise)."""
        if model in self.variants:
            return self.variants[model]
        if model in self.experiments:
            return self.variants[self.experiments[model].pick(key, self.rng)]
        raise model_not_found(model, self.names())

    def variant(self, name: str) -> Backend:
        if name not in self.variants:
            raise APIError(404, f"variant {name!r} not found; loaded: {', '.join(self.variants)}", "name", "not_found")
        return self.variants[name]
