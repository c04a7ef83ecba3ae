"""`trimserve serve` as a real process on a real socket, used the way clients and attackers use it.

A tiny random Llama (saved as a variant, with a long context so streams can run for seconds) is
served by the real engine; requests are raw HTTP where the client library would refuse to send
them (a malformed Content-Length, a lone surrogate in the JSON).
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve_process import CONTEXT, ServeProcess, save_long_context_variant


@pytest.fixture(scope="module")
def tiny_variant(tmp_path_factory, tokenizer) -> Path:
    return save_long_context_variant(tmp_path_factory.mktemp("serve") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def served(tiny_variant, tmp_path_factory) -> Iterator[ServeProcess]:
    server = ServeProcess(tiny_variant, tmp_path_factory.mktemp("logs") / "serve.log", "--max-queue", "4")
    yield server
    server.stop()


def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; return the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"content-length" in head.lower():
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
                )
                if len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def post_raw(port: int, body: bytes) -> tuple[int, dict]:
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    status, _, answer = raw_request(port, request)
    return status, json.loads(answer)


def assert_error_object(error: dict) -> dict:
    assert set(error["error"]) == {"message", "type", "param", "code"}
    return error["error"]


def test_malformed_content_length_gets_the_openai_error_object(served: ServeProcess) -> None:
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}"
    status, headers, body = raw_request(served.port, request)
    assert status == 400 and headers["content-type"] == "application/json"
    assert assert_error_object(json.loads(body))["code"] == "malformed_request"


def test_lone_surrogate_in_the_prompt_is_400(served: ServeProcess) -> None:
    status, error = post_raw(served.port, b'{"model": "full", "prompt": "\\ud800", "max_tokens": 2}')
    assert status == 400 and assert_error_object(error)["param"] == "prompt"
    status, error = post_raw(served.port, b'{"model": "full", "prompt": "x", "user": "\\udfff"}')
    assert status == 400 and assert_error_object(error)["param"] == "user"


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1180591620717411303424"])
def test_seed_outside_what_a_generator_takes_is_400(served: ServeProcess, seed: str) -> None:
    body = b'{"model": "full", "prompt": "x", "temperature": 0.7, "seed": ' + seed.encode() + b"}"
    status, error = post_raw(served.port, body)
    assert status == 400 and assert_error_object(error)["param"] == "seed"


@pytest.mark.parametrize("prompt", [["a", "b"], []])
def test_a_refused_prompt_keeps_the_connection_usable(served: ServeProcess, prompt: list) -> None:
    """Issue 13: these answered 400 but raised inside the app, and the next request on the
    keep-alive connection was reset."""
    with httpx.Client(base_url=served.url, timeout=30) as client:
        refused = client.post("/v1/completions", json={"model": "full", "prompt": prompt})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
        ok = client.post("/v1/completions", json={"model": "full", "prompt": "hello", "max_tokens": 2})
        assert ok.status_code == 200
    assert "Exception in ASGI application" not in served.output()


def test_tiny_temperature_does_not_poison_the_batch(served: ServeProcess) -> None:
    """Issue 13: temperature 1e-40 made the sampler fail every request of the step."""
    greedy = {"model": "full", "prompt": "one two", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=served.url, timeout=60) as client:
        alone = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
        tiny = {**greedy, "temperature": 1e-40, "seed": 5}
        batch_mate = {**greedy, "max_tokens": 1500, "stream": True}  # still decoding when `tiny` arrives
        with client.stream("POST", "/v1/completions", json=batch_mate) as stream:
            answer = client.post("/v1/completions", json=tiny)
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == alone
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)


def test_model_details_hide_host_paths(served: ServeProcess, tiny_variant: Path) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as client:
        texts = [client.get(path).text for path in ("/v1/models", "/v1/models/full", "/v1/variants/full")]
        assert client.get("/v1/models/full").json()["id"] == "full"
        assert client.get("/v1/models/nope").status_code == 404
    for text in texts:
        assert str(tiny_variant.parent) not in text


def test_sigterm_ends_running_streams_with_an_error_event_and_exits_0(tiny_variant, tmp_path) -> None:
    """Issue 13: streams still running when SHUTDOWN_TIMEOUT_S ran out were cut without an error
    event or [DONE], and the process exited with 143."""
    server = ServeProcess(tiny_variant, tmp_path / "serve.log", "--shutdown-timeout", "0.5")
    body = {"model": "full", "prompt": "a", "max_tokens": CONTEXT - 64, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=server.url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as stream,
    ):
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_unavailable" and error["status"] == 503
    assert server.process.wait(timeout=30) == 0, server.output()
