"""Shadow A/B: variants rate the reference's answers on live traffic, never touching the client."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.backend import GenerationRequest, SamplingParams, Score
from service.backends.native import NativeBackend
from service.backends.upstream import UpstreamConfig
from service.backends.vllm import VllmBackend, VllmConfig
from service.metrics import Metrics
from service.registry import serve_plan
from service.settings import Settings
from service.shadow import Exchange, Shadow, ShadowSpec, parse_shadow, request_key
from tests.fake_vllm import fake_logprob, fake_token
from tests.service_fakes import loaded_model
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("full=depth8,sparse50@0.1", ShadowSpec("full", ("depth8", "sparse50"), 0.1)),
        ("full=depth8", ShadowSpec("full", ("depth8",), 1.0)),
        (" full = a , b @1", ShadowSpec("full", ("a", "b"), 1.0)),
    ],
)
def test_parse_shadow(text: str, spec: ShadowSpec) -> None:
    assert parse_shadow(text) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("full", "expected REFERENCE=VARIANT"),
        ("=a", "expected REFERENCE=VARIANT"),
        ("full=@0.1", "expected REFERENCE=VARIANT"),
        ("full=a@ten", "rate 'ten' is not a number"),
        ("full=a@0", r"rate must be in \(0, 1\]"),
        ("full=a@1.5", r"rate must be in \(0, 1\]"),
        ("full=full,a", "lists the reference itself"),
    ],
)
def test_parse_shadow_refuses_bad_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_shadow(text)


def test_plan_checks_shadow_names_against_the_models(tmp_path: Path) -> None:
    models = [{"name": "full", "source": str(tmp_path)}, {"name": "small", "source": str(tmp_path)}]
    plan = serve_plan(Settings(models=models, shadow={"full": {"variants": ["small"], "rate": 0.1}}))
    assert plan.shadow == [ShadowSpec("full", ("small",), 0.1)]
    config = tmp_path / "serve.toml"
    config.write_text(
        f'[[models]]\nname = "full"\nsource = "{tmp_path}"\n[[models]]\nname = "small"\nsource = "{tmp_path}"\n'
        '[shadow]\nfull = { variants = ["small"], rate = 0.25 }\n'
    )
    assert serve_plan(Settings(config_file=config)).shadow == [ShadowSpec("full", ("small",), 0.25)]
    flags_win = Settings(config_file=config, shadow={"full": {"variants": ["small"], "rate": 0.5}})
    assert serve_plan(flags_win).shadow == [ShadowSpec("full", ("small",), 0.5)]
    with pytest.raises(ValueError, match=r"unknown variants \['depth8'\]"):
        serve_plan(Settings(models=models, shadow={"full": {"variants": ["depth8"]}}))
    with pytest.raises(ValueError, match="needs `variants"):
        serve_plan(Settings(models=models, shadow={"full": {"rate": 0.1}}))


def request(i: int, temperature: float = 0.0) -> GenerationRequest:
    return GenerationRequest(f"r{i}", SamplingParams(max_tokens=8, temperature=temperature), prompt=f"question {i}")


class ScriptedBackend:
    """A model as the shadow sees it: its live load and a score that waits for `release`."""

    def __init__(self, name: str, running: int = 0, waiting: int = 0) -> None:
        self.name = name
        self.running, self.waiting = running, waiting
        self.release = asyncio.Event()
        self.release.set()
        self.scored: list[str] = []

    def load(self) -> tuple[int, int]:
        return self.running, self.waiting

    async def score(self, request: GenerationRequest, answer: str, answer_ids) -> Score:
        await self.release.wait()
        self.scored.append(request.request_id)
        return Score(3, 1.5, 2 / 3)


def count(metrics: Metrics, variant: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "trimserve_shadow_items_total", {"variant": variant, "reference": "full", "outcome": outcome}
    )
    return value or 0.0


async def settle(shadow: Shadow) -> None:
    for _ in range(200):
        if all(q.empty() for q in shadow.queues.values()):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)  # the last item's score


async def test_sampling_is_a_seeded_share_of_requests() -> None:
    backends = {name: ScriptedBackend(name) for name in ("full", "small")}
    spec = ShadowSpec("full", ("small",), 0.1)
    shadow = Shadow([spec], backends, Metrics(), seed=7, queue_size=4096)
    chosen = {i for i in range(3000) if shadow.offer(Exchange("full", request(i), "a b", None, Score(2, 1.0, 1.0)))}
    assert 0.08 < len(chosen) / 3000 < 0.12
    # the same request is always (or never) chosen, whatever its request id; another seed picks others
    again = {i for i in range(3000) if request_key(request(i), 7) < 0.1}
    assert again == chosen
    assert {i for i in range(3000) if request_key(request(i), 8) < 0.1} != chosen
    renamed = GenerationRequest("other-id", request(0).params, prompt=request(0).prompt)
    assert request_key(renamed, 7) == request_key(request(0), 7)
    # only the variant queues: the reference's own score came with the exchange
    assert shadow.queues["small"].qsize() == len(chosen) and shadow.queues["full"].empty()
    assert not shadow.offer(Exchange("small", request(0), "a", None))  # not a reference


async def test_busy_models_and_full_queues_drop_items_and_count_them() -> None:
    backends = {
        "full": ScriptedBackend("full"),
        "idle": ScriptedBackend("idle"),
        "running": ScriptedBackend("running", running=3),
        "waiting": ScriptedBackend("waiting", running=1, waiting=1),
    }
    metrics = Metrics()
    shadow = Shadow([ShadowSpec("full", ("idle", "running", "waiting"), 1.0)], backends, metrics, busy=2)
    shadow.start()
    try:
        for i in range(3):
            assert shadow.offer(Exchange("full", request(i), "a b c", None))  # no own score: full rates itself
        await settle(shadow)
        assert count(metrics, "idle", "scored") == 3 and count(metrics, "full", "scored") == 3
        assert count(metrics, "running", "dropped_busy") == 3 and count(metrics, "waiting", "dropped_busy") == 3
        assert backends["running"].scored == [] and backends["waiting"].scored == []

        small = Shadow([ShadowSpec("full", ("idle",), 1.0)], backends, metrics, queue_size=1)
        small.start()
        backends["idle"].release.clear()  # the first item holds the worker, the next fills the queue
        for i in range(4):
            small.offer(Exchange("full", request(10 + i), "a", None, Score(1, 1.0, 1.0)))
            await asyncio.sleep(0.02)
        assert count(metrics, "idle", "dropped_queue_full") == 2
        backends["idle"].release.set()
        await settle(small)
        assert count(metrics, "idle", "scored") == 3 + 2
        await small.close()
    finally:
        await shadow.close()


def confident(layers: int = 2) -> torch.nn.Module:
    """A tiny random Llama with sharp next-token distributions (a random one is near uniform,
    where every model rates every answer alike): its tied embeddings scaled up."""
    model = tiny_llama(layers=layers)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)
    return model


def damaged(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose every layer's weight matrices carry seeded noise twice as large as the weights."""
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in copy_.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=generator) * p.std() * 2)
    return copy_


