"""The HTTP layer through the official `openai` client, against a fake engine (no model work)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx2
import openai
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service_fakes import FakeEngine, fake_backends
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(layers=1)


class Server:
    def __init__(self, app, engines: dict[str, FakeEngine], http: httpx2.AsyncClient) -> None:
        self.app, self.engines, self.http = app, engines, http
        self.client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="key", http_client=http, max_retries=0)


async def start(tokenizer, tiny, **settings) -> AsyncIterator[Server]:
    engines: dict[str, FakeEngine] = {}
    config = Settings(**{"ab": {"chat": {"full": 50, "small": 50}}, **settings})
    app = create_app(config, backends=fake_backends(config, tokenizer, tiny, ("full", "small"), engines))
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx2.AsyncClient(transport=transport, base_url="http://test") as http,
    ):
        yield Server(app, engines, http)


@pytest.fixture
async def server(tokenizer, tiny) -> AsyncIterator[Server]:
    async for s in start(tokenizer, tiny, max_body_bytes=4096, max_tokens=64):
        yield s


async def test_completion_echoes_prompt_with_usage_and_variant(server: Server, tokenizer) -> None:
    prompt = "The quick brown fox jumps"
    raw = await server.client.completions.with_raw_response.create(
        model="full", prompt=prompt, max_tokens=5, temperature=0
    )
    completion = raw.parse()
    n = len(tokenizer.encode(prompt))
    assert raw.headers["x-trimserve-variant"] == "full"
    assert completion.model == "full"
    assert completion.choices[0].text == prompt  # the fake echoes the prompt's 5 tokens
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (n, 5)
    assert completion.usage.total_tokens == n + 5


async def test_stream_matches_non_stream_and_ends_with_usage(server: Server, tokenizer) -> None:
    prompt = "Héllo wörld 😀 世界 and more"  # multi-byte characters span several tokens
    args = {"model": "small", "prompt": prompt, "max_tokens": len(tokenizer.encode(prompt)), "temperature": 0}
    whole = await server.client.completions.create(**args)
    assert whole.choices[0].text == prompt
    stream = await server.client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.model == "small" for c in chunks)


async def test_sse_wire_format_ends_with_done(server: Server) -> None:
    body = {"model": "full", "prompt": "a b c", "max_tokens": 3, "stream": True}
    response = await server.http.post("/v1/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


async def test_chat_uses_template_and_streams(server: Server, tokenizer) -> None:
    messages = [{"role": "user", "content": "Say hi"}]
    chat = await server.client.chat.completions.create(model="full", messages=messages, max_tokens=4)
    prompt_ids, _ = server.engines["full"].seen[-1]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt_ids == tokenizer.encode(templated, add_special_tokens=False)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(prompt_ids) and chat.usage.completion_tokens == 4
    stream = await server.client.chat.completions.create(
        model="full", messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4


async def test_stop_string_cuts_text_and_aborts_engine(server: Server) -> None:
    completion = await server.client.completions.create(
        model="full", prompt="one two three four five six", max_tokens=30, stop=[" four", "zzz"]
    )
    assert completion.choices[0].text == "one two three"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 4  # the token completing " four" was generated
    assert len(server.engines["full"].aborted) == 1 and not server.engines["full"].active


async def test_ab_routing_is_sticky_per_user_and_header(server: Server) -> None:
    seen = {}
    for i in range(24):
        user = f"user-{i}"
        answers = {(await server.client.completions.create(model="chat", prompt="x", max_tokens=1, user=user)).model}
        answers.add((await server.client.completions.create(model="chat", prompt="y", max_tokens=1, user=user)).model)
        assert len(answers) == 1
        seen[user] = answers.pop()
    assert set(seen.values()) == {"full", "small"}
    keyed = {
        (
            await server.client.completions.create(
                model="chat", prompt="z", max_tokens=1, user=f"other-{i}", extra_headers={"X-AB-Key": "user-3"}
            )
        ).model
        for i in range(6)
    }
    assert keyed == {seen["user-3"]}


async def test_models_and_variants(server: Server) -> None:
    models = await server.client.models.list()
    assert [m.id for m in models.data] == ["full", "small", "chat"]
    info = (await server.http.get("/v1/variants/small")).json()
    assert info["name"] == "small" and info["params"]["total"] > 0 and info["weight_bytes"] > 0
    assert (info["dtype"], info["dtype_reason"]) == ("fp32", "requested")
    missing = await server.http.get("/v1/variants/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


async def test_health_ready_docs_metrics(server: Server) -> None:
    assert (await server.http.get("/health")).json() == {"status": "ok"}
    assert (await server.http.get("/ready")).json()["variants"] == ["full", "small"]
    assert (await server.http.get("/docs")).status_code == 200
    await server.client.completions.create(model="full", prompt="hi there", max_tokens=2)
    text = (await server.http.get("/metrics")).text
    assert 'trimserve_requests_total{outcome="ok",variant="full"} 1.0' in text
    assert 'trimserve_request_latency_seconds_count{variant="full"} 1.0' in text
    assert 'trimserve_process_resident_memory_bytes{variant="small"}' in text
    assert 'trimserve_kv_cache_bytes{variant="full"} 4096.0' in text
    assert 'trimserve_model_parameters{kind="nonzero",variant="full"}' in text
    await server.http.post("/v1/completions", json={"model": "full", "prompt": "x", "max_tokens": 1000})
    text = (await server.http.get("/metrics")).text
    assert 'trimserve_requests_total{outcome="rejected",variant="full"} 1.0' in text


async def test_latency_and_tokens_are_measured_per_request(server: Server, tokenizer) -> None:
    """TTFT, TPOT and token counts are measured above the backend, the same for every backend."""
    prompts = ["one two three four", "five six seven eight nine ten"]
    await asyncio.gather(
        *(
            server.client.completions.create(model="small", prompt=p, max_tokens=10, extra_body={"ignore_eos": True})
            for p in prompts
        )
    )
    metrics = (await server.http.get("/metrics")).text

    def value(name: str) -> float:
        lines = [ln for ln in metrics.splitlines() if ln.startswith(f'{name}{{variant="small"}}')]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    assert value("trimserve_prompt_tokens_total") == sum(len(tokenizer.encode(p)) for p in prompts)
    assert value("trimserve_generated_tokens_total") == 20
    assert value("trimserve_time_to_first_token_seconds_count") == 2
    assert value("trimserve_time_per_output_token_seconds_count") == 2
    assert value("trimserve_queue_wait_seconds_count") == 0  # the fake engine has no queue to report
    assert value("trimserve_backend_up") == 1


async def error_of(response: httpx2.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "full", "prompt": "x", "n": 2}, "n"),
        ({"model": "full", "prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"model": "full", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "full", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "full", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "full", "prompt": ""}, "prompt"),
        ({"model": "full", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "full", "prompt": "x", "cache_salt": ""}, "cache_salt"),
        ({"model": "full", "prompt": "x", "cache_salt": 7}, "cache_salt"),
        ({"model": "full"}, "prompt"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(server: Server, body: dict, param: str) -> None:
    error = await error_of(await server.http.post("/v1/completions", json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not server.engines["full"].seen  # rejected before reaching the engine


async def test_openai_client_sees_typed_errors(server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="n=3"):
        await server.client.completions.create(model="full", prompt="x", n=3)
    with pytest.raises(openai.NotFoundError, match="nope"):
        await server.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


async def test_malformed_oversized_and_unknown_route(server: Server) -> None:
    bad = server.http.post(
        "/v1/completions", content=b'{"model": "full", "prompt": ', headers={"content-type": "application/json"}
    )
    await error_of(await bad, 422)
    huge = {"model": "full", "prompt": "x" * 5000}
    await error_of(await server.http.post("/v1/completions", json=huge), 413)

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 1000

    await error_of(await server.http.post("/v1/completions", content=chunked()), 413)
    await error_of(await server.http.get("/v1/nothing"), 404)
    assert (await server.http.get("/ready")).status_code == 200  # still serving


async def test_failing_stream_sends_error_event_then_done(server: Server) -> None:
    server.engines["full"].fail_after = 2
    body = {"model": "full", "prompt": "a b c d e", "max_tokens": 5, "stream": True}
    response = await server.http.post("/v1/completions", json=body)
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and "traceback" not in response.text.lower()
    server.engines["full"].fail_after = None
    metrics = (await server.http.get("/metrics")).text
    assert 'trimserve_requests_total{outcome="error",variant="full"} 1.0' in metrics


async def test_overload_is_429_with_retry_after(tokenizer, tiny) -> None:
    async for s in start(tokenizer, tiny, max_batch_size=1, max_queue=0):
        s.engines["full"].delay = 0.02
        body = {"model": "full", "prompt": "a b c", "max_tokens": 20}
        first = asyncio.create_task(s.http.post("/v1/completions", json=body))
        while not s.engines["full"].active:
            await asyncio.sleep(0.001)
        error = await error_of(response := await s.http.post("/v1/completions", json=body), 429)
        assert response.headers["retry-after"] == "2" and error["type"] == "rate_limit_error"
        assert response.headers["x-trimserve-variant"] == "full"
        assert (await first).status_code == 200


async def test_not_ready_is_503(tokenizer, tiny) -> None:
    app = create_app(Settings(), backends=fake_backends(Settings(), tokenizer, tiny, ("full",), {}))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as http:
        assert (await http.get("/health")).status_code == 200
        await error_of(await http.get("/ready"), 503)
        await error_of(await http.post("/v1/completions", json={"model": "full", "prompt": "x"}), 503)


async def test_bearer_auth_guards_all_but_health(tokenizer, tiny) -> None:
    async for s in start(tokenizer, tiny, api_key="sekrit"):
        assert (await s.http.get("/health")).status_code == 200
        for path in ("/ready", "/v1/models", "/metrics", "/docs"):
            assert (await error_of(await s.http.get(path), 401))["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await s.client.models.list()
        ok = await s.http.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
