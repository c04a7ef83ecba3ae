"""The server on a real loopback socket (disconnects, shutdown), and one run with the real model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import httpx2
import openai
import pytest
import uvicorn

from service.app import create_app
from service.backends import make_backend
from service.metrics import Metrics
from service.settings import ModelSpec, Settings
from tests.service_fakes import FakeEngine, fake_backends
from tests.tiny_models import tiny_llama


class LiveServer:
    def __init__(self, app, engines: dict[str, FakeEngine]) -> None:
        self.engines = engines
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def live(tokenizer) -> Iterator[LiveServer]:
    engines: dict[str, FakeEngine] = {}
    settings = Settings(shutdown_timeout_s=5)
    app = create_app(settings, backends=fake_backends(settings, tokenizer, tiny_llama(layers=1), ("full",), engines))
    server = LiveServer(app, engines)
    server.engines["full"].delay = 0.02
    yield server
    server.stop()


def test_stream_disconnect_aborts_engine_request(live: LiveServer) -> None:
    engine = live.engines["full"]
    body = {"model": "full", "prompt": "one two three", "max_tokens": 500, "stream": True}
    with httpx.Client(base_url=live.url) as client, client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.active
    assert wait_for(lambda: len(engine.aborted) == 1 and not engine.active)
    metrics = httpx.get(f"{live.url}/metrics").text
    assert wait_for(lambda: 'outcome="cancelled"' in httpx.get(f"{live.url}/metrics").text), metrics


def test_non_stream_disconnect_aborts_engine_request(live: LiveServer) -> None:
    engine = live.engines["full"]
    body = {"model": "full", "prompt": "one two three", "max_tokens": 500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", json=body, timeout=0.3)
    assert wait_for(lambda: len(engine.aborted) == 1 and not engine.active)


def test_graceful_shutdown_finishes_in_flight(live: LiveServer) -> None:
    body = {"model": "full", "prompt": "one two three", "max_tokens": 25}
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: result.update(r=httpx.post(f"{live.url}/v1/completions", json=body)))
    worker.start()
    assert wait_for(lambda: bool(live.engines["full"].active))
    live.stop()
    worker.join(timeout=10)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 25
    assert live.engines["full"].stopped and not live.thread.is_alive()


@pytest.mark.integration
def test_real_model_and_engine_through_openai_client(default_model_dir) -> None:
    settings = Settings(max_prompt_tokens=256, max_tokens=32, max_batch_size=4)
    spec = ModelSpec(name="full", source=str(default_model_dir), dtype="fp32", device="cpu")
    metrics = Metrics()
    backend = make_backend(spec, settings, metrics.observer("full"))
    app = create_app(settings, backends=[backend], metrics=metrics)

    async def scenario() -> None:
        transport = httpx2.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx2.AsyncClient(transport=transport) as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="k", http_client=http, max_retries=0)
            question = [{"role": "user", "content": "What is the capital of France?"}]
            chat = await client.chat.completions.create(model="full", messages=question, max_tokens=12, temperature=0)
            assert "Paris" in chat.choices[0].message.content
            # Greedy answers are the same alone and batched with others, and streamed or not.
            args = {"model": "full", "prompt": "The three primary colors are", "max_tokens": 10, "temperature": 0}
            alone = await client.completions.create(**args)
            batch = await asyncio.gather(
                *(client.completions.create(**{**args, "prompt": p}) for p in ("Water boils at", "Once upon a time")),
                client.completions.create(**args, stream=True, stream_options={"include_usage": True}),
            )
            chunks = [c async for c in batch[2]]
            assert "".join(c.choices[0].text for c in chunks if c.choices) == alone.choices[0].text
            assert chunks[-1].usage.completion_tokens == alone.usage.completion_tokens <= 10
            assert all(r.usage.completion_tokens >= 1 for r in batch[:2])
            # The next turn of the chat starts with the first turn's cache, kept when it finished.
            kept = len(backend.engine.prefixes)
            cached = metrics.prompt_tokens_cached.labels(variant="full")._value.get()
            turn = [*question, {"role": "assistant", "content": chat.choices[0].message.content}]
            turn.append({"role": "user", "content": "And of Italy?"})
            second = await client.chat.completions.create(model="full", messages=turn, max_tokens=12, temperature=0)
            assert "Rome" in second.choices[0].message.content
            assert len(backend.engine.prefixes) == kept + 1
            took = metrics.prompt_tokens_cached.labels(variant="full")._value.get() - cached
            assert chat.usage.prompt_tokens < took < second.usage.prompt_tokens  # the question and its answer

    asyncio.run(scenario())
