"""The in-process engine as a backend: a model loaded here, decoded with continuous batching.

The model loads on its device's compute thread (`service.engine.compute`). A request is
tokenized off the event loop (chat messages through the tokenizer's chat template), decoded by
the variant's `LLMEngine`, and turned back into text incrementally, with stop strings cut from
it; the last delta carries the finish reason and the token usage. The engine (or a stand-in with
its interface, in tests) is made by `engine_factory`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from service.backend import (
    Delta,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Memory,
    Observer,
    Score,
    Unavailable,
    Usage,
)
from service.engine.compute import run_async
from service.engine.engine import LLMEngine
from service.engine.llama import compile_unavailable
from service.engine.runner import Runner
from service.engine.types import EngineConfig
from service.textstream import IncrementalDetokenizer, StopMatcher
from variants.load import LoadedVariant, resolve_device

EngineFactory = Callable[[str, Any, Any, EngineConfig, Observer | None], Any]


class NativeBackend:
    kind = "native"

    def __init__(
        self,
        name: str,
        source: str,
        device: str,
        load: Callable[[str], LoadedVariant],  # the device -> the model loaded on it
        config: EngineConfig,
        observer: Observer | None = None,
        engine_factory: EngineFactory = LLMEngine,
    ) -> None:
        self.name = name
        self.source = source
        self.device = device
        self.config = config
        self.observer = observer
        self._load = load
        self._engine_factory = engine_factory
        self.loaded: LoadedVariant | None = None
        self.engine: Any = None
        self.created = int(time.time())

    async def check(self) -> None:
        """The source is something this server can load: not a URL of another kind, not a missing path;
        a compiled decode step, if asked for, can be built here."""
        source = self.source
        if "://" in source:
            raise ValueError(
                f"variant {self.name!r}: {source!r} is not a model source; an upstream server needs an http(s) URL"
            )
        if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
            raise ValueError(f"variant {self.name!r}: {source}: no such file or directory")
        if self.config.compile_decode:
            problem = compile_unavailable(resolve_device(self.device))
            if problem is not None:
                raise ValueError(f"variant {self.name!r}: {problem}")

    async def start(self) -> None:
        # Loading runs on the device's compute thread: all torch work for a device stays on one thread.
        self.device = str(resolve_device(self.device))
        self.loaded = await run_async(self.device, lambda: self._load(self.device))
        self.created = int(self.loaded.loaded_at)
        self.engine = self._engine_factory(
            self.name, self.loaded.model, self.loaded.tokenizer, self.config, self.observer
        )
        await self.engine.start()

    @property
    def healthy(self) -> bool:
        return self.engine is not None and getattr(self.engine, "alive", True)

    def _encode(self, request: GenerationRequest) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if request.messages is None:
            prompt = request.prompt
            return prompt if isinstance(prompt, list) else list(tokenizer.encode(prompt))
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"model {self.name!r} has no chat template; use /v1/completions", "model")
        try:
            text = tokenizer.apply_chat_template(list(request.messages), tokenize=False, add_generation_prompt=True)
        except Exception as err:  # a template may reject a conversation (e.g. roles out of order)
            raise InvalidRequest(f"the chat template rejected these messages: {err}", "messages") from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self.engine is None:
            raise Unavailable(f"variant {self.name!r} is not loaded")
        prompt_ids = await asyncio.to_thread(self._encode, request)
        events = self.engine.generate(prompt_ids, request.params, request.request_id)
        detokenizer = IncrementalDetokenizer(self.loaded.tokenizer, prompt_ids)
        stopper = StopMatcher(list(request.stop))
        answer: list[int] = []
        nll = agreed = 0.0  # the answer rated by this model as it generates it
        finish: FinishReason = "stop"  # also when the engine ended the request without a reason (aborted)
        try:
            async for event in events:
                answer.append(event.token_id)
                nll -= event.logprob
                agreed += event.greedy
                text = stopper.feed(detokenizer.add(event.token_id))
                if stopper.stopped or event.finish_reason is not None:
                    finish = "stop" if stopper.stopped else event.finish_reason
                    tail = text
                    break
                if text:
                    yield Delta(text)
            else:
                tail = ""
            await events.aclose()  # now, not when this generator is closed: a stop string aborts the request
            if not stopper.stopped:
                tail += stopper.feed(detokenizer.flush()) + stopper.flush()
            own = Score(len(answer), nll / len(answer), agreed / len(answer)) if answer else None
            yield Delta(tail, finish, Usage(len(prompt_ids), len(answer)), tuple(answer), own)
        finally:
            await events.aclose()  # a request that did not run to its end is aborted

    def load(self) -> tuple[int, int]:
        if self.engine is None:
            return 0, 0
        return self.engine.num_running, self.engine.num_waiting

    async def score(self, request: GenerationRequest, answer: str, answer_ids: tuple[int, ...] | None) -> Score:
        """One forward over prompt + answer on the compute thread: the answer's mean token NLL and
        the share of its tokens that are this model's greedy choice."""
        if self.loaded is None:
            raise Unavailable(f"variant {self.name!r} is not loaded")
        prompt_ids = await asyncio.to_thread(self._encode, request)
        ids = (
            list(answer_ids)
            if answer_ids is not None
            else self.loaded.tokenizer.encode(answer, add_special_tokens=False)
        )
        if not ids:
            return Score(0, 0.0, 1.0)
        return await run_async(self.device, lambda: score_answer(self.engine.runner, prompt_ids, ids))

    def describe(self) -> dict[str, Any]:
        loaded = self.loaded
        description: dict[str, Any] = {"name": self.name, "backend": self.kind, "healthy": self.healthy}
        if loaded is None:
            return description
        return description | {
            "source": loaded.source,
            "dtype": loaded.dtype,
            "dtype_reason": loaded.dtype_reason,
            "device": str(loaded.device),
            "params": {"total": loaded.params_total, "nonzero": loaded.params_nonzero},
            "weight_bytes": loaded.weight_bytes,
            "load_seconds": round(loaded.load_seconds, 3),
            "load_rss_bytes": loaded.load_rss_bytes,
            "created": self.created,
            "manifest": loaded.manifest.model_dump() if loaded.manifest else None,
        }

    def memory(self) -> Memory:
        memory = Memory(rss_bytes=psutil.Process().memory_info().rss)
        if self.engine is not None:
            memory.kv_cache_bytes = self.engine.cache_bytes
        device = self.loaded.device if self.loaded is not None else None
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            index = device.index if device.index is not None else torch.cuda.current_device()
            memory.device_bytes[f"cuda:{index}"] = {
                "allocated": torch.cuda.memory_allocated(index),
                "reserved": torch.cuda.memory_reserved(index),
                "peak": torch.cuda.max_memory_allocated(index),
            }
        return memory

    async def close(self, timeout: float) -> None:
        if self.engine is not None:
            await self.engine.shutdown(timeout)


@torch.inference_mode()
def score_answer(runner: Runner, prompt_ids: list[int], answer_ids: list[int]) -> Score:
    """Mean NLL of `answer_ids` after `prompt_ids` under the runner's model, and its top-1 agreement."""
    logits = runner.logits(prompt_ids + answer_ids, len(answer_ids) + 1)[:-1].float()
    target = torch.tensor(answer_ids, device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, target)
    top1 = (logits.argmax(-1) == target).float().mean()
    return Score(len(answer_ids), float(nll), float(top1))
