"""LLMEngine: exact greedy output under continuous batching, abort, queue bound, timeout, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

import pytest
import torch

from service.backend import (
    GenerationError,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    SamplingParams,
    Unavailable,
)
from service.engine.engine import LLMEngine
from service.engine.types import EngineConfig, TokenEvent
from service.metrics import Metrics
from tests.test_engine_runner import prompts, reference
from tests.tiny_models import tiny_llama

TOKENIZER = SimpleNamespace(eos_token_id=2)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_engine(model, **limits) -> LLMEngine:
    return LLMEngine("tiny", model, TOKENIZER, EngineConfig(**limits))


async def collect(engine: LLMEngine, prompt: list[int], params: SamplingParams, rid: str) -> list[TokenEvent]:
    return [event async for event in engine.generate(prompt, params, rid)]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_greedy_requests_match_generate(model) -> None:
    batch = prompts((9, 30, 4, 17, 12))
    lengths = (10, 6, 14, 3, 10)
    expected = [reference(model, p, n) for p, n in zip(batch, lengths, strict=True)]

    async def main():
        engine = make_engine(model, max_batch_size=4)
        await engine.start()
        alone = await collect(engine, batch[0], GREEDY, "alone")
        together = await asyncio.gather(
            *(
                collect(engine, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), f"r{i}")
                for i, (p, n) in enumerate(zip(batch, lengths, strict=True))
            )
        )
        await engine.shutdown(1.0)
        return alone, together

    alone, together = run(main())
    assert [e.token_id for e in alone] == expected[0]
    assert [[e.token_id for e in events] for events in together] == expected
    for events in together:
        assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
        assert events[-1].finish_reason == "length"


def test_request_joins_a_running_batch(model) -> None:
    first, second = prompts((6, 15), seed=4)

    async def main():
        engine = make_engine(model, max_batch_size=2)
        await engine.start()
        long = engine.generate(first, SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True), "long")
        early = [await anext(long) for _ in range(3)]
        short = await collect(engine, second, GREEDY, "short")
        running_after = engine.num_running  # the long request is still decoding
        rest = [e async for e in long]
        await engine.shutdown(1.0)
        return early + rest, short, running_after

    long_events, short, running_after = run(main())
    assert running_after == 1
    assert [e.token_id for e in short] == reference(model, second, 10)
    assert [e.token_id for e in long_events][:20] == reference(model, first, 20)
    assert len(long_events) == 300


def test_abort_frees_the_slot(model) -> None:
    prompt = prompts((5,))[0]

    async def main():
        engine = make_engine(model, max_batch_size=1)
        await engine.start()
        stream = engine.generate(prompt, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True), "a")
        await anext(stream)
        await engine.abort("a")
        remainder = [e async for e in stream]
        other = await collect(engine, prompt, GREEDY, "b")  # gets the only slot
        closed = engine.generate(prompt, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True), "c")
        await anext(closed)
        await closed.aclose()  # a client that goes away
        for _ in range(100):
            if engine.num_running == 0:
                break
            await asyncio.sleep(0.01)
        running = engine.num_running
        await engine.shutdown(1.0)
        return remainder, other, running

    remainder, other, running = run(main())
    assert len(remainder) < 999
    assert len(other) == 10
    assert running == 0


def test_full_queue_is_overloaded_and_bad_input_invalid(model) -> None:
    prompt = prompts((5,))[0]
    endless = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)

    async def main():
        engine = make_engine(model, max_batch_size=1, max_queue=1, max_prompt_tokens=32, max_tokens=1000)
        await engine.start()
        running = engine.generate(prompt, endless, "running")
        await anext(running)  # holds the only slot
        queued = asyncio.create_task(collect(engine, prompt, GREEDY, "queued"))
        await asyncio.sleep(0.05)
        assert engine.num_waiting == 1
        with pytest.raises(Overloaded) as overloaded:
            await collect(engine, prompt, GREEDY, "rejected")
        for bad, params in (
            ([], GREEDY),
            ([5] * 33, GREEDY),
            (prompt, SamplingParams(max_tokens=1001)),
            ([10**6], GREEDY),
            (prompt, SamplingParams(top_p=0.0)),
        ):
            with pytest.raises(InvalidRequest):
                await collect(engine, bad, params, "bad")
        await engine.abort("running")
        queued_events = await queued
        await engine.shutdown(1.0)
        return overloaded.value, queued_events

    overloaded, queued_events = run(main())
    assert overloaded.retry_after > 0
    assert len(queued_events) == 10


def test_request_past_its_deadline_times_out(model) -> None:
    async def main():
        engine = make_engine(model, request_timeout_s=0.2)
        await engine.start()
        params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
        stream = engine.generate(prompts((5,))[0], params, "slow")
        got = 0
        with pytest.raises(RequestTimeout):
            async for _ in stream:
                got += 1
                await asyncio.sleep(0.01)  # a slow reader: 1000 tokens take longer than 0.2 s
        await engine.shutdown(1.0)
        return got, engine.num_running

    got, running = run(main())
    assert 0 < got < 1000
    assert running == 0


def test_seeded_sampling_ignores_batch_mates(model) -> None:
    prompt, other = prompts((8, 20), seed=5)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=123)

    async def main():
        engine = make_engine(model)
        await engine.start()
        alone = await collect(engine, prompt, seeded, "alone")
        crowd = await asyncio.gather(
            collect(engine, other, SamplingParams(max_tokens=12, temperature=0.7, seed=9), "x"),
            collect(engine, prompt, seeded, "crowd"),
            collect(engine, other, GREEDY, "y"),
        )
        reseeded = await collect(engine, prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=124), "z")
        await engine.shutdown(1.0)
        return alone, crowd[1], reseeded

    alone, crowd, reseeded = run(main())
    assert [e.token_id for e in alone] == [e.token_id for e in crowd]
    assert [e.token_id for e in alone] != [e.token_id for e in reseeded]


def test_stop_tokens_and_eos(model) -> None:
    prompt = prompts((7,), seed=6)[0]
    greedy = reference(model, prompt, 10)
    stop = greedy[4]

    async def main():
        engine = make_engine(model)
        await engine.start()
        stopped = await collect(
            engine, prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop,)), "s"
        )
        engine.eos_token_ids = frozenset({stop})
        eos = await collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0), "e")
        ignored = await collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), "i")
        await engine.shutdown(1.0)
        return stopped, eos, ignored

    stopped, eos, ignored = run(main())
    cut = greedy.index(stop) + 1
    for events in (stopped, eos):
        assert [e.token_id for e in events] == greedy[:cut]
        assert events[-1].finish_reason == "stop"
    assert [e.token_id for e in ignored] == greedy


def test_shutdown_finishes_in_flight_then_refuses(model) -> None:
    prompt = prompts((5,))[0]

    async def main():
        engine = make_engine(model)
        await engine.start()
        # The grace is sized from this machine's speed: five times what `short` takes alone, far
        # less than the hundreds of steps `stuck` asks for.
        started = time.perf_counter()
        await collect(engine, prompt, GREEDY, "timing")
        grace = 5 * (time.perf_counter() - started)
        short = asyncio.create_task(collect(engine, prompt, GREEDY, "short"))
        stuck = engine.generate(prompt, SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True), "stuck")
        await anext(stuck)
        await asyncio.sleep(0)
        await engine.shutdown(grace)  # `short` finishes in time; `stuck` is still reading slowly
        with pytest.raises(Unavailable):
            async for _ in stuck:
                pass
        with pytest.raises(Unavailable):
            await collect(engine, prompt, GREEDY, "late")
        return await short

    assert len(run(main())) == 10


def test_the_queue_is_reported_to_the_observer(model) -> None:
    """The engine reports queue waits and running/waiting counts; request latency is the caller's."""
    metrics = Metrics()

    async def main():
        engine = LLMEngine("tiny", model, TOKENIZER, EngineConfig(), metrics.observer("tiny"))
        await engine.start()
        await asyncio.gather(*(collect(engine, p, GREEDY, f"m{i}") for i, p in enumerate(prompts((4, 6)))))
        await engine.shutdown(1.0)

    run(main())

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"variant": "tiny"})

    assert value("trimserve_queue_wait_seconds_count") == 2
    assert value("trimserve_requests_running") == 0
    assert value("trimserve_requests_waiting") == 0