def native(name: str, model: torch.nn.Module, tokenizer, settings: Settings) -> NativeBackend:
    return NativeBackend(
        name, f"/tmp/{name}", "cpu", lambda device: loaded_model(name, model, tokenizer), settings.engine_config()
    )


async def serving(tokenizer, models: dict[str, torch.nn.Module], **settings) -> AsyncIterator[httpx2.AsyncClient]:
    config = Settings(max_tokens=64, **settings)
    app = create_app(config, backends=[native(n, m, tokenizer, config) for n, m in models.items()])
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx2.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


def shadow_means(metrics_text: str) -> dict[str, tuple[float, float, float]]:
    """variant -> (mean NLL, mean top-1 agreement, items) from the /metrics page."""
    sums: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in ("trimserve_shadow_nll_sum", "trimserve_shadow_nll_count"):
                sums[sample.labels["variant"], sample.name] = sample.value
            if sample.name == "trimserve_shadow_top1_agreement_sum":
                sums[sample.labels["variant"], "top1"] = sample.value
    names = {name for name, _ in sums}
    out = {}
    for name in names:
        n = sums[name, "trimserve_shadow_nll_count"]
        out[name] = (sums[name, "trimserve_shadow_nll_sum"] / n, sums[name, "top1"] / n, n)
    return out


