"""Real-traffic differential test of the engine: random seeded schedules, every answer checked.

Prompts cross the KV-cache growth steps, requests arrive staggered, sample with extreme settings,
are cancelled before their first token or midway and finish in every order; every greedy answer
must equal `model.generate` of the same request alone, nothing may hang, and the gauges return
to zero. The default-model run is a small subset; `bench/engine_traffic.py` runs long schedules.
"""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace

import pytest
import torch

from service.engine.engine import LLMEngine
from service.engine.traffic import drive, greedy_mismatches, random_schedule
from service.engine.types import EngineConfig
from service.metrics import Metrics
from tests.tiny_models import TINY_MODELS


def generate_reference(model):
    @functools.cache
    def full(prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2
        )
        return tuple(out[0, len(prompt) :].tolist())

    return lambda prompt, n: list(full(tuple(prompt), n))


def run_schedule(model, tokenizer, seed: int, count: int, max_prompt: int, max_tokens: int, **limits):
    metrics = Metrics()
    config = EngineConfig(max_prompt_tokens=max_prompt, max_tokens=max_tokens, **limits)
    schedule = random_schedule(seed, count, model.config.vocab_size, max_prompt, max_tokens)

    async def main():
        engine = LLMEngine("traffic", model, tokenizer, config, metrics.observer("traffic"))
        await engine.start()
        outcomes = await drive(engine, schedule, timeout_s=120)
        for _ in range(200):  # slots of cancelled requests free at the worker's next step
            if engine.num_running == 0 and engine.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown(1.0)
        return outcomes, engine.runner.max_seq

    outcomes, max_seq = asyncio.run(main())
    gauges = {
        name: metrics.registry.get_sample_value(f"trimserve_requests_{name}", {"variant": "traffic"})
        for name in ("running", "waiting")
    }
    return outcomes, max_seq, gauges


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_traffic_on_tiny_models(arch: str, seed: int) -> None:
    model = TINY_MODELS[arch]()
    outcomes, max_seq, gauges = run_schedule(
        model, SimpleNamespace(eos_token_id=2), seed, count=24, max_prompt=500, max_tokens=40, max_batch_size=4
    )
    assert greedy_mismatches(outcomes, generate_reference(model), max_seq) == []
    assert gauges == {"running": 0, "waiting": 0}
    assert sum(o.cancelled for o in outcomes) >= 1 and sum(not o.planned.greedy for o in outcomes) >= 1
    assert max(len(o.planned.prompt) for o in outcomes) > 256  # the cache grew during the run


@pytest.mark.integration
def test_random_traffic_on_the_default_model(default_model_dir) -> None:
    from variants.load import load_model

    model, tokenizer = load_model(str(default_model_dir), dtype="fp32")
    outcomes, max_seq, gauges = run_schedule(
        model, tokenizer, seed=7, count=10, max_prompt=600, max_tokens=12, max_batch_size=4
    )
    assert greedy_mismatches(outcomes, generate_reference(model), max_seq) == []
    assert gauges == {"running": 0, "waiting": 0}
