"""The prefix cache: finished requests' caches reused by prompts that start the same way."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.backend import SamplingParams
from service.engine import prefix
from service.engine.engine import LLMEngine
from service.engine.llama import LlamaRunner
from service.engine.prefix import BLOCK, PrefixCache
from service.engine.runner import Chunk
from service.engine.types import EngineConfig
from tests.test_engine_core import TOKENIZER, collect, reference, reference_logprobs
from tests.test_engine_runner import prompts
from tests.tiny_models import tiny_llama, tiny_qwen2


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


class CountingObserver:
    def __init__(self) -> None:
        self.cached: list[int] = []

    def queue_wait(self, seconds: float) -> None:
        pass

    def load(self, running: int, waiting: int) -> None:
        pass

    def prompt_cached(self, tokens: int) -> None:
        self.cached.append(tokens)

    def restarted(self) -> None:
        pass


# ----- the index -------------------------------------------------------------------------------


def test_a_match_is_the_longest_shared_start_and_leaves_the_last_prompt_token() -> None:
    cache = PrefixCache(budget=10_000)
    held = list(range(100, 150))
    cache.add(held, "copy", 100)
    entry, n = cache.match([*held[:37], 7, 8, 9])
    assert entry.saved == "copy" and n == 37  # past the last whole block, token by token
    assert cache.match(held)[1] == len(held) - 1  # the whole of it held: the last token still runs
    assert cache.match([*held, 1, 2])[1] == len(held)
    assert cache.match(held[: BLOCK - 1] + [5] * 40) is None  # shorter than a block: not worth a lookup
    assert cache.match([1, *held]) is None


def test_entries_go_least_recently_used_first_within_the_budget() -> None:
    cache = PrefixCache(budget=250)
    a, b, c = (list(range(s, s + 40)) for s in (1000, 2000, 3000))
    cache.add(a, "a", 100)
    cache.add(b, "b", 100)
    assert cache.match([*a, 1]) is not None  # a is now the most recently used
    cache.add(c, "c", 100)  # over budget: b goes
    assert cache.match([*b, 1]) is None
    assert cache.match([*a, 1])[0].saved == "a" and cache.match([*c, 1])[0].saved == "c"
    assert cache.nbytes == 200 and len(cache) == 2
    cache.add(list(range(5000, 5040)), "too big", 251)  # larger than the whole budget: not kept
    assert len(cache) == 2
    assert cache.covers(a[:30]) and not cache.covers([*a[:30], 9])


def test_a_hash_collision_costs_a_miss_never_another_requests_cache(monkeypatch) -> None:
    """Every block hashes alike here: only the token ids can tell entries apart."""
    monkeypatch.setattr(prefix, "block_keys", lambda tokens, salt=None: [0] * (len(tokens) // BLOCK))
    cache = PrefixCache(budget=10_000)
    mine, other = list(range(1, 41)), list(range(101, 141))
    cache.add(mine, "mine", 10)
    assert cache.match([*other, 1]) is None
    assert not cache.covers(other)
    assert cache.match([*mine, 1])[0].saved == "mine"
    assert cache.match([*mine, 1], salt="s") is None and not cache.covers(mine, salt="s")  # nor another scope's


def test_a_salted_entry_is_found_only_with_its_salt() -> None:
    cache = PrefixCache(budget=10_000)
    tokens = list(range(200, 240))
    cache.add(tokens, "a's", 10, salt="a")
    assert cache.match([*tokens, 1]) is None and cache.match([*tokens, 1], salt="b") is None
    assert not cache.covers(tokens) and not cache.covers(tokens, salt="b")
    assert cache.match([*tokens, 1], salt="a")[0].saved == "a's" and cache.covers(tokens, salt="a")
    cache.add(tokens, "unsalted", 10)
    assert cache.match([*tokens, 1])[0].saved == "unsalted" and cache.match([*tokens, 1], salt="a")[0].saved == "a's"
    cache.fit(10)  # the least recently used (the unsalted one, a's was matched since) goes, and its keys
    assert cache.match([*tokens, 1]) is None and cache.nbytes == 10 and len(cache) == 1
    assert cache.match([*tokens, 1], salt="a")[0].saved == "a's"


# ----- the runner's copies ---------------------------------------------------------------------


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2])
def test_a_saved_prefix_restored_into_another_slot_continues_as_the_original(make_model) -> None:
    model = make_model()
    runner = LlamaRunner(model, 4, 128)
    prompt, rest = prompts((30, 6), seed=40)
    runner.prefill(0, prompt)
    saved, nbytes = runner.save(0, 20)
    assert nbytes == sum(t.numel() * t.element_size() for t in saved)
    assert all(t.dtype == model.dtype for t in saved)  # the model's dtype: the cache only widens it
    runner.prefill(0, rest)  # slot 0 now holds something else
    runner.restore(saved, 3, 20)
    none = torch.empty(0, dtype=torch.long)
    logits = runner.step(none, none, [Chunk(3, prompt[20:], 20)])[0]
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits.float(), expected.float(), atol=1e-4, rtol=1e-4)


# ----- the engine ------------------------------------------------------------------------------


def test_repeated_prompts_and_the_next_chat_turn_reuse_the_kept_cache() -> None:
    model = tiny_llama()
    first, other, turn = prompts((40, 35, 9), seed=41)
    answer = reference(model, first, 12)
    follow_up = first + answer + turn  # the next turn of a chat: its history, then the new message

    async def main():
        observer = CountingObserver()
        engine = LLMEngine("tiny", model, TOKENIZER, EngineConfig(max_batch_size=3), observer)
        await engine.start()
        got = [await collect(engine, first, greedy(12), "first")]
        got += await asyncio.gather(  # the same prompt again beside a new one, and the chat's next turn
            collect(engine, first, greedy(12), "again"),
            collect(engine, other, greedy(12), "other"),
        )
        got.append(await collect(engine, follow_up, greedy(10), "turn"))
        kept = engine.prefixes.nbytes
        await engine.shutdown(1.0)
        return got, observer.cached, kept, engine

    (once, again, beside, turn_events), cached, kept, engine = asyncio.run(main())
    assert [e.token_id for e in once] == answer
    assert [e.token_id for e in again] == answer
    assert [e.token_id for e in beside] == reference(model, other, 12)
    assert [e.token_id for e in turn_events] == reference(model, follow_up, 10)
    # a random tiny model barely looks back, so its tokens alone would not notice a wrong prefix
    assert [e.logprob for e in again] == pytest.approx(reference_logprobs(model, first, 12), abs=1e-4)
    assert [e.logprob for e in turn_events] == pytest.approx(reference_logprobs(model, follow_up, 10), abs=1e-4)
    # "again" took all but its last prompt token; the turn took its history but the last answer token
    assert sorted(cached) == sorted([0, 0, len(first) - 1, len(first) + len(answer) - 1])
    assert 0 < kept <= engine.kv_budget - engine.runner.cache_bytes
    assert engine.cache_bytes == engine.runner.cache_bytes + kept


def test_requests_share_kept_caches_only_within_their_cache_salt() -> None:
    model = tiny_llama()
    prompt = prompts((40,), seed=42)[0]
    answer = reference(model, prompt, 6)

    def salted(salt: str | None) -> SamplingParams:
        return SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, cache_salt=salt)

    async def main():
        observer = CountingObserver()
        engine = LLMEngine("tiny", model, TOKENIZER, EngineConfig(max_batch_size=2), observer)
        await engine.start()
        got = []
        for i, salt in enumerate(["tenant-a", "tenant-b", None, "tenant-a", "tenant-b"]):
            got.append(await collect(engine, prompt, salted(salt), f"r{i}"))
        await engine.shutdown(1.0)
        return got, observer.cached

    got, cached = asyncio.run(main())
    assert all([e.token_id for e in events] == answer for events in got)
    assert cached == [0, 0, 0, len(prompt) - 1, len(prompt) - 1]  # each scope prefilled it once


def test_kept_prefixes_take_only_what_the_slots_leave_of_the_kv_budget() -> None:
    model = tiny_llama()
    batch = prompts((40, 40, 40, 40), seed=44)  # entries of one size

    async def kept_sizes(config: EngineConfig) -> tuple[list[int], LLMEngine]:
        engine = LLMEngine("tiny", model, TOKENIZER, config)
        await engine.start()
        sizes = []
        for i, prompt in enumerate(batch):
            await collect(engine, prompt, greedy(4), f"r{i}")
            sizes.append(len(engine.prefixes))
            assert engine.prefixes.nbytes <= engine.kv_budget - engine.runner.cache_bytes
        await engine.shutdown(1.0)
        return sizes, engine

    roomy, engine = asyncio.run(kept_sizes(EngineConfig(max_batch_size=2)))
    assert roomy == [1, 2, 3, 4]
    slots, entry = engine.runner.cache_bytes, engine.prefixes.nbytes // 4
    tight, _ = asyncio.run(kept_sizes(EngineConfig(max_batch_size=2, kv_cache_bytes=slots + entry * 3 // 2)))
    assert tight == [1, 1, 1, 1]
    capped, _ = asyncio.run(kept_sizes(EngineConfig(max_batch_size=2, prefix_cache_bytes=entry * 2)))
    assert capped == [1, 2, 2, 2]


def test_with_no_prefix_memory_nothing_is_kept() -> None:
    model = tiny_llama()
    (prompt,) = prompts((40,), seed=42)

    async def main():
        observer = CountingObserver()
        engine = LLMEngine("tiny", model, TOKENIZER, EngineConfig(max_batch_size=2, prefix_cache_bytes=0), observer)
        await engine.start()
        for rid in ("a", "b"):
            assert [e.token_id for e in await collect(engine, prompt, greedy(5), rid)] == reference(model, prompt, 5)
        await engine.shutdown(1.0)
        return observer.cached, engine

    cached, engine = asyncio.run(main())
    assert cached == [0, 0] and len(engine.prefixes) == 0


def test_an_aborted_request_leaves_nothing_behind() -> None:
    """Only a whole answer is kept: a request cut short might hold positions a failed step wrote."""
    model = tiny_llama()
    prompt, unrelated = prompts((40, 30), seed=43)

    async def main():
        engine = LLMEngine("tiny", model, TOKENIZER, EngineConfig(max_batch_size=2))
        await engine.start()
        stream = engine.generate(prompt, greedy(500), "cut")
        await anext(stream)
        await stream.aclose()
        done = await collect(engine, unrelated, greedy(3), "next")  # steps on past the abort
        await engine.shutdown(1.0)
        return done, engine

    done, engine = asyncio.run(main())
    assert len(done) == 3 and len(engine.prefixes) == 1
    assert engine.prefixes.match([*prompt, 1]) is None
