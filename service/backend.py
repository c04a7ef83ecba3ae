"""The seam between the HTTP layer and whatever generates the text: one backend per variant.

The HTTP layer (`service.api`, `service.serving`) knows backends only through this module: a
backend takes a `GenerationRequest` (the prompt or chat messages as the client sent them, the
sampling settings, stop strings) and yields text `Delta`s, the last one carrying the finish
reason and the token usage; it describes itself (`describe`: what it is, how it was made, where
it runs), reports its memory (`memory`), and stops (`close`). Backends: the in-process engine
(`service.backends.native`), any OpenAI-compatible server (`service.backends.upstream`), and a
`vllm serve` process trimserve supervises (`service.backends.vllm`).

Failures are the typed errors below; the HTTP layer maps each to one status. Nothing here imports
torch or knows HTTP.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]

# What torch.Generator.manual_seed accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # a seeded request samples the same tokens whatever its batch-mates
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS tokens
    ignore_eos: bool = False
    # Not sampling, but per request: only requests with the same salt share kept prompt caches, so a
    # tenant cannot time another's prompts (vLLM's `cache_salt`); None shares with unsalted requests
    cache_salt: str | None = None


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


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the client sent it: a completion `prompt` or chat `messages`."""

    request_id: str
    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    stop: tuple[str, ...] = ()  # stop strings, cut from the text


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Score:
    """How a model rates a given answer to a request: its mean token NLL, and the share of the
    answer's tokens that are its own greedy (top-1) choice at their position."""

    tokens: int
    nll: float
    top1: float


@dataclass(frozen=True)
class Delta:
    """A piece of the answer; the last one has the finish reason and the usage, and, from a backend
    that knows them, the answer's token ids (so a shadow scorer need not tokenize the text again)
    and the answer's score under the model that wrote it."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    token_ids: tuple[int, ...] | None = None
    own_score: Score | None = None


@dataclass
class Memory:
    """What a backend holds: resident memory of its processes, and device memory by device."""

    rss_bytes: int | None = None
    kv_cache_bytes: int | None = None  # what an in-process engine's KV cache holds now (it grows with load)
    device_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> allocated/reserved/peak


class Observer(Protocol):
    """What a backend reports about its own queue and process; the Prometheus adapter implements it."""

    def queue_wait(self, seconds: float) -> None: ...

    def load(self, running: int, waiting: int) -> None: ...

    def prompt_cached(self, tokens: int) -> None:
        """An admitted request's first `tokens` prompt tokens came from the prefix cache, not a prefill."""
        ...

    def restarted(self) -> None:
        """A supervised backend process died and was started again."""
        ...


class Backend(Protocol):
    """One variant's generator; see the module docstring."""

    name: str

    async def check(self) -> None:
        """Cheap checks before anything starts; raise naming the variant and the cause."""
        ...

    async def start(self) -> None:
        """Load or connect; raise (with the variant's name) when it cannot serve."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The answer, piece by piece. Errors come at the first iteration, before any text; closing
        the iterator early (the client left) aborts the request."""
        ...

    def describe(self) -> dict[str, Any]:
        """What GET /v1/variants/{name} shows: backend kind, dtype, device, sizes, manifest, health."""
        ...

    def memory(self) -> Memory: ...

    def load(self) -> tuple[int, int]:
        """Requests (running, waiting) now."""
        ...

    async def score(self, request: GenerationRequest, answer: str, answer_ids: tuple[int, ...] | None) -> Score:
        """Rate `answer` (the text another model gave; its token ids when known) as a continuation
        of `request`, in one forward pass and no generation. Raises ScoringUnsupported where the
        backend cannot (see the backend's docstring)."""
        ...

    @property
    def healthy(self) -> bool:
        """Whether the backend can take requests now."""
        ...

    async def close(self, timeout: float) -> None:
        """Stop taking requests, let those in flight finish for up to `timeout` s, end the rest."""
        ...


class BackendError(Exception):
    """Base of the errors a backend raises; the HTTP layer maps each to a status."""


class ScoringUnsupported(BackendError):
    """The backend cannot rate a given answer (its upstream has no prompt log-probabilities)."""


class InvalidRequest(BackendError):
    """Bad input (e.g. prompt too long): HTTP 400. `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(BackendError):
    """The variant has as many requests in flight as it takes: HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(BackendError):
    """The request ran past its deadline: HTTP 504 (OpenAI type `timeout`)."""


class Unavailable(BackendError):
    """The backend is stopped, shutting down, or (re)starting: HTTP 503."""


class GenerationError(BackendError):
    """Generating one request failed (its own sampling or model step); the others carry on: HTTP 500."""


class UpstreamFailed(BackendError):
    """An upstream server failed (a 5xx, an answer that is not the OpenAI API, a stream cut): HTTP 502."""


class UpstreamRejected(BackendError):
    """An upstream server refused the request as the client's fault: its 4xx status passes through."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
