"""POST /v1/chat/completions: chat over the tokenizer's chat template, JSON or SSE."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from service.api.completions import ERRORS
from service.backend import FinishReason, GenerationRequest
from service.deps import ReadyStateDep
from service.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    Usage,
)
from service.serving import run_request

router = APIRouter(prefix="/v1", tags=["chat"])


class ChatFormat:
    id_prefix = "chatcmpl"

    def opening(self, rid: str, model: str) -> ChatCompletionChunk:
        delta = ChatDelta(role="assistant", content="")
        return ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(delta=delta)])

    def chunk(self, rid: str, model: str, text: str, finish: FinishReason | None) -> ChatCompletionChunk:
        delta = ChatDelta(content=text) if text or finish is None else ChatDelta()
        return ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])

    def usage_chunk(self, rid: str, model: str, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=rid, model=model, choices=[], usage=usage)

    def whole(
        self, rid: str, model: str, text: str, finish: FinishReason | None, usage: Usage
    ) -> ChatCompletionResponse:
        choice = ChatChoice(message=ChatMessageOut(content=text), finish_reason=finish)
        return ChatCompletionResponse(id=rid, model=model, choices=[choice], usage=usage)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    state: ReadyStateDep,
    x_ab_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Answer `messages` formatted with the model's chat template. Streaming works as for
    /v1/completions (`chat.completion.chunk` events, usage chunk on `stream_options.include_usage`)."""
    default_max_tokens = state.settings.default_chat_max_tokens

    def build(request_id: str) -> GenerationRequest:
        params = body.to_sampling_params(default_max_tokens)
        messages = tuple(body.conversation())
        return GenerationRequest(request_id, params, messages=messages, stop=tuple(body.stop_strings()))

    return await run_request(request, state, body, x_ab_key, build, ChatFormat(), "messages")
