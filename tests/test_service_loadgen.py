"""The load generator and the `trimserve serve` / `trimserve bench` commands."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch._inductor.cpp_builder

from service.app import create_app
from service.settings import Settings
from tests.service_fakes import FakeEngine, fake_backends
from tests.test_service_server import LiveServer, wait_for
from tests.tiny_models import tiny_llama
from trimserve.cli import build_parser, main
from trimserve.cli.serve import serve_settings
from trimserve.loadgen import LoadConfig, make_prompt, markdown, read_prompts, request_shape, run_bench

STATS = {"p50", "p90", "p99", "mean"}
TIMES = ("ttft_s", "tpot_s", "e2e_s")


@pytest.fixture(scope="module")
def live(tokenizer) -> Iterator[LiveServer]:
    engines: dict[str, FakeEngine] = {}
    tiny = tiny_llama(layers=1)
    settings = Settings(ab={"chat": {"full": 1, "small": 1}})
    app = create_app(settings, backends=fake_backends(settings, tokenizer, tiny, ("full", "small"), engines))
    server = LiveServer(app, engines)
    for engine in engines.values():
        engine.delay = 0.002
    yield server
    server.stop()


def test_closed_loop_reports_each_arm(live: LiveServer, tokenizer) -> None:
    config = LoadConfig(url=live.url, models=("chat",), concurrency=4, requests=24, prompt_tokens=32, output_tokens=6)
    summary, results = run_bench(config)
    assert set(summary) == {"url", "started", "settings", "method", "duration_s", "variants"}
    assert set(summary["variants"]) == {"full", "small"}
    assert sum(v["requests"] for v in summary["variants"].values()) == 24
    for v in summary["variants"].values():
        assert v["errors"] == 0 and v["output_tokens"] == 6 * v["requests"]
        assert set(v) == {
            "requests",
            "errors",
            "disconnected",
            "hung",
            "refused",
            "output_tokens",
            "output_tokens_per_s",
            "samples",
            *TIMES,
        }
        assert v["disconnected"] == v["hung"] == v["refused"] == 0
        assert all(set(v[k]) == STATS for k in TIMES)
        assert len(v["samples"]["e2e_s"]) == v["requests"] and v["output_tokens_per_s"] > 0
        assert v["ttft_s"]["p50"] <= v["e2e_s"]["p50"]
    # The fake echoes the prompt, so each answer shows it was the answer to its own request.
    for r in results:
        assert r.text and make_prompt(r.prompt_index, 32).startswith(r.text)
        assert r.prompt_tokens == len(tokenizer.encode(make_prompt(r.prompt_index, 32)))
    assert "| full |" in markdown(summary) and "| small |" in markdown(summary)


def test_mixed_lengths_and_disconnecting_clients(live: LiveServer, tokenizer) -> None:
    config = LoadConfig(
        url=live.url,
        concurrency=6,
        requests=40,
        prompt_pool=8,
        prompt_tokens=8,
        prompt_tokens_max=200,
        output_tokens=1,
        output_tokens_max=40,
        disconnect_share=0.3,
        seed=3,
    )
    shapes = {request_shape(config, i) for i in range(8)}
    assert len({p for p, _ in shapes}) > 4 and len({o for _, o in shapes}) > 4  # lengths vary per prompt
    assert all(8 <= p <= 200 and 1 <= o <= 40 for p, o in shapes)
    summary, results = run_bench(config)
    full = summary["variants"]["full"]
    dropped = [r for r in results if r.disconnected]
    assert 0 < full["disconnected"] == len(dropped) < 40 and full["errors"] == full["hung"] == 0
    for r in results:
        if not r.disconnected:  # the fake echoes the prompt: each whole answer has its own length
            assert r.output_tokens == request_shape(config, r.prompt_index)[1]
    # Every request ended on the server; a client that left before its answer was done aborted it.
    assert wait_for(lambda: all(not e.active for e in live.engines.values()))
    assert sum(len(e.aborted) for e in live.engines.values()) >= 1


def test_several_variants_are_measured_one_at_a_time_round_by_round(live: LiveServer) -> None:
    for engine in live.engines.values():
        engine.seen.clear()
    config = LoadConfig(url=live.url, models=("full", "small"), rounds=3, requests=6, output_tokens=4, seed=2)
    summary, results = run_bench(config)
    assert {name: v["requests"] for name, v in summary["variants"].items()} == {"full": 6, "small": 6}
    assert "interleaved: 3 rounds of 2 requests" in summary["method"]
    assert all(v["errors"] == 0 and v["output_tokens_per_s"] > 0 for v in summary["variants"].values())
    # Round by round, in rotating order: full, small | small, full | full, small.
    order = [r.model for r in sorted(results, key=lambda r: r.index)]
    assert order == ["full"] * 2 + ["small"] * 4 + ["full"] * 4 + ["small"] * 2
    # Within a round both variants get the same prompts.
    assert live.engines["full"].seen[0][0] == live.engines["small"].seen[0][0]


def test_arrival_rate_and_errors_are_counted(live: LiveServer) -> None:
    summary, _ = run_bench(LoadConfig(url=live.url, rate=200.0, concurrency=8, requests=10, output_tokens=3))
    assert summary["variants"]["full"]["requests"] == 10 and summary["variants"]["full"]["errors"] == 0
    failing, results = run_bench(LoadConfig(url=live.url, models=("ghost",), requests=2, output_tokens=2))
    assert failing["variants"]["ghost"]["errors"] == 2 and results[0].status == 404


def test_bench_command_writes_json_and_markdown(live: LiveServer, tmp_path: Path) -> None:
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["bench", live.url, "--requests", "3", "--output-tokens", "4", "--json", str(out), "--markdown", str(table)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["variants"]["full"]["output_tokens"] == 12 and data["settings"]["concurrency"] == 1
    assert table.read_text().startswith("| variant |")


def test_real_prompts_through_the_chat_endpoint(live: LiveServer, tmp_path: Path, tokenizer) -> None:
    questions = ["Is aspirin an anticoagulant?", "Does exercise lower blood pressure?"]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": q, "id": i}) + "\n" for i, q in enumerate(questions)))
    out = tmp_path / "chat.json"
    argv = ["bench", live.url, "--prompts", str(file), "--chat", "--requests", "4", "--output-tokens", "5"]
    assert main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["prompts"] == 2 and data["settings"]["chat"] is True
    full = data["variants"]["full"]
    assert full["requests"] == 4 and full["output_tokens"] == 20 and full["ttft_s"]["p50"] > 0
    # the fake engine echoes the prompt it got: the chat template around each question
    seen = [tokenizer.decode(ids) for ids, _ in live.engines["full"].seen[-4:]]
    assert all("<|im_start|>user" in text for text in seen)
    assert [questions[0] in t for t in seen] == [True, False, True, False]


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no prompts"), ('{"text": ""}\n', "needs a non-empty"), ('{"prompt": 1}\n{x\n', "needs a non-empty")],
)
def test_bad_prompt_files_are_refused(tmp_path: Path, content: str, message: str, capsys) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text(content)
    assert main(["bench", "http://127.0.0.1:9", "--prompts", str(file)]) == 2
    assert message in capsys.readouterr().err


def test_plain_text_prompt_files_are_one_prompt_per_line(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("first question\n\nsecond question\n")
    assert read_prompts(file) == ("first question", "second question")


def test_serve_settings_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIMSERVE_API_KEY", "from-env")
    monkeypatch.setenv("TRIMSERVE_MAX_QUEUE", "7")
    argv = ["serve", "--model", "full=/m/full", "--model", "d8=/m/d8", "--ab", "exp=full:3,d8:1", "--dtype", "bf16"]
    args = build_parser().parse_args([*argv, "--shadow", "full=d8@0.1"])
    settings = serve_settings(args)
    assert settings.shadow == {"full": {"variants": ["d8"], "rate": 0.1}}
    assert [m.name for m in settings.models] == ["full", "d8"] and settings.dtype == "bf16"
    assert settings.ab == {"exp": {"full": 3, "d8": 1}}
    assert settings.api_key.get_secret_value() == "from-env" and settings.max_queue == 7
    assert not settings.engine_config().compile_decode
    assert serve_settings(build_parser().parse_args([*argv, "--compile-decode"])).engine_config().compile_decode


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--config", "/nonexistent/serve.toml"],
        ["serve", "--model", "full=/x", "--ab", "exp=full:1,ghost:1"],
        ["serve", "--ab", "broken"],
        ["serve", "--dtype", "int3"],
        ["serve", "--model", "full=/x", "--shadow", "full"],
        ["serve", "--model", "full=/x", "--shadow", "full=ghost@0.1"],
        ["serve", "--model", "full=/x", "--model", "d=/y", "--shadow", "full=d@2"],
    ],
)
def test_serve_rejects_bad_configuration(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert "trimserve: error:" in capsys.readouterr().err


def no_cpp_compiler() -> str:
    raise RuntimeError("no working C++ compiler found")  # Inductor's search on a host without one


def test_serve_refuses_a_compiled_decode_step_it_cannot_build_before_loading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch._inductor.cpp_builder, "get_cpp_compiler", no_cpp_compiler)
    assert main(["serve", "--model", "full=smollm2-135m", "--compile-decode"]) == 2
    err = capsys.readouterr().err
    assert "trimserve: error: variant 'full': a compiled decode step on CPU needs a C++ compiler" in err
    assert "Traceback" not in err


def test_429s_are_retried_after_their_retry_after_when_asked() -> None:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    calls: list[float] = []
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> object:
        calls.append(time.monotonic())
        if len(calls) % 3:  # two refusals before every answer
            return JSONResponse({"error": {"message": "busy"}}, status_code=429, headers={"Retry-After": "0.2"})
        chunks = [{"choices": [{"text": "hi"}]}, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return StreamingResponse(iter([body]), media_type="text/event-stream")

    server = LiveServer(app, {})
    try:
        summary, results = run_bench(LoadConfig(url=server.url, requests=2, output_tokens=1, retries=2))
        assert [(r.ok, r.refused, r.text) for r in results] == [(True, 2, "hi")] * 2
        assert summary["variants"]["full"]["refused"] == 4 and summary["variants"]["full"]["errors"] == 0
        assert all(r.e2e_s >= 0.4 for r in results)  # each waited out two Retry-Afters of 0.2 s
        calls.clear()
        _, results = run_bench(LoadConfig(url=server.url, requests=1, output_tokens=1, retries=1))
        assert (results[0].status, results[0].refused, results[0].ok) == (429, 1, False)  # out of retries
    finally:
        server.stop()
    with pytest.raises(ValueError, match="retries"):
        LoadConfig(url=server.url, retries=-1)
