"""Any OpenAI-compatible server as a backend: vLLM, SGLang, TGI, llama.cpp, another trimserve.

The gateway forwards each request to the upstream's `/v1/completions` or `/v1/chat/completions`
as a stream (with `stream_options.include_usage`, so token counts come back whether or not the
client asked for them), turns the upstream's chunks into `Delta`s, and closes the upstream stream
when the client leaves (the upstream then aborts the request). At most `max_inflight` requests go
upstream at once and `max_queue` more wait at the gateway; beyond that, 429.

Upstream answers map to the client as follows: a 4xx that is the client's fault keeps its status
and message; 429 stays 429 with the upstream's Retry-After; 503 and a refused connection are 503
(`Unavailable`), 504 and a stall past the request timeout are 504; any other failure (a 5xx, a
401/403/404 that means the gateway is misconfigured, a body that is not the OpenAI API, a stream
cut short) is 502. A background check polls the upstream's health every few seconds, so `/ready`
and `trimserve_backend_up` follow it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from service.backend import (
    Delta,
    GenerationRequest,
    InvalidRequest,
    Memory,
    Observer,
    Overloaded,
    RequestTimeout,
    Score,
    ScoringUnsupported,
    Unavailable,
    UpstreamFailed,
    UpstreamRejected,
    Usage,
    check_sampling,
)

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class UpstreamConfig:
    """Where a variant's upstream is and how much the gateway sends it."""

    url: str  # base URL of the OpenAI API, e.g. http://host:8000/v1
    upstream_model: str | None = None  # the name to send upstream; None: the upstream's only model
    api_key: str | None = None
    max_inflight: int = 64  # requests sent upstream at once
    max_queue: int = 64  # requests waiting at the gateway beyond those
    max_tokens: int = 1024  # cap on a request's max_tokens
    request_timeout_s: float = 300.0
    health_path: str | None = None  # None: /health beside the API root, else GET {url}/models
    wait_s: float = 0.0  # how long start-up waits for an unreachable upstream (one still starting)


def upstream_error(status: int, body: bytes, retry_after: str | None, name: str) -> Exception:
    """The backend error for an upstream's non-200 answer."""
    try:
        error = json.loads(body).get("error") or {}
        message, param = str(error.get("message", "")), error.get("param")
    except (ValueError, AttributeError):
        message, param = body[:200].decode(errors="replace"), None
    message = message or f"HTTP {status}"
    where = f"variant {name!r}: upstream answered {status}: {message}"
    if status == 429:
        return Overloaded(where, float(retry_after) if retry_after and retry_after.isdigit() else 1.0)
    if status == 503:
        return Unavailable(where)
    if status == 504:
        return RequestTimeout(where)
    if 400 <= status < 500 and status not in (401, 403, 404):
        return UpstreamRejected(status, message, param if isinstance(param, str) else None)
    return UpstreamFailed(where)


