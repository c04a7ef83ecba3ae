"""The engine on the real default model: batched greedy output equals `model.generate` (fp32)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from service.backend import SamplingParams
from service.engine.engine import LLMEngine
from service.engine.llama import LlamaRunner
from service.engine.types import EngineConfig
from variants.load import load_model


@pytest.mark.integration
def test_default_model_batched_greedy_matches_generate(default_model_dir: Path) -> None:
    model, tokenizer = load_model(str(default_model_dir), dtype="fp32")
    texts = ["The capital of France is", "Photosynthesis is the process by which green plants and some other organisms"]
    batch = [tokenizer(t)["input_ids"] for t in texts]
    expected = [
        model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(p) :].tolist()
        for p in batch
    ]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def main():
        engine = LLMEngine("default", model, tokenizer, EngineConfig(max_batch_size=2))
        await engine.start()
        assert isinstance(engine.runner, LlamaRunner)

        async def one(prompt: list[int], rid: str) -> list[int]:
            return [e.token_id async for e in engine.generate(prompt, params, rid)]

        outs = await asyncio.gather(*(one(p, f"r{i}") for i, p in enumerate(batch)))
        await engine.shutdown(1.0)
        return outs

    assert asyncio.run(main()) == expected
