"""A fake engine for HTTP-layer tests: conforms to the engine interface, answers instantly.

It echoes the prompt's own tokens back (cycling), so each response's text shows which prompt it
answered, and it records aborts so tests can check that a client leaving frees the request. It
runs inside the real native backend (tokenization, chat templates, detokenization, stop strings),
as vLLM tests its serving layer against a mock engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import torch

from service.backend import (
    BackendError,
    InvalidRequest,
    Overloaded,
    SamplingParams,
    Unavailable,
    check_sampling,
)
from service.backends.native import NativeBackend
from service.engine.types import EngineConfig, TokenEvent
from service.settings import Settings
from variants.load import LoadedVariant, weight_bytes


class FakeEngine:
    """Echo engine; `delay` seconds per token, `fail_after` tokens before an EngineError."""

    def __init__(self, name: str, config: EngineConfig, eos_token_ids: frozenset[int] = frozenset({2})) -> None:
        self.name = name
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.alive = True
        self.cache_bytes = 4096  # a figure for the kv-cache gauge
        self.delay = 0.0
        self.fail_after: int | None = None
        self.script: list[int] | None = None  # tokens to emit instead of the echo
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.seen: list[tuple[list[int], SamplingParams]] = []
        self.started = False
        self.stopped = False

    @property
    def num_running(self) -> int:
        return min(len(self.active), self.config.max_batch_size)

    @property
    def num_waiting(self) -> int:
        return max(0, len(self.active) - self.config.max_batch_size)

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.stopped = True
        self.alive = False

    async def abort(self, request_id: str) -> None:
        if request_id in self.active and request_id not in self.aborted:
            self.aborted.append(request_id)
        self.active.discard(request_id)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[TokenEvent]:
        if self.stopped:
            raise Unavailable("engine stopped")
        if not prompt_ids or len(prompt_ids) > self.config.max_prompt_tokens:
            raise InvalidRequest("bad prompt length", "prompt")
        check_sampling(params, self.config.max_tokens)  # the engine's own check, as LLMEngine does
        if len(self.active) >= (self.config.max_batch_size or 8) + self.config.max_queue:  # None: 8, as sized here
            raise Overloaded("queue full", retry_after=2.0)
        self.seen.append((list(prompt_ids), params))
        self.active.add(request_id)
        source = self.script or prompt_ids
        finished = False
        try:
            for i in range(params.max_tokens):
                if request_id not in self.active:
                    return
                if self.fail_after is not None and i >= self.fail_after:
                    raise BackendError("the fake engine failed on purpose")
                await asyncio.sleep(self.delay)
                token = source[i % len(source)]
                last = i == params.max_tokens - 1
                if not params.ignore_eos and token in self.eos_token_ids:
                    finished = True
                    yield TokenEvent(token, "stop")
                    return
                finished = last
                yield TokenEvent(token, "length" if last else None)
        finally:
            if not finished and request_id not in self.aborted:  # closed early, as LLMEngine: an abort
                self.aborted.append(request_id)
            self.active.discard(request_id)


def fake_backends(
    settings: Settings, tokenizer, model: torch.nn.Module, names: tuple[str, ...], engines: dict[str, FakeEngine]
) -> list[NativeBackend]:
    """Native backends for `names` over one tiny model, each with a FakeEngine (kept in `engines`)."""

    def engine_factory(name, model, tokenizer, config, observer) -> FakeEngine:
        engines[name] = FakeEngine(name, config)
        return engines[name]

    return [
        NativeBackend(
            name,
            f"/tmp/{name}",
            "cpu",
            lambda device, name=name: loaded_model(name, model, tokenizer),
            settings.engine_config(),
            engine_factory=engine_factory,
        )
        for name in names
    ]


def loaded_model(name: str, model: torch.nn.Module, tokenizer, manifest=None) -> LoadedVariant:
    return LoadedVariant(
        name=name,
        source=f"/tmp/{name}",
        dtype="fp32",
        dtype_reason="requested",
        device=torch.device("cpu"),
        model=model,
        tokenizer=tokenizer,
        manifest=manifest,
        load_seconds=0.5,
        load_rss_bytes=1000,
        params_total=sum(p.numel() for p in model.parameters()),
        params_nonzero=sum(p.numel() for p in model.parameters()),
        weight_bytes=weight_bytes(model),
        loaded_at=time.time(),
    )
