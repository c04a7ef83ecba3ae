"""The gateway: a variant served by another OpenAI-compatible server (here a real `trimserve serve`
process on a tiny model), behind the same API, A/B routing, limits and metrics as the in-process engine.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.settings import ModelSpec, Settings
from tests.serve_process import ServeProcess, save_long_context_variant
from tests.test_service_server import wait_for
from trimserve.cli import main

GREEDY = {"temperature": 0, "ignore_eos": True}


class Gateway:
    """`create_app` on a real loopback socket in a thread, its variants behind upstream URLs."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.server.started or not self.thread.is_alive(), 60)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def metric(self, name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(f"{name}{{{wanted}}}"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def tiny_variant(tmp_path_factory, tokenizer) -> Path:
    return save_long_context_variant(tmp_path_factory.mktemp("gw") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def upstream(tiny_variant, tmp_path_factory) -> Iterator[ServeProcess]:
    server = ServeProcess(
        tiny_variant, tmp_path_factory.mktemp("up") / "serve.log", "--max-batch-size", "2", "--max-queue", "0"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(upstream, tiny_variant) -> Iterator[Gateway]:
    models = [
        ModelSpec(name="remote", source=f"{upstream.url}/v1", manifest_dir=str(tiny_variant)),
        ModelSpec(name="native", source=str(tiny_variant)),
    ]
    gateway = Gateway(Settings(models=models, ab={"chat": {"remote": 1, "native": 1}}, max_tokens=3000))
    yield gateway
    gateway.stop()


def stream_events(url: str, body: dict) -> tuple[int, list[str]]:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        return response.status_code, [
            ln.removeprefix("data: ") for ln in response.iter_lines() if ln.startswith("data: ")
        ]


def test_answers_match_the_upstream_streamed_or_not(gateway: Gateway, upstream: ServeProcess) -> None:
    body = {"model": "full", "prompt": "one two three", "max_tokens": 12, **GREEDY}
    direct = httpx.post(f"{upstream.url}/v1/completions", json=body, timeout=60).json()
    through = httpx.post(f"{gateway.url}/v1/completions", json={**body, "model": "remote"}, timeout=60)
    assert through.headers["x-trimserve-variant"] == "remote"
    answer = through.json()
    assert answer["model"] == "remote" and answer["choices"][0]["text"] == direct["choices"][0]["text"]
    assert answer["usage"] == direct["usage"] and answer["choices"][0]["finish_reason"] == "length"
    status, events = stream_events(gateway.url, {**body, "model": "remote", "stream_options": {"include_usage": True}})
    chunks = [json.loads(e) for e in events[:-1]]
    assert status == 200 and events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == direct["choices"][0]["text"]
    assert chunks[-1]["usage"] == direct["usage"]
    # The same answer from the in-process engine on the same checkpoint.
    native = httpx.post(f"{gateway.url}/v1/completions", json={**body, "model": "native"}, timeout=60).json()
    assert native["choices"][0]["text"] == direct["choices"][0]["text"]


def test_the_cache_salt_goes_upstream(gateway: Gateway, upstream: ServeProcess) -> None:
    """The upstream's prefix cache sees the salt: a prompt again under another salt is prefilled again."""

    def cached() -> float:
        for line in httpx.get(f"{upstream.url}/metrics").text.splitlines():
            if line.startswith('trimserve_prompt_tokens_cached_total{variant="full"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    prompt = " ".join(f"w{i}" for i in range(40))  # well past one 16-token block
    body = {"model": "remote", "prompt": prompt, "max_tokens": 2, **GREEDY}
    counts = [cached()]
    for salt in ("tenant-a", "tenant-a", "tenant-b", "tenant-b"):
        response = httpx.post(f"{gateway.url}/v1/completions", json={**body, "cache_salt": salt}, timeout=60)
        assert response.status_code == 200, response.text
        counts.append(cached())
    new = [b - a for a, b in itertools.pairwise(counts)]
    assert new[0] == 0 and new[1] > 0 and new[2] == 0 and new[3] == new[1]


def test_chat_and_stop_strings_go_upstream(gateway: Gateway, upstream: ServeProcess) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, **GREEDY}
    direct = httpx.post(f"{upstream.url}/v1/chat/completions", json={**body, "model": "full"}, timeout=60).json()
    through = httpx.post(f"{gateway.url}/v1/chat/completions", json={**body, "model": "remote"}, timeout=60).json()
    assert through["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    text = direct["choices"][0]["message"]["content"]
    stop = text.split()[1] if len(text.split()) > 1 else text[:2]
    cut = httpx.post(f"{gateway.url}/v1/chat/completions", json={**body, "model": "remote", "stop": [stop]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop" and stop not in cut["choices"][0]["message"]["content"]


def test_upstream_client_errors_keep_their_status_and_sampling_is_checked_here(gateway: Gateway) -> None:
    too_long = httpx.post(f"{gateway.url}/v1/completions", json={"model": "remote", "prompt": [5] * 2100})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
    assert "2048" in too_long.json()["error"]["message"]  # the upstream's own limit and words
    hot = httpx.post(f"{gateway.url}/v1/completions", json={"model": "remote", "prompt": "x", "temperature": 5})
    assert hot.status_code == 400 and hot.json()["error"]["param"] == "temperature"


def test_ab_experiment_spans_native_and_upstream_arms(gateway: Gateway) -> None:
    seen = {}
    for user in ("ann", "bob", "cat", "dan", "eve", "fay", "gus", "hal"):
        body = {"model": "chat", "prompt": "hi", "max_tokens": 2, "user": user}
        response = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200
        seen[user] = response.headers["x-trimserve-variant"]
        again = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60)
        assert again.headers["x-trimserve-variant"] == seen[user]  # sticky per user
    assert set(seen.values()) == {"remote", "native"}
    assert gateway.metric("trimserve_requests_total", outcome="ok", variant="remote") > 0
    assert gateway.metric("trimserve_time_to_first_token_seconds_count", variant="remote") > 0
    assert gateway.metric("trimserve_generated_tokens_total", variant="remote") > 0
    assert gateway.metric("trimserve_backend_up", variant="remote") == 1
    info = httpx.get(f"{gateway.url}/v1/variants/remote").json()
    assert info["backend"] == "url" and info["healthy"] and info["manifest"]["name"] == "tiny"
    assert info["upstream_model"] == "full"


def test_a_client_leaving_closes_the_upstream_stream(gateway: Gateway, upstream: ServeProcess) -> None:
    body = {"model": "remote", "prompt": "a", "max_tokens": 2900, **GREEDY, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")

    def cancelled_upstream() -> bool:
        text = httpx.get(f"{upstream.url}/metrics").text
        return 'trimserve_requests_total{outcome="cancelled",variant="full"}' in text

    assert wait_for(cancelled_upstream, 10)
    assert wait_for(lambda: gateway.metric("trimserve_requests_running", variant="remote") == 0, 10)


def test_the_upstream_429_reaches_the_client_with_retry_after(gateway: Gateway, upstream: ServeProcess) -> None:
    long = {"model": "remote", "prompt": "a", "max_tokens": 2900, "stream": True, **GREEDY}
    done = threading.Event()

    def hold() -> None:  # a long stream, left as soon as the test has its answer
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=long, timeout=120) as response:
            for _ in response.iter_lines():
                if done.is_set():
                    return

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for holder in holders:
        holder.start()

    def upstream_full() -> bool:  # the upstream's 2 batch slots are taken and it has no queue
        text = httpx.get(f"{upstream.url}/metrics").text
        return 'trimserve_requests_running{variant="full"} 2.0' in text

    try:
        assert wait_for(upstream_full, 30)
        refused = httpx.post(f"{gateway.url}/v1/completions", json={"model": "remote", "prompt": "b"}, timeout=60)
    finally:
        done.set()
        for holder in holders:
            holder.join(timeout=60)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_an_upstream_killed_mid_stream_ends_with_an_error_and_is_marked_down(tiny_variant, tmp_path) -> None:
    upstream = ServeProcess(tiny_variant, tmp_path / "serve.log")
    gateway = Gateway(Settings(models=[ModelSpec(name="remote", url=f"{upstream.url}/v1")], max_tokens=3000))
    try:
        body = {"model": "remote", "prompt": "a", "max_tokens": 2900, **GREEDY, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            upstream.process.send_signal(signal.SIGKILL)
            rest = [ln.removeprefix("data: ") for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["status"] == 502 and error["code"] == "upstream_failed"
        started = time.monotonic()
        after = httpx.post(f"{gateway.url}/v1/completions", json={"model": "remote", "prompt": "x"}, timeout=30)
        assert after.status_code in (502, 503) and time.monotonic() - started < 10  # never a hang
        assert wait_for(lambda: httpx.get(f"{gateway.url}/ready").status_code == 503, 10)
        assert "remote" in httpx.get(f"{gateway.url}/ready").json()["error"]["message"]
        assert gateway.metric("trimserve_backend_up", variant="remote") == 0
    finally:
        gateway.stop()
        upstream.process.wait(timeout=10)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "far=http://127.0.0.1:9/v1"], "variant 'far': upstream http://127.0.0.1:9/v1 is unreachable"),
        (["--model", "d8=vllm:/tmp", "--vllm-command", "/no/vllm"], "variant 'd8': the vLLM command '/no/vllm'"),
        (["--model", "x=http://127.0.0.1:9/v1", "--model", "x=/tmp"], "model names must be unique"),
        (["--model", "x=ftp://host/v1"], "variant 'x': 'ftp://host/v1' is not a model source"),
    ],
)
def test_bad_gateway_configurations_stop_before_start(argv, expected, capsys, tmp_path) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trimserve: error:") and expected in err, err


def test_an_upstream_that_is_not_the_openai_api_is_refused(capsys, tmp_path) -> None:
    import http.server
    import socketserver

    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *_) -> None:
            return

    with socketserver.TCPServer(("127.0.0.1", 0), Html) as html:
        threading.Thread(target=html.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{html.server_address[1]}/v1"
        assert main(["serve", "--model", f"web={url}"]) == 2
        html.shutdown()
    err = capsys.readouterr().err
    assert "variant 'web'" in err and "other than the OpenAI model list" in err


def test_a_shadow_upstream_without_prompt_logprobs_is_counted_unsupported(upstream, tiny_variant) -> None:
    """trimserve has no /tokenize, so it cannot rate another model's answer; live traffic is unaffected."""
    models = [
        ModelSpec(name="remote", source=f"{upstream.url}/v1", manifest_dir=str(tiny_variant)),
        ModelSpec(name="native", source=str(tiny_variant)),
    ]
    gateway = Gateway(Settings(models=models, shadow={"native": {"variants": ["remote"]}}, max_tokens=3000))
    try:
        body = {"model": "native", "prompt": "one two", "max_tokens": 4, **GREEDY}
        assert httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60).status_code == 200
        labels = {"reference": "native", "outcome": "unsupported", "variant": "remote"}
        assert wait_for(lambda: gateway.metric("trimserve_shadow_items_total", **labels) == 1, 10)
        assert (
            gateway.metric("trimserve_shadow_items_total", **{**labels, "variant": "native", "outcome": "scored"}) == 1
        )
    finally:
        gateway.stop()
