"""OpenAI-compatible request and response bodies (the subset trimserve serves).

Requests validate their own fields (pydantic: HTTP 400 on bad values) and convert themselves to
engine settings with `to_sampling_params`. Fields OpenAI defines but trimserve cannot honour are
rejected with a clear message instead of being silently ignored; unknown fields are logged and
ignored, as other OpenAI-compatible servers do.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.engine.types import FinishReason, SamplingParams

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4


class UnsupportedField(ValueError):
    """A field value trimserve does not implement (HTTP 400 naming the field)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored(self) -> OpenAIBase:
        if self.model_extra:
            log.info("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self


class StreamOptions(OpenAIBase):
    include_usage: bool = False  # a final chunk with empty choices carries `usage`


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def invalid_text(value: Any, path: str = "") -> str | None:
    """The path of the first string in `value` that is not valid Unicode (a lone surrogate such as
    "\\ud800", which JSON can escape but no tokenizer can encode), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        found = invalid_text(key, path or "body") if isinstance(key, str) else None
        found = found or invalid_text(item, where)
        if found is not None:
            return found
    return None


class SamplingRequest(OpenAIBase):
    """Fields shared by completions and chat completions.

    Sampling values (max_tokens, temperature, top_p, seed) are checked in one place, where the
    request enters its backend (`service.engine.types.check_sampling`), not here.
    """

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: generate exactly max_tokens (load generators use it)
    cache_salt: str | None = Field(None, min_length=1)  # extension (vLLM's): the prefix cache's scope
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        """Raise UnsupportedField for values trimserve would otherwise silently ignore or cannot read."""
        bad = invalid_text(self.model_dump(exclude_none=True))
        if bad is not None:
            param = bad.split(".")[0]
            raise UnsupportedField(param, f"{bad}: text is not valid Unicode (it holds a lone surrogate)")
        if self.n != 1:
            raise UnsupportedField("n", f"n={self.n} is not supported; trimserve returns one choice (n=1)")
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise UnsupportedField(param, f"{param} is not supported; leave it at 0")
        if self.logprobs not in (None, False, 0):
            raise UnsupportedField("logprobs", "logprobs are not supported")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported")
        stops = self.stop_strings()
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise UnsupportedField("stop", f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "stream_options is only allowed when stream is true")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Request value, else the server default, else OpenAI's default."""
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            cache_salt=self.cache_salt,
        )


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", "best_of > 1 is not supported")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (a batch of prompts is a 400)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            raise UnsupportedField("prompt", "the prompt is empty")
        if all(isinstance(p, int) for p in prompt):
            return list(prompt)  # type: ignore[arg-type]
        if len(prompt) != 1:
            raise UnsupportedField("prompt", "a batch of prompts is not supported; send one prompt per request")
        return prompt[0]  # type: ignore[return-value]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBase):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise UnsupportedField("tools", "tools are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise UnsupportedField("response_format", "only response_format type 'text' is supported")

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        params = super().to_sampling_params(default_max_tokens)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return SamplingParams(**{**params.__dict__, "max_tokens": self.max_completion_tokens})
        return params

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "trimserve"
    root: str | None = None  # the source the weights came from
    parent: str | None = None  # the base model of a variant


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
