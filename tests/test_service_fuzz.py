"""Bounded fuzzing of the HTTP API: schemathesis over the server's own OpenAPI schema.

The server is a real `trimserve serve` process with the real engine on a tiny model. Every
operation is called with generated bodies and parameters, valid and invalid, with `model` drawn
from the served names (and an unknown one), streaming included. No answer may be a 5xx; every 4xx
carries the OpenAI error object; every stream ends with `data: [DONE]` and carries no server error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.serve_process import ServeProcess, save_long_context_variant

NAMES = ("full", "small", "chat", "no-such-model")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tokenizer) -> Iterator[ServeProcess]:
    variant = save_long_context_variant(tmp_path_factory.mktemp("fuzz") / "tiny", tokenizer)
    flags = ("--model", f"small={variant}", "--ab", "chat=full:1,small:1", "--max-tokens", "8", "--max-queue", "2")
    server = ServeProcess(variant, tmp_path_factory.mktemp("logs") / "serve.log", *flags)
    yield server
    server.stop()


def check_answer(response) -> None:
    assert response.status_code < 500, response.text[:500]
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if any(value.startswith("text/event-stream") for value in response.headers.get("content-type", [])):
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            payload = json.loads(event)
            assert "error" not in payload or payload["error"].get("status", 0) < 500, event


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_5xx_and_openai_errors_everywhere(fuzz_server: ServeProcess, mode: GenerationMode) -> None:
    for operation in operations(fuzz_server.url):

        @given(case=operation.as_strategy(generation_mode=mode), model=st.sampled_from(NAMES))
        @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def call(case, model: str) -> None:
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model
            check_answer(case.call(base_url=fuzz_server.url, timeout=60))

        try:
            call()
        except Unsatisfiable:  # a GET with nothing but string path parameters has no invalid form
            assert mode is GenerationMode.NEGATIVE and not operation.body
    assert "Exception in ASGI application" not in fuzz_server.output()
