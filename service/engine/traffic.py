"""Seeded random traffic for an engine, and a driver that records what every request got.

This is the engine's differential test, shared by the tests (a small schedule on tiny models)
and `bench/engine_traffic.py` (a long one on the default model). A schedule mixes what real
clients send: prompt lengths on both sides of the KV-cache growth steps (short, around 256 and
512, up to the context limit), output lengths, greedy and sampled requests with extreme but valid
temperatures and top_p, staggered arrivals, and cancellations before the first token or midway
(by `abort` or by closing the stream, as a client that goes away does). `drive` runs a schedule;
`greedy_mismatches` compares every greedy answer with a reference decode of the same request
alone, and `drive` reports a request that never ends as hung instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.backend import BackendError, SamplingParams
from service.engine.types import Engine

TEMPERATURES = (1e-30, 0.05, 0.7, 1.0, 2.0)
TOP_PS = (1e-9, 0.3, 0.9, 1.0)


@dataclass(frozen=True)
class PlannedRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrive_after_s: float  # from the start of the run
    cancel_after: int | None  # tokens read before the client cancels (0: before the first); None: to the end
    cancel_by_abort: bool = True  # cancel with engine.abort (else by closing the stream)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0


@dataclass
class Outcome:
    planned: PlannedRequest
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # an engine error, or "hung"
    seconds: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self.planned.cancel_after is not None and self.finish_reason is None and self.error is None


def prompt_lengths(max_prompt: int, boundaries: tuple[int, ...] = (256, 512)) -> list[tuple[int, int]]:
    """Length ranges to draw prompts from: short, around each cache boundary, and up to the limit."""
    ranges = [(1, 16)]
    ranges += [(b - 16, b + 16) for b in boundaries if b + 16 <= max_prompt]
    ranges.append((max(1, max_prompt - 32), max_prompt))
    return ranges


def random_schedule(
    seed: int,
    count: int,
    vocab_size: int,
    max_prompt: int,
    max_tokens: int,
    spread_s: float = 0.5,
    sampled_share: float = 0.4,
    cancel_share: float = 0.2,
) -> list[PlannedRequest]:
    """`count` requests drawn from `seed`: the same arguments always give the same schedule."""
    rng = random.Random(seed)
    ranges = prompt_lengths(max_prompt)
    schedule = []
    for i in range(count):
        low, high = rng.choice(ranges)
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(low, high))]
        n = rng.choice((1, 2, rng.randint(3, max_tokens), max_tokens))
        if rng.random() < sampled_share:
            seed_value = rng.choice((None, rng.randrange(2**63), -(2**63), 2**64 - 1))
            params = SamplingParams(
                max_tokens=n,
                temperature=rng.choice(TEMPERATURES),
                top_p=rng.choice(TOP_PS),
                seed=seed_value,
                ignore_eos=True,
            )
        else:
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        cancel = rng.randint(0, max(0, n - 1)) if rng.random() < cancel_share else None
        schedule.append(
            PlannedRequest(
                request_id=f"t{seed}-{i}",
                prompt=prompt,
                params=params,
                arrive_after_s=rng.uniform(0, spread_s),
                cancel_after=cancel,
                cancel_by_abort=rng.random() < 0.5,
            )
        )
    return schedule


async def _run_one(engine: Engine, planned: PlannedRequest, started: float) -> Outcome:
    outcome = Outcome(planned)
    await asyncio.sleep(max(0.0, started + planned.arrive_after_s - time.monotonic()))
    begun = time.monotonic()
    stream = engine.generate(planned.prompt, planned.params, planned.request_id)
    try:
        if planned.cancel_after == 0:  # a client gone before its first token
            first = asyncio.ensure_future(anext(stream, None))
            await asyncio.sleep(0)
            if planned.cancel_by_abort:
                await engine.abort(planned.request_id)
            else:
                first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            return outcome
        async for event in stream:
            outcome.tokens.append(event.token_id)
            if event.finish_reason is not None:
                outcome.finish_reason = event.finish_reason
            elif planned.cancel_after is not None and len(outcome.tokens) >= planned.cancel_after:
                if planned.cancel_by_abort:
                    await engine.abort(planned.request_id)
                break
    except BackendError as err:
        outcome.error = f"{type(err).__name__}: {err}"
    finally:
        await stream.aclose()
        outcome.seconds = time.monotonic() - begun
    return outcome


async def drive(engine: Engine, schedule: list[PlannedRequest], timeout_s: float) -> list[Outcome]:
    """Run every planned request concurrently; requests still running after `timeout_s` are hung."""
    started = time.monotonic()
    tasks = [asyncio.create_task(_run_one(engine, p, started)) for p in schedule]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [t.result() if t in done else Outcome(p, error="hung") for t, p in zip(tasks, schedule, strict=True)]


def expected_length(planned: PlannedRequest, max_seq: int) -> int:
    """Tokens a request reading to its end gets: max_tokens, or fewer where the context fills."""
    return min(planned.params.max_tokens, max_seq - len(planned.prompt))


def greedy_mismatches(
    outcomes: list[Outcome], reference: Callable[[list[int], int], list[int]], max_seq: int
) -> list[str]:
    """Problems with the answers: errors, hung or short requests, greedy tokens unlike the reference."""
    problems = []
    for o in outcomes:
        p = o.planned
        if o.error is not None:
            problems.append(f"{p.request_id}: {o.error}")
            continue
        if o.cancelled:
            if p.greedy and o.tokens and o.tokens != reference(p.prompt, len(o.tokens)):
                problems.append(f"{p.request_id}: cancelled greedy prefix differs from the reference")
            continue
        n = expected_length(p, max_seq)
        if len(o.tokens) != n or o.finish_reason != "length":
            problems.append(f"{p.request_id}: {len(o.tokens)} tokens ({o.finish_reason}), expected {n} (length)")
        elif p.greedy and o.tokens != reference(p.prompt, n):
            problems.append(f"{p.request_id}: greedy tokens differ from the reference decode alone")
    return problems
