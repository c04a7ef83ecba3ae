"""A/B experiments: a name clients send as `model`, split over variants by weight.

A request with a key (`user` field or `X-AB-Key` header) always lands on the same arm: the arm is
chosen by sha256(experiment, key), so the split is sticky across requests, restarts and replicas.
Requests without a key are split at random by the same weights.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[tuple[str, int], ...]  # (variant, weight), in the configured order

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError(f"experiment {self.name!r} has no arms")
        if any(w < 0 for _, w in self.arms) or self.total <= 0:
            raise ValueError(f"experiment {self.name!r}: weights must be >= 0 with a positive sum")
        names = [v for v, _ in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r} names a variant twice")

    @property
    def total(self) -> int:
        return sum(w for _, w in self.arms)

    def pick(self, key: str | None, rng: random.Random | None = None) -> str:
        """The arm for this key (sticky), or a weighted random arm without one."""
        if key is None:
            point = (rng or random).randrange(self.total)
        else:
            digest = hashlib.sha256(f"{self.name}\x00{key}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") % self.total
        for variant, weight in self.arms:
            if point < weight:
                return variant
            point -= weight
        raise AssertionError("unreachable: point < total")


def parse_ab(text: str) -> Experiment:
    """`chat=full:80,depth8:20` -> Experiment('chat', (('full', 80), ('depth8', 20)))."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise ValueError(f"--ab {text!r}: expected NAME=VARIANT:WEIGHT,VARIANT:WEIGHT")
    arms = []
    for part in spec.split(","):
        variant, colon, weight = part.strip().partition(":")
        if not colon or not variant:
            raise ValueError(f"--ab {text!r}: arm {part!r} is not VARIANT:WEIGHT")
        try:
            arms.append((variant, int(weight)))
        except ValueError:
            raise ValueError(f"--ab {text!r}: weight {weight!r} is not an integer") from None
    return Experiment(name.strip(), tuple(arms))


def experiments_from(config: dict[str, dict[str, int]], variants: set[str]) -> dict[str, Experiment]:
    """Build experiments from settings, checking they name loaded variants and no variant's name."""
    experiments = {}
    for name, arms in config.items():
        if name in variants:
            raise ValueError(f"experiment {name!r} has the same name as a variant")
        experiment = Experiment(name, tuple(arms.items()))
        unknown = sorted({v for v, _ in experiment.arms} - variants)
        if unknown:
            raise ValueError(f"experiment {name!r} names unknown variants {unknown}; loaded: {sorted(variants)}")
        experiments[name] = experiment
    return experiments