PROMPTS = ["The capital of France is", "Aspirin is used to", "Once upon a time", "def add(a, b):"]


async def test_identical_variant_matches_the_reference_and_a_damaged_one_scores_worse(tokenizer) -> None:
    full = confident()
    models = {"full": full, "same": copy.deepcopy(full), "damaged": damaged(full)}
    shadow = {"full": {"variants": ["same", "damaged"], "rate": 1.0}}
    async for http in serving(tokenizer, models, shadow=shadow):
        for prompt in PROMPTS:
            body = {"model": "full", "prompt": prompt, "max_tokens": 12, "temperature": 0}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        for _ in range(200):
            means = shadow_means((await http.get("/metrics")).text)
            if all(means.get(n, (0, 0, 0))[2] == len(PROMPTS) for n in models):
                break
            await asyncio.sleep(0.02)
    assert {n: means[n][2] for n in models} == dict.fromkeys(models, len(PROMPTS))
    (full_nll, full_top1, _), (same_nll, same_top1, _) = means["full"], means["same"]
    assert full_top1 == 1.0 and same_top1 == 1.0  # greedy answers: each token is the top-1 choice
    assert same_nll == pytest.approx(full_nll, rel=1e-4)  # generation's own NLL == a scoring forward's
    damaged_nll, damaged_top1, _ = means["damaged"]
    assert damaged_nll > full_nll * 1.1 and damaged_top1 < 1.0


def strip_ids(text: str) -> list:
    """A response body (JSON or SSE) without the fields that differ between any two responses."""
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")] or [text]
    out = []
    for event in events:
        data = json.loads(event) if event != "[DONE]" else event
        if isinstance(data, dict):
            data.pop("id", None)
            data.pop("created", None)
        out.append(data)
    return out


async def test_client_response_is_identical_with_and_without_shadowing(tokenizer) -> None:
    full = tiny_llama(layers=2)
    bodies = [
        {"model": "full", "prompt": "Aspirin is used to", "max_tokens": 10, "temperature": 0},
        {"model": "full", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.8, "seed": 3},
        {"model": "full", "prompt": "The capital of", "max_tokens": 10, "stream": True, "seed": 1},
        {"model": "full", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "seed": 2},
    ]

    async def responses(**settings) -> list:
        out = []
        async for http in serving(tokenizer, {"full": full, "small": damaged(full)}, **settings):
            for body in bodies:
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                response = await http.post(path, json=body)
                assert response.status_code == 200
                out.append((dict(response.headers).get("content-type"), strip_ids(response.text)))
            if settings:
                await asyncio.sleep(0.2)
                assert "trimserve_shadow_items_total" in (await http.get("/metrics")).text
        return out

    plain = await responses()
    shadowed = await responses(shadow={"full": {"variants": ["small"], "rate": 1.0}})
    assert shadowed == plain


FAKE = str(Path(__file__).with_name("fake_vllm.py"))


async def test_vllm_upstream_scores_with_prompt_logprobs(tmp_path: Path) -> None:
    config = VllmConfig(
        model=str(tmp_path),
        command=(sys.executable, FAKE),
        dtype="bf16",
        max_model_len=512,
        startup_timeout_s=30,
        log_path=tmp_path / "vllm.log",
        extra_args=("--startup-delay", "0"),
    )
    backend = VllmBackend("v", config, UpstreamConfig(url="", max_tokens=64))
    await backend.start()
    try:
        chat = GenerationRequest("r", SamplingParams(), messages=({"role": "user", "content": "why is the sky"},))
        score = await backend.score(chat, "blue on clear days", None)
        answer = [fake_token(w) for w in ["blue", "on", "clear", "days"]]
        expected = [fake_logprob(t) for t in answer]
        assert score.tokens == 4
        assert score.nll == pytest.approx(-sum(lp for lp, _ in expected) / 4)
        assert score.top1 == pytest.approx(sum(rank == 1 for _, rank in expected) / 4)
        known = await backend.score(request(1), "ignored", (12, 14, 15))  # token ids known: no /tokenize
        assert (known.tokens, known.nll, known.top1) == (3, pytest.approx(0.5), pytest.approx(2 / 3))
    finally:
        await backend.close(1.0)
