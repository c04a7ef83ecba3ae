"""LLMEngine: exact greedy output under continuous batching, abort, queue bound, timeout, shutdown."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from service.engine.engine import LLMEngine
from service.engine.types import (
    EngineConfig,
    EngineDead,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    SamplingParams,
    TokenEvent,
)
from service.metrics import Metrics
from tests.test_engine_runner import prompts, reference
from tests.tiny_models import tiny_llama

TOKENIZER = SimpleNamespace(eos_token_id=2)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_engine(model, **limits) -> LLMEngine:
    return LLMEngine("tiny", model, TOKENIZER, EngineConfig(**limits), Metrics())


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
        short = asyncio.create_task(collect(engine, prompt, GREEDY, "short"))
        stuck = engine.generate(prompt, SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True), "stuck")
        await anext(stuck)
        await asyncio.sleep(0)
        await engine.shutdown(0.1)  # `short` finishes in time; `stuck` is still reading slowly
        with pytest.raises(EngineDead):
            async for _ in stuck:
                pass
        with pytest.raises(EngineDead):
            await collect(engine, prompt, GREEDY, "late")
        return await short

    assert len(run(main())) == 10


def test_metrics_are_recorded(model) -> None:
    metrics = Metrics()

    async def main():
        engine = LLMEngine("tiny", model, TOKENIZER, EngineConfig(), metrics)
        await engine.start()
        await asyncio.gather(*(collect(engine, p, GREEDY, f"m{i}") for i, p in enumerate(prompts((4, 6)))))
        await engine.shutdown(1.0)

    run(main())

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"variant": "tiny"})

    assert value("trimserve_prompt_tokens_total") == 10
    assert value("trimserve_generated_tokens_total") == 20
    assert value("trimserve_time_to_first_token_seconds_count") == 2
    assert value("trimserve_time_per_output_token_seconds_count") == 2
    assert value("trimserve_queue_wait_seconds_count") == 2
    assert value("trimserve_requests_running") == 0
    assert value("trimserve_requests_waiting") == 0


def test_a_failing_step_ends_its_requests_not_the_engine(model) -> None:
    prompt = prompts((5,))[0]

    async def main():
        engine = make_engine(model)
        await engine.start()
        prefill = engine.runner.prefill

        def broken(slot: int, ids: list[int]):
            engine.runner.prefill = prefill  # fails once
            raise RuntimeError("boom")

        engine.runner.prefill = broken
        with pytest.raises(EngineDead, match="boom"):
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
            engine.runner.prefill = recording(engine.runner.prefill)
            engine.runner.decode = recording(engine.runner.decode)
            await engine.start()
        batch = prompts((5, 8), seed=11)
        await asyncio.gather(*(collect(e, p, GREEDY, "r") for e, p in zip(engines, batch, strict=True)))
        for engine in engines:
            await engine.shutdown(1.0)

    run(main())
    assert len(threads) == 1 and threads.pop().startswith("torch-cpu")
