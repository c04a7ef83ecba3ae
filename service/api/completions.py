"""POST /v1/completions: text completion, JSON or server-sent events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from service.deps import ReadyStateDep
from service.engine.types import FinishReason
from service.protocol import CompletionChoice, CompletionRequest, CompletionResponse, ErrorResponse, Usage
from service.serving import run_request
from service.state import Variant

router = APIRouter(prefix="/v1", tags=["completions"])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)}


class CompletionFormat:
    id_prefix = "cmpl"

    def opening(self, rid: str, model: str) -> None:
        return None

    def chunk(self, rid: str, model: str, text: str, finish: FinishReason | None) -> CompletionResponse:
        return CompletionResponse(id=rid, model=model, choices=[CompletionChoice(text=text, finish_reason=finish)])

    def usage_chunk(self, rid: str, model: str, usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=rid, model=model, choices=[], usage=usage)

    def whole(self, rid: str, model: str, text: str, finish: FinishReason | None, usage: Usage) -> CompletionResponse:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return CompletionResponse(id=rid, model=model, choices=[choice], usage=usage)


def _encoder(body: CompletionRequest):
    def encode(variant: Variant) -> list[int]:
        prompt = body.single_prompt()
        return prompt if isinstance(prompt, list) else list(variant.tokenizer.encode(prompt))

    return encode


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    state: ReadyStateDep,
    x_ab_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Complete `prompt`. With `stream: true`, SSE chunks end with `data: [DONE]`; with
    `stream_options.include_usage`, a last chunk with empty `choices` carries `usage`."""
    encode = _encoder(body)
    return await run_request(
        request, state, body, x_ab_key, encode, state.settings.default_max_tokens, CompletionFormat(), "prompt"
    )
