"""What the engine and its caller exchange besides the backend types: limits, token events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from service.backend import FinishReason, SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one variant's engine; the server builds it from its settings."""

    max_batch_size: int | None = None  # requests decoded together; None: as many as kv_cache_bytes holds
    # what the slots may take at full context, and kept prefixes of what they leave; None: 1/4 of free memory
    kv_cache_bytes: int | None = None
    # Prompt tokens per step: bounds the stall a burst of arrivals causes the running requests. Fewer,
    # larger prefill steps serve more in all (on 2 cores at concurrency 8 and 16: 1,024 gave 1.07-1.13x the
    # tokens/s of 256, a first token after about 1 s instead of 0.35 s; a 1,024-token chunk of a long prompt stalled
    # the running streams for 1.9 s)
    prefill_tokens_per_step: int = 1024
    # Finished requests' caches are kept, in what the slots leave of kv_cache_bytes, so a prompt that
    # starts the same way skips that part; this caps them (0: none kept, None: no cap)
    prefix_cache_bytes: int | None = None
    # The engine owns its model, which nothing else changes: it may free the model's weights it keeps
    # in a faster layout and share the rest with other engines' equal weights (the server's engines
    # do; a caller that still runs or changes the model itself, as tests do, must not ask).
    release_model_weights: bool = False
    # Compile the decode steps (Llama-family models): faster per token, at the price of compiling at
    # start-up (minutes on a small CPU), the plain weights kept beside the blocked ones, and greedy
    # tokens of one request decoding alone equal only up to near bf16 ties, as against `model.generate`.
    compile_decode: bool = False
    max_queue: int = 64  # requests in flight beyond the batch slots get Overloaded (HTTP 429)
    max_prompt_tokens: int = 2048  # longer prompts get InvalidRequest (HTTP 400)
    max_tokens: int = 1024  # cap on SamplingParams.max_tokens (HTTP 400 beyond)
    request_timeout_s: float = 300.0  # deadline from arrival to the last token


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request; the last event carries the finish reason."""

    token_id: int
    finish_reason: FinishReason | None = None
    logprob: float = 0.0  # under the model's own distribution (before temperature and top-p)
    greedy: bool = True  # whether it is the model's top-1 choice


class Engine(Protocol):
    """One loaded model. `generate` yields tokens as they are produced; `abort` frees the slot."""

    name: str
    cache_bytes: int | None  # what its KV cache holds now, if it can tell

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]: ...

    async def abort(self, request_id: str) -> None: ...
