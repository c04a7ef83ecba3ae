"""POST /v1/completions: text completion, JSON or server-sent events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from service.backend import FinishReason, GenerationRequest
from service.deps import ReadyStateDep
from service.protocol import CompletionChoice, CompletionRequest, CompletionResponse, ErrorResponse, Usage
from service.serving import run_request

router = APIRouter(prefix="/v1", tags=["completions"])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 500, 502, 503, 504)}


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


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    state: ReadyStateDep,
    x_ab_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Complete `prompt`. With `stream: true`, SSE chunks end with `data: [DONE]`; with
    `stream_options.include_usage`, a last chunk with empty `choices` carries `usage`."""
    default_max_tokens = state.settings.default_max_tokens

    def build(request_id: str) -> GenerationRequest:
        params = body.to_sampling_params(default_max_tokens)
        return GenerationRequest(request_id, params, prompt=body.single_prompt(), stop=tuple(body.stop_strings()))

    return await run_request(request, state, body, x_ab_key, build, CompletionFormat(), "prompt")