async def sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """The payload of every `data:` line of a server-sent event stream."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if buffer.startswith(b"data:"):
        yield buffer[5:].strip()


class UpstreamBackend:
    kind = "url"

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        observer: Observer | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.observer = observer
        self.manifest = manifest
        self.upstream_model = config.upstream_model
        self.created = int(time.time())
        self._client: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(config.max_inflight)
        self._inflight = 0  # sent upstream or waiting for a slot
        self._running = 0
        self._accepting = False
        self._healthy = False
        self._health_task: asyncio.Task | None = None

    @property
    def api_root(self) -> str:
        url = self.config.url.rstrip("/")
        return url.removesuffix("/v1") if url.endswith("/v1") else url

    @property
    def healthy(self) -> bool:
        return self._accepting and self._healthy

    def _new_client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        connections = self.config.max_inflight + 8
        return httpx.AsyncClient(
            base_url=self.config.url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(self.config.request_timeout_s, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def check(self) -> None:
        """The upstream answers and speaks the OpenAI API, with the model asked for."""
        self._client = self._new_client()
        try:
            await self._await_models()
        finally:
            await self._client.aclose()
            self._client = None

    async def start(self) -> None:
        """Connect, check the upstream speaks the OpenAI API, pick the upstream model name."""
        self._client = self._client or self._new_client()
        self.upstream_model = await self._await_models()
        self._healthy = self._accepting = True
        self._health_task = asyncio.create_task(self._watch_health(), name=f"health-{self.name}")

    async def _await_models(self) -> str:
        """`_check_models`, retried while the upstream is unreachable, for up to `wait_s`."""
        deadline = time.monotonic() + self.config.wait_s
        while True:
            try:
                return await self._check_models()
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                log.info("variant %s: waiting for upstream %s", self.name, self.config.url)
                await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    async def _check_models(self) -> str:
        try:
            response = await self._client.get("models", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as err:
            raise Unavailable(f"variant {self.name!r}: upstream {self.config.url} is unreachable: {err}") from None
        try:
            models = [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise UpstreamFailed(
                f"variant {self.name!r}: {self.config.url}/models answered {response.status_code} with something "
                "other than the OpenAI model list; is this an OpenAI-compatible server (URL ending in /v1)?"
            ) from None
        if self.config.upstream_model is None:
            if len(models) != 1:
                raise UpstreamFailed(
                    f"variant {self.name!r}: upstream serves {models}; name the one to use (upstream_model)"
                )
            return models[0]
        if self.config.upstream_model not in models:
            raise UpstreamFailed(
                f"variant {self.name!r}: upstream has no model {self.config.upstream_model!r}; it serves {models}"
            )
        return self.config.upstream_model

    async def _probe(self) -> bool:
        try:
            if self.config.health_path is None:
                response = await self._client.get(f"{self.api_root}/health", timeout=CONNECT_TIMEOUT_S)
                if response.status_code != 404:
                    return response.status_code == 200
            response = await self._client.get(self.config.health_path or "models", timeout=CONNECT_TIMEOUT_S)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            healthy = await self._probe()
            if healthy != self._healthy:
                log.warning("variant %s: upstream %s is %s", self.name, self.config.url, "up" if healthy else "down")
            self._healthy = healthy

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        p = request.params
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.messages is not None:
            body["messages"] = list(request.messages)
        else:
            body["prompt"] = request.prompt
        if request.stop:
            body["stop"] = list(request.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if p.ignore_eos:
            body["ignore_eos"] = True  # an extension vLLM and trimserve read; sent only when asked for
        if p.cache_salt is not None:
            body["cache_salt"] = p.cache_salt  # as ignore_eos
        return body

    async def _admit(self) -> None:
        """Wait for a slot to send upstream; refuse when the gateway's queue is full too."""
        if not self._accepting:
            raise Unavailable(f"variant {self.name!r} is shutting down")
        if not self._healthy:
            raise Unavailable(f"variant {self.name!r}: upstream {self.config.url} is down")
        if self._inflight >= self.config.max_inflight + self.config.max_queue:
            raise Overloaded(f"{self.name}: {self._inflight} requests in flight", retry_after=1.0)
        self._inflight += 1
        arrived = time.monotonic()
        try:
            await self._slots.acquire()
        except BaseException:
            self._inflight -= 1
            raise
        self._running += 1
        if self.observer is not None:
            self.observer.queue_wait(time.monotonic() - arrived)
            self.observer.load(self._running, self._inflight - self._running)

    def _release(self) -> None:
        self._slots.release()
        self._running -= 1
        self._inflight -= 1
        if self.observer is not None:
            self.observer.load(self._running, self._inflight - self._running)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        check_sampling(request.params, self.config.max_tokens)
        if isinstance(request.prompt, str) and not request.prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        await self._admit()
        path = "chat/completions" if request.messages is not None else "completions"
        try:
            async with self._client.stream("POST", path, json=self._body(request)) as response:
                if response.status_code != 200:
                    raise upstream_error(
                        response.status_code, await response.aread(), response.headers.get("retry-after"), self.name
                    )
                async for delta in self._deltas(response, chat=request.messages is not None):
                    yield delta
        except httpx.TimeoutException:
            raise RequestTimeout(f"variant {self.name!r}: upstream did not answer in time") from None
        except httpx.ConnectError as err:
            self._healthy = False
            raise Unavailable(f"variant {self.name!r}: upstream {self.config.url} is unreachable: {err}") from None
        except httpx.HTTPError as err:  # the connection broke: a restart, a crash, a proxy cutting it
            if not self._accepting:
                raise Unavailable(f"variant {self.name!r} was shut down") from None
            raise UpstreamFailed(f"variant {self.name!r}: upstream stream broke: {type(err).__name__}") from None
        finally:
            self._release()

    async def _deltas(self, response: httpx.Response, chat: bool) -> AsyncIterator[Delta]:
        finish = None
        async for data in sse_data(response):
            if data == b"[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise UpstreamFailed(f"variant {self.name!r}: upstream sent a chunk that is not JSON") from None
            if "error" in chunk:
                error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                status = error.get("status") or error.get("code")
                raise upstream_error(
                    status if isinstance(status, int) else 502, json.dumps({"error": error}).encode(), None, self.name
                )
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                finish = choice.get("finish_reason") or finish
                if text:
                    yield Delta(text)
            usage = chunk.get("usage")
            if usage and not chunk.get("choices"):
                if finish is None:
                    raise UpstreamFailed(f"variant {self.name!r}: upstream sent usage before a finish reason")
                yield Delta(
                    "",
                    "length" if finish == "length" else "stop",
                    Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
                )
                return
        raise UpstreamFailed(f"variant {self.name!r}: upstream stream ended without a finish reason and usage")

    def load(self) -> tuple[int, int]:
        return self._running, self._inflight - self._running

    async def _tokenize(self, body: dict[str, Any]) -> list[int]:
        response = await self._client.post(f"{self.api_root}/tokenize", json={"model": self.upstream_model, **body})
        if response.status_code != 200:
            raise ScoringUnsupported(f"variant {self.name!r}: upstream has no /tokenize ({response.status_code})")
        return list(response.json()["tokens"])

    async def score(self, request: GenerationRequest, answer: str, answer_ids: tuple[int, ...] | None) -> Score:
        """vLLM's way: the prompt's tokens from `/tokenize` (chat messages through the upstream's own
        template), then one completion of prompt + answer with `prompt_logprobs: 1` and `max_tokens: 1`,
        whose entries carry each answer token's log-probability and rank. Upstreams without
        `/tokenize` or `prompt_logprobs` (trimserve, TGI, llama.cpp's server) raise ScoringUnsupported."""
        if request.messages is not None:
            prompt = await self._tokenize({"messages": list(request.messages), "add_generation_prompt": True})
        elif isinstance(request.prompt, list):
            prompt = list(request.prompt)
        else:
            prompt = await self._tokenize({"prompt": request.prompt})
        ids = (
            list(answer_ids)
            if answer_ids is not None
            else await self._tokenize({"prompt": answer, "add_special_tokens": False})
        )
        if not ids:
            return Score(0, 0.0, 1.0)
        body = {"model": self.upstream_model, "prompt": prompt + ids, "max_tokens": 1, "prompt_logprobs": 1}
        response = await self._client.post("completions", json={**body, "temperature": 0})
        if response.status_code != 200:
            raise ScoringUnsupported(
                f"variant {self.name!r}: upstream refused prompt_logprobs ({response.status_code})"
            )
        entries = response.json()["choices"][0].get("prompt_logprobs")
        if not entries or len(entries) != len(prompt) + len(ids):
            raise ScoringUnsupported(f"variant {self.name!r}: upstream's answer has no prompt_logprobs")
        nll = top1 = 0.0
        for token, entry in zip(ids, entries[len(prompt) :], strict=True):
            chosen = entry[str(token)]
            nll -= chosen["logprob"]
            top1 += chosen.get("rank") == 1
        return Score(len(ids), nll / len(ids), top1 / len(ids))

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "backend": self.kind,
            "upstream": self.config.url,
            "upstream_model": self.upstream_model,
            "healthy": self.healthy,
            "created": self.created,
            "manifest": self.manifest,
        }
        if self.manifest:
            info["params"] = self.manifest.get("params")
            info["source"] = self.manifest.get("name")
        return info

    def memory(self) -> Memory:
        return Memory()  # a remote server's memory is its own; `vllm` backends read their child's

    async def close(self, timeout: float) -> None:
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()  # ends the streams still open: their clients get an error event


def api_key_from_env(variable: str | None) -> str | None:
    """The upstream API key from the named environment variable (never from the config file itself)."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"api_key_env {variable!r} is not set in the environment")
    return value