def test_a_failing_step_ends_its_requests_not_the_engine(model) -> None:
    prompt = prompts((5,))[0]

    async def main():
        engine = make_engine(model)
        await engine.start()
        step = engine.runner.step

        def broken(*args, **kwargs):
            engine.runner.step = step  # fails once
            raise RuntimeError("boom")

        engine.runner.step = broken
        with pytest.raises(GenerationError, match="boom"):
            await collect(engine, prompt, GREEDY, "first")
        after = await collect(engine, prompt, GREEDY, "second")
        await engine.shutdown(1.0)
        return after

    assert len(run(main())) == 10


def test_engines_on_one_device_share_one_compute_thread(model) -> None:
    """All model work of every engine on a device runs on one thread (see service.engine.compute)."""
    import threading

    threads: set[str] = set()

    def recording(method):
        def call(*args, **kwargs):
            threads.add(threading.current_thread().name)
            return method(*args, **kwargs)

        return call

    async def main():
        engines = [make_engine(model, max_batch_size=2) for _ in range(2)]
        for engine in engines:
            engine.runner.step = recording(engine.runner.step)
            await engine.start()
        batch = prompts((5, 8), seed=11)
        await asyncio.gather(*(collect(e, p, GREEDY, "r") for e, p in zip(engines, batch, strict=True)))
        for engine in engines:
            await engine.shutdown(1.0)

    run(main())
    assert len(threads) == 1 and threads.pop().startswith("torch-cpu")


