"""One request's trip through a variant's engine, shared by the completion endpoints.

`Generation` turns engine tokens into text (incremental detokenization, stop strings), counts
usage, aborts the engine request when it stops early or the client leaves, and records the
request's outcome and end-to-end latency. `respond` wraps it as a JSON or SSE response.
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

from service.engine.types import (
    FinishReason,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    SamplingParams,
    TokenEvent,
)
from service.errors import APIError, error_event, from_exception
from service.metrics import Metrics
from service.protocol import SamplingRequest, UnsupportedField, Usage, new_id
from service.state import ServerState, Variant
from service.textstream import IncrementalDetokenizer, StopMatcher

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
    """Text deltas for one request; `start()` waits for the first token (errors surface there)."""

    def __init__(
        self, variant: Variant, prompt_ids: list[int], params: SamplingParams, stops: list[str], metrics: Metrics
    ) -> None:
        self.variant = variant
        self.prompt_ids = prompt_ids
        self.request_id = new_id("req")
        self.metrics = metrics
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._started = time.perf_counter()
        self._events = variant.engine.generate(prompt_ids, params, self.request_id)
        self._detok = IncrementalDetokenizer(variant.tokenizer, prompt_ids)
        self._stopper = StopMatcher(stops)
        self._pending: TokenEvent | None = None
        self._exhausted = False
        self._recorded = False

    @property
    def usage(self) -> Usage:
        n = len(self.prompt_ids)
        return Usage(prompt_tokens=n, completion_tokens=self.completion_tokens, total_tokens=n + self.completion_tokens)

    def _record(self, outcome: str) -> None:
        if self._recorded:
            return
        self._recorded = True
        self.metrics.requests.labels(variant=self.variant.name, outcome=outcome).inc()
        if outcome == "ok":
            self.metrics.latency.labels(variant=self.variant.name).observe(time.perf_counter() - self._started)

    async def _next(self) -> TokenEvent | None:
        try:
            return await anext(self._events)
        except StopAsyncIteration:
            self._exhausted = True
            return None

    async def start(self) -> None:
        """Queue the request and wait for its first token; engine errors are raised here."""
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
            event, self._pending = self._pending, None
            while event is not None:
                self.completion_tokens += 1
                text = self._stopper.feed(self._detok.add(event.token_id))
                if text:
                    yield text
                if self._stopper.stopped:
                    self.finish_reason = "stop"
                    break
                if event.finish_reason is not None:
                    self.finish_reason = event.finish_reason
                    self._exhausted = True
                    break
                event = await self._next()
            if not self._stopper.stopped:
                tail = self._stopper.feed(self._detok.flush())
                tail += self._stopper.flush()
                if tail:
                    yield tail
            self.finish_reason = self.finish_reason or "stop"
            self._record("ok")
        except BaseException as err:
            self._exhausted = self._exhausted or not isinstance(err, asyncio.CancelledError | GeneratorExit)
            self._record(outcome_of(err))
            raise
        finally:
            await self.close()

    async def text(self) -> str:
        return "".join([piece async for piece in self.deltas()])

    async def close(self) -> None:
        """Free the engine slot of a request that did not run to its end."""
        if self._exhausted:
            return
        self._exhausted = True
        self._record("cancelled")
        with anyio.CancelScope(shield=True):
            await self.variant.engine.abort(self.request_id)
            await self._events.aclose()


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
    variant: Variant,
    body: SamplingRequest,
    prompt_ids: list[int],
    params: SamplingParams,
    fmt: ResponseFormat,
    prompt_field: str,
) -> Response:
    """Run the request and answer with JSON, or with SSE when `stream` is set."""
    generation = Generation(variant, prompt_ids, params, body.stop_strings(), state.metrics)
    rid, model = new_id(fmt.id_prefix), variant.name
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
        if error.param == "prompt":  # the engine's name for what this endpoint calls `prompt_field`
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
    encode: Callable[[Variant], list[int]],
    default_max_tokens: int,
    fmt: ResponseFormat,
    prompt_field: str,
) -> Response:
    """Check, route (variant or experiment arm), tokenize off the event loop, and respond."""
    try:
        body.check_supported()
    except UnsupportedField as err:
        raise from_exception(err) from None
    variant = state.resolve(body.model, ab_key or body.user)
    try:
        prompt_ids = await asyncio.to_thread(encode, variant)
    except (APIError, UnsupportedField) as err:
        error = from_exception(err)
        error.headers[VARIANT_HEADER] = variant.name
        state.metrics.requests.labels(variant=variant.name, outcome="rejected").inc()
        raise error from None
    params = body.to_sampling_params(default_max_tokens)
    return await respond(request, state, variant, body, prompt_ids, params, fmt, prompt_field)
