"""What the HTTP layer and the engine exchange: sampling settings, token events, typed errors."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # a seeded request samples the same tokens whatever its batch-mates
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS tokens
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one variant's engine; the server builds it from its settings."""

    max_batch_size: int = 8  # requests decoded together
    max_queue: int = 64  # waiting requests beyond this get Overloaded (HTTP 429)
    max_prompt_tokens: int = 2048  # longer prompts get InvalidRequest (HTTP 400)
    max_tokens: int = 1024  # cap on SamplingParams.max_tokens (HTTP 400 beyond)
    request_timeout_s: float = 300.0  # deadline from arrival to the last token


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request; the last event carries the finish reason."""

    token_id: int
    finish_reason: FinishReason | None = None


class EngineError(Exception):
    """Base of the errors the engine raises; the HTTP layer maps each to a status."""


class InvalidRequest(EngineError):
    """Bad input (e.g. prompt too long): HTTP 400. `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GenerationError(EngineError):
    """Generating one request failed (its own sampling or model step); the others carry on: HTTP 500."""


class Overloaded(EngineError):
    """The variant's queue is full: HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(EngineError):
    """The request ran past its deadline: HTTP 504 (OpenAI type `timeout`)."""


class EngineDead(EngineError):
    """The engine loop stopped or is shutting down: HTTP 503."""


# What torch.Generator.manual_seed accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def check_sampling(params: SamplingParams, max_tokens: int) -> None:
    """Raise InvalidRequest, naming the field, for sampling values that cannot be honoured."""
    if not 1 <= params.max_tokens <= max_tokens:
        raise InvalidRequest(f"max_tokens is {params.max_tokens}; it must be between 1 and {max_tokens}", "max_tokens")
    if not (math.isfinite(params.temperature) and 0 <= params.temperature <= 2):
        raise InvalidRequest(f"temperature must be a finite number in [0, 2], not {params.temperature}", "temperature")
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise InvalidRequest(f"top_p must be a finite number in (0, 1], not {params.top_p}", "top_p")
    if params.seed is not None and not SEED_MIN <= params.seed <= SEED_MAX:
        raise InvalidRequest("seed must be an integer in [-2**63, 2**64 - 1]", "seed")


class Engine(Protocol):
    """One loaded model. `generate` yields tokens as they are produced; `abort` frees the slot."""

    name: str

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]: ...

    async def abort(self, request_id: str) -> None: ...