def test_cache_growth_then_a_slot_move_keeps_every_request_alive(model) -> None:
    """Issue 13: after a prompt past 256 positions grew the cache, compacting slots failed every batch."""
    batch = prompts((5, 6, 7), seed=12)
    lengths = (5, 15, 30)
    expected = [reference(model, p, n) for p, n in zip(batch, lengths, strict=True)]

    async def main():
        engine = make_engine(model)
        await engine.start()

        async def three():
            return await asyncio.gather(
                *(
                    collect(engine, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), f"r{i}")
                    for i, (p, n) in enumerate(zip(batch, lengths, strict=True))
                )
            )

        before = await asyncio.wait_for(three(), 30)
        await collect(engine, [504] * 300, SamplingParams(max_tokens=2, temperature=0.0), "long")
        after = await asyncio.wait_for(three(), 30)
        await engine.shutdown(1.0)
        return before, after, engine

    before, after, engine = run(main())
    for got in (before, after):
        assert [[e.token_id for e in events] for events in got] == expected
    assert engine.num_running == 0 and engine.num_waiting == 0


class FaultyRunner:
    """Wraps a runner: decoding `poison` as the input token raises; `nan` gives non-finite scores."""

    def __init__(self, runner, poison: int, nan: int) -> None:
        self.runner, self.poison, self.nan = runner, poison, nan
        self.max_slots, self.max_seq = runner.max_slots, runner.max_seq

    @property
    def cache_bytes(self):
        return self.runner.cache_bytes

    def move(self, src, dst, length):
        self.runner.move(src, dst, length)

    def save(self, slot, length):
        return self.runner.save(slot, length)

    def restore(self, saved, slot, length):
        self.runner.restore(saved, slot, length)

    def step(self, tokens, positions, chunks=(), first=0):
        if self.poison in tokens.tolist():
            raise RuntimeError("poisoned token")
        logits = self.runner.step(tokens, positions, chunks, first)
        nan = torch.cat([tokens == self.nan, torch.zeros(len(chunks), dtype=torch.bool)])
        return logits.masked_fill(nan.unsqueeze(1), float("nan"))


def test_one_failing_request_leaves_its_batch_mates_untouched(model) -> None:
    """Issue 13: a failure in one request's decode or sampling used to fail every request of the step."""
    healthy, poisoned, nan = prompts((9, 10, 11), seed=13)
    first_poisoned, first_nan = reference(model, poisoned, 1)[0], reference(model, nan, 1)[0]
    assert first_poisoned != first_nan and {first_poisoned, first_nan}.isdisjoint(reference(model, healthy, 12))
    tiny_temperature = SamplingParams(max_tokens=12, temperature=1e-40, seed=1, ignore_eos=True)

    async def main():
        engine = make_engine(model)
        engine.runner = FaultyRunner(engine.runner, poison=first_poisoned, nan=first_nan)
        await engine.start()
        results = await asyncio.gather(
            collect(engine, healthy, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), "healthy"),
            collect(engine, poisoned, GREEDY, "poisoned"),
            collect(engine, nan, GREEDY, "nan"),
            collect(engine, healthy, tiny_temperature, "tiny-temperature"),
            return_exceptions=True,
        )
        await engine.shutdown(1.0)
        return results, engine

    (ok, failed_decode, failed_scores, tiny), engine = run(main())
    assert [e.token_id for e in ok] == reference(model, healthy, 12)
    assert [e.token_id for e in tiny] == reference(model, healthy, 12)  # T = 1e-40 is greedy in effect
    assert isinstance(failed_decode, GenerationError) and "poisoned" in str(failed_decode)
    assert isinstance(failed_scores, GenerationError) and "non-finite" in str(failed_scores)
    assert engine.num_running == 0


