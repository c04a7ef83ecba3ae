"""One request's trip through a variant's backend, shared by the completion endpoints.

`Generation` reads the backend's text deltas, closes the backend's stream (which aborts the
request) when it stops early or the client leaves, and records the request's outcome, time to
first token, time per output token, end-to-end latency and token counts: measured here, the same
way for every backend. `respond` wraps it as a JSON or SSE response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from service.backend import (
    Backend,
    Delta,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    Score,
)
from service.errors import APIError, error_event, from_exception
from service.metrics import Metrics
from service.protocol import SamplingRequest, UnsupportedField, Usage, new_id
from service.shadow import Exchange, Shadow
from service.state import ServerState

log = logging.getLogger(__name__)

T = TypeVar("T")
VARIANT_HEADER = "X-Trimserve-Variant"


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


def outcome_of(err: BaseException) -> str:
    if isinstance(err, InvalidRequest | Overloaded | APIError):
        return "rejected"
    if isinstance(err, RequestTimeout):
        return "timeout"
    if isinstance(err, asyncio.CancelledError | GeneratorExit | ClientDisconnected):
        return "cancelled"
    return "error"


class Generation:
    """Text deltas for one request; `start()` waits for the first delta (errors surface there)."""

    def __init__(
        self, backend: Backend, request: GenerationRequest, metrics: Metrics, shadow: Shadow | None = None
    ) -> None:
        self.backend = backend
        self.request = request
        self.metrics = metrics
        self.shadow = shadow
        self.finish_reason: FinishReason | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self._pieces: list[str] = []  # the answer so far, for the shadow
        self._answer_ids: tuple[int, ...] | None = None
        self._own_score: Score | None = None
        self._started = time.perf_counter()
        self._first_text_at: float | None = None
        self._deltas = backend.generate(request)
        self._pending: Delta | None = None
        self._exhausted = False
        self._recorded = False

    @property
    def usage(self) -> Usage:
        n, m = self.prompt_tokens, self.completion_tokens
        return Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)

    def _record(self, outcome: str) -> None:
        if self._recorded:
            return
        self._recorded = True
        name = self.backend.name
        self.metrics.requests.labels(variant=name, outcome=outcome).inc()
        if outcome != "ok":
            return
        finished = time.perf_counter()
        first = self._first_text_at or finished
        self.metrics.latency.labels(variant=name).observe(finished - self._started)
        self.metrics.ttft.labels(variant=name).observe(first - self._started)
        if self.completion_tokens > 1:
            self.metrics.tpot.labels(variant=name).observe((finished - first) / (self.completion_tokens - 1))
        self.metrics.prompt_tokens.labels(variant=name).inc(self.prompt_tokens)
        self.metrics.generated_tokens.labels(variant=name).inc(self.completion_tokens)

    async def _next(self) -> Delta | None:
        try:
            return await anext(self._deltas)
        except StopAsyncIteration:
            self._exhausted = True
            return None

    async def start(self) -> None:
        """Send the request and wait for its first delta; backend errors are raised here."""
        try:
            self._pending = await self._next()
        except BaseException as err:
            self._record(outcome_of(err))
            if isinstance(err, asyncio.CancelledError):
                await self.close()
            self._exhausted = True  # a generator that raised is finished
            raise

    async def deltas(self) -> AsyncIterator[str]:
        """The response text, piece by piece; sets finish_reason and usage on the way."""
        try:
            delta, self._pending = self._pending, None
            while delta is not None:
                if delta.text:
                    if self._first_text_at is None:
                        self._first_text_at = time.perf_counter()
                    self._pieces.append(delta.text)
                    yield delta.text
                if delta.finish_reason is not None:
                    self.finish_reason = delta.finish_reason
                    if delta.usage is not None:
                        self.prompt_tokens = delta.usage.prompt_tokens
                        self.completion_tokens = delta.usage.completion_tokens
                    self._answer_ids, self._own_score = delta.token_ids, delta.own_score
                    self._exhausted = True
                    break
                delta = await self._next()
            self.finish_reason = self.finish_reason or "stop"
            self._record("ok")
            if self.shadow is not None:  # the whole answer is out; offering never waits
                answer = "".join(self._pieces)
                self.shadow.offer(Exchange(self.backend.name, self.request, answer, self._answer_ids, self._own_score))
        except BaseException as err:
            self._exhausted = self._exhausted or not isinstance(err, asyncio.CancelledError | GeneratorExit)
            self._record(outcome_of(err))
            raise
        finally:
            await self.close()

    async def text(self) -> str:
        return "".join([piece async for piece in self.deltas()])

    async def close(self) -> None:
        """Close the backend's stream; for a request that did not run to its end, that aborts it."""
        if not self._exhausted:
            self._exhausted = True
            self._record("cancelled")
        with anyio.CancelScope(shield=True):
            await self._deltas.aclose()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (ClientDisconnected) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class ResponseFormat(Protocol):
    """How one endpoint shapes its bodies (text completion vs chat)."""

    id_prefix: str

    def opening(self, rid: str, model: str) -> BaseModel | None: ...

    def chunk(self, rid: str, model: str, text: str, finish: FinishReason | None) -> BaseModel: ...

    def usage_chunk(self, rid: str, model: str, usage: Usage) -> BaseModel: ...

    def whole(self, rid: str, model: str, text: str, finish: FinishReason | None, usage: Usage) -> BaseModel: ...


def sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


async def respond(
    request: Request,
    state: ServerState,
    backend: Backend,
    body: SamplingRequest,
    work: GenerationRequest,
    fmt: ResponseFormat,
    prompt_field: str,
) -> Response:
    """Run the request and answer with JSON, or with SSE when `stream` is set."""
    generation = Generation(backend, work, state.metrics, state.shadow)
    rid, model = new_id(fmt.id_prefix), backend.name
    headers = {VARIANT_HEADER: model}
    try:
        await until_disconnect(request, generation.start())
        if not body.stream:
            text = await until_disconnect(request, generation.text())
            whole = fmt.whole(rid, model, text, generation.finish_reason, generation.usage)
            return JSONResponse(whole.model_dump(mode="json"), headers=headers)
    except ClientDisconnected:
        log.info("%s: client disconnected; request aborted", rid)
        return Response(status_code=499, headers=headers)
    except Exception as err:
        await generation.close()
        error = from_exception(err, state.settings.retry_after_s)
        if error.param == "prompt":  # the backend's name for what this endpoint calls `prompt_field`
            error.param = prompt_field
        error.headers.update(headers)
        raise error from err

    async def events() -> AsyncIterator[str]:
        try:
            opening = fmt.opening(rid, model)
            if opening is not None:
                yield sse(opening)
            async for text in generation.deltas():
                yield sse(fmt.chunk(rid, model, text, None))
            yield sse(fmt.chunk(rid, model, "", generation.finish_reason))
            if body.include_usage():
                yield sse(fmt.usage_chunk(rid, model, generation.usage))
        except Exception as err:  # headers are sent: report in-band, then end the stream
            yield error_event(from_exception(err, state.settings.retry_after_s))
        finally:
            await generation.close()
        yield "data: [DONE]\n\n"

    headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def run_request(
    request: Request,
    state: ServerState,
    body: SamplingRequest,
    ab_key: str | None,
    build: Callable[[str], GenerationRequest],
    fmt: ResponseFormat,
    prompt_field: str,
) -> Response:
    """Check the body, route it (variant or experiment arm) and respond; `build` makes the
    backend's request from the body, given a request id."""
    try:
        body.check_supported()
        work = build(new_id("req"))
    except UnsupportedField as err:
        raise from_exception(err) from None
    backend = state.resolve(body.model, ab_key or body.user)
    return await respond(request, state, backend, body, work, fmt, prompt_field)
