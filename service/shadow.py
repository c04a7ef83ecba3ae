"""Shadow A/B: how close each variant stays to the reference model, measured on live traffic.

The reference (say `full`) answers the client. A share of its completed exchanges, chosen by a
seeded hash of the request (so one request is always or never chosen), is replayed to each
shadowed variant, which rates the reference's answer in one forward pass and no generation
(`Backend.score`): the answer's mean token NLL under the variant, and the share of its tokens that
are the variant's own greedy choice. The reference's own NLL of its answer, so drift reads as a
ratio, comes free from generation where the backend reports it (the in-process engine keeps each
token's log-probability); otherwise the reference rates its answer like a variant. Nothing here
touches the client's response: the exchange is offered only after the answer is complete, and
offering never waits.

Isolation: each model rates items from a bounded queue of its own, one at a time, and only while
it has no live request waiting and at most `busy` running; an item that finds the queue full or
the model busy is dropped and counted. Per item the extra work is one forward pass of prompt plus
answer per model, run between the engine's steps on the device it shares with live traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from service.backend import Backend, GenerationRequest, Score, ScoringUnsupported
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowSpec:
    reference: str
    variants: tuple[str, ...]
    rate: float  # share of the reference's answers replayed to the variants

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError(f"shadow of {self.reference!r} names no variant")
        if self.reference in self.variants:
            raise ValueError(f"shadow of {self.reference!r} lists the reference itself")
        if not 0 < self.rate <= 1:
            raise ValueError(f"shadow rate must be in (0, 1], got {self.rate}")


def parse_shadow(text: str) -> ShadowSpec:
    """`full=depth4,sparse40@0.1` -> ShadowSpec('full', ('depth4', 'sparse40'), 0.1) (rate 1 without @)."""
    reference, sep, rest = text.partition("=")
    names, at, rate = rest.partition("@")
    variants = tuple(v.strip() for v in names.split(",") if v.strip())
    if not sep or not reference.strip() or not variants:
        raise ValueError(f"--shadow {text!r}: expected REFERENCE=VARIANT[,VARIANT...][@RATE]")
    try:
        share = float(rate) if at else 1.0
    except ValueError:
        raise ValueError(f"--shadow {text!r}: rate {rate!r} is not a number") from None
    return ShadowSpec(reference.strip(), variants, share)


def request_key(request: GenerationRequest, seed: int) -> float:
    """A number in [0, 1) from the request's content and `seed`: the same request, the same number."""
    content = {"prompt": request.prompt, "messages": request.messages, "params": asdict(request.params)}
    digest = hashlib.sha256(f"{seed}\0{json.dumps(content, sort_keys=True, default=str)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Exchange:
    reference: str
    request: GenerationRequest
    answer: str
    answer_ids: tuple[int, ...] | None
    own_score: Score | None = None  # the answer under the reference, when its backend rated it while writing


class Shadow:
    """The queues and workers of every shadowed model; `offer` an exchange after it completed."""

    def __init__(
        self,
        specs: Iterable[ShadowSpec],
        backends: dict[str, Backend],
        metrics: Metrics,
        seed: int = 0,
        queue_size: int = 32,
        busy: int = 4,
    ) -> None:
        self.specs = {spec.reference: spec for spec in specs}
        for spec in self.specs.values():
            unknown = sorted({spec.reference, *spec.variants} - set(backends))
            if unknown:
                raise ValueError(f"shadow of {spec.reference!r} names unknown variants {unknown}")
        self.backends = backends
        self.metrics = metrics
        self.seed = seed
        self.busy = busy
        scorers = {name for spec in self.specs.values() for name in (spec.reference, *spec.variants)}
        self.queues: dict[str, asyncio.Queue[Exchange]] = {name: asyncio.Queue(queue_size) for name in scorers}
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(name, queue), name=f"shadow-{name}") for name, queue in self.queues.items()
        ]

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def offer(self, exchange: Exchange) -> bool:
        """Queue a completed exchange of a reference for its shadows, if sampled; never waits."""
        spec = self.specs.get(exchange.reference)
        if spec is None or request_key(exchange.request, self.seed) >= spec.rate:
            return False
        scorers = spec.variants
        if exchange.own_score is not None:
            self._record(spec.reference, spec.reference, exchange.own_score)
        else:
            scorers = (spec.reference, *scorers)
        for name in scorers:
            try:
                self.queues[name].put_nowait(exchange)
            except asyncio.QueueFull:
                self._count(name, exchange.reference, "dropped_queue_full")
        return True

    def _count(self, name: str, reference: str, outcome: str) -> None:
        self.metrics.shadow_items.labels(variant=name, reference=reference, outcome=outcome).inc()

    async def _work(self, name: str, queue: asyncio.Queue[Exchange]) -> None:
        backend = self.backends[name]
        while True:
            exchange = await queue.get()
            running, waiting = backend.load()
            if waiting or running > self.busy:
                self._count(name, exchange.reference, "dropped_busy")
                continue
            try:
                score = await backend.score(exchange.request, exchange.answer, exchange.answer_ids)
            except ScoringUnsupported as err:
                log.warning("shadow: %s cannot score (%s); it is left out", name, err)
                self._count(name, exchange.reference, "unsupported")
                continue
            except Exception as err:  # a failed score is counted; live traffic is not touched
                log.warning("shadow: scoring on %s failed: %s", name, err)
                self._count(name, exchange.reference, "failed")
                continue
            self._record(name, exchange.reference, score)

    def _record(self, name: str, reference: str, score: Score) -> None:
        self._count(name, reference, "scored")
        if score.tokens:
            labels = {"variant": name, "reference": reference}
            self.metrics.shadow_nll.labels(**labels).observe(score.nll)
            self.metrics.shadow_top1.labels(**labels).observe(score.top1)
            self.metrics.shadow_tokens.labels(**labels).inc(score.tokens)