def test_a_burst_fills_the_free_slots_before_anything_is_refused(model) -> None:
    """Issue 13: 40 simultaneous requests to an idle engine (batch 8, queue 4) got 36 refusals."""
    prompt = prompts((6,), seed=14)[0]

    async def main():
        engine = make_engine(model, max_batch_size=8, max_queue=4)
        await engine.start()
        results = await asyncio.gather(
            *(collect(engine, prompt, GREEDY, f"b{i}") for i in range(40)), return_exceptions=True
        )
        await engine.shutdown(1.0)
        return results

    results = run(main())
    refused = [r for r in results if isinstance(r, Overloaded)]
    answered = [r for r in results if isinstance(r, list)]
    assert (len(answered), len(refused)) == (12, 28)
    assert all(len(events) == 10 for events in answered)


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], GREEDY, "prompt"),
        ([10**6], GREEDY, "prompt"),
        ([5] * 40, GREEDY, "prompt"),
        ([5], SamplingParams(max_tokens=0), "max_tokens"),
        ([5], SamplingParams(temperature=float("nan")), "temperature"),
        ([5], SamplingParams(temperature=2.5), "temperature"),
        ([5], SamplingParams(top_p=float("inf")), "top_p"),
        ([5], SamplingParams(temperature=0.7, seed=2**64), "seed"),
        ([5], SamplingParams(temperature=0.7, seed=-(2**70)), "seed"),
    ],
)
def test_invalid_requests_name_the_field(model, prompt, params, param) -> None:
    async def main():
        engine = make_engine(model, max_prompt_tokens=32)
        await engine.start()
        try:
            with pytest.raises(InvalidRequest) as raised:
                await collect(engine, prompt, params, "bad")
        finally:
            await engine.shutdown(1.0)
        return raised.value

    assert run(main()).param == param


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_keeps_decoding(model) -> None:
    """A prompt over the step's token budget no longer stalls the running requests (issue 19)."""
    short, long = prompts((5, 40), seed=30)
    arrivals: list[str] = []

    async def consume(engine, prompt, params, rid):
        events = []
        async for event in engine.generate(prompt, params, rid):
            arrivals.append(rid)
            events.append(event)
        return events

    async def main():
        engine = make_engine(model, max_batch_size=4, prefill_tokens_per_step=8)
        await engine.start()
        running = asyncio.create_task(
            consume(engine, short, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), "short")
        )
        while not arrivals:
            await asyncio.sleep(0.001)
        got_long = await consume(engine, long, GREEDY, "long")
        got_short = await running
        await engine.shutdown(1.0)
        return got_short, got_long

    got_short, got_long = run(main())
    assert [e.token_id for e in got_short] == reference(model, short, 30)
    assert [e.token_id for e in got_long] == reference(model, long, 10)
    # 40 prompt tokens at 8 a step: the short request decoded through the 5 steps before "long" began
    assert arrivals.index("long") >= 5


def test_a_request_part_way_through_its_prompt_survives_compaction_and_abort(model) -> None:
    """The request being prefilled in chunks moves to the first free slot when a decoding one leaves."""
    quick, long, other = prompts((4, 33, 7), seed=31)

    async def main():
        engine = make_engine(model, max_batch_size=3, prefill_tokens_per_step=6)
        await engine.start()
        results = await asyncio.gather(
            collect(engine, quick, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), "quick"),
            collect(engine, long, GREEDY, "long"),
        )
        aborted = engine.generate(long, GREEDY, "aborted")
        task = asyncio.create_task(anext(aborted))
        await asyncio.sleep(0.05)
        task.cancel()
        await aclose_quietly(aborted)
        again = await collect(engine, other, GREEDY, "other")
        await engine.shutdown(1.0)
        return results, again, engine

    (quick_events, long_events), again, engine = run(main())
    assert [e.token_id for e in quick_events] == reference(model, quick, 2)
    assert [e.token_id for e in long_events] == reference(model, long, 10)
    # a random tiny model barely looks back, so its tokens alone would not notice a lost prefix
    assert [e.logprob for e in long_events] == pytest.approx(reference_logprobs(model, long, 10), abs=1e-4)
    assert [e.token_id for e in again] == reference(model, other, 10)
    assert engine.num_running == 0 and engine.num_waiting == 0


def reference_logprobs(model, prompt: list[int], n: int) -> list[float]:
    """Each greedy token's log-probability, from one forward over the prompt and `generate`'s answer."""
    answer = reference(model, prompt, n)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(answer).unsqueeze(1))[:, 0].tolist()


async def aclose_quietly(iterator) -> None:
    with contextlib.suppress(asyncio.CancelledError, RuntimeError):
        await iterator.aclose()
