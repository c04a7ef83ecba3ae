"""Model registry (specs, config files, verified loading), A/B arms, text streaming, settings."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx2
import pytest
import torch

from service.ab import Experiment, experiments_from, parse_ab
from service.app import create_app, record_backend
from service.backends import make_backend
from service.metrics import Metrics
from service.protocol import ChatCompletionRequest, CompletionRequest
from service.registry import default_specs, parse_model_arg, read_config, serve_plan
from service.settings import ModelSpec, Settings
from service.textstream import IncrementalDetokenizer, StopMatcher
from tests.tiny_models import tiny_llama
from variants.format import BaseModelRef, VariantError, VariantManifest
from variants.load import load_variant
from variants.write import save_variant


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tokenizer) -> Path:
    """A variants directory: one variant of the default model (half its weights zeroed), one of another."""
    root = tmp_path_factory.mktemp("variants")
    model = tiny_llama(layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:, ::2] = 0
    save_variant(
        model,
        tokenizer,
        root / "sparse50",
        VariantManifest(name="sparse50", base=BaseModelRef(source="smollm2-135m"), method="magnitude"),
    )
    save_variant(
        tiny_llama(layers=1),
        tokenizer,
        root / "other",
        VariantManifest(name="other", base=BaseModelRef(source="gpt2"), method="magnitude"),
    )
    return root


def test_default_specs_find_variants_of_the_default_model(variants: Path, tmp_path: Path) -> None:
    specs = default_specs(variants)
    assert [(s.name, s.source) for s in specs] == [("full", "smollm2-135m"), ("sparse50", str(variants / "sparse50"))]
    assert [s.name for s in default_specs(tmp_path / "missing")] == ["full"]


@pytest.mark.parametrize(("native", "dtype", "reason"), [(True, "bf16", "has native bf16"), (False, "fp32", "lacks")])
def test_auto_dtype_and_its_reason_are_logged(variants, monkeypatch, caplog, native, dtype, reason) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("INFO", logger="variants.load"):
        loaded = load_variant("sparse50", str(variants / "sparse50"))
    assert loaded.dtype == dtype and reason in loaded.dtype_reason
    assert next(loaded.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert f"sparse50: dtype {dtype}, {loaded.dtype_reason}" in caplog.messages


def test_load_one_verifies_and_measures(variants: Path, tmp_path: Path) -> None:
    loaded = load_variant("sparse50", str(variants / "sparse50"), "fp32", "cpu")
    assert loaded.manifest is not None and loaded.manifest.method == "magnitude"
    zeros = 2 * loaded.model.model.layers[0].mlp.up_proj.weight[:, ::2].numel()
    padding_row = int((loaded.model.model.embed_tokens.weight == 0).sum())  # pad token's embedding
    assert loaded.params_total - loaded.params_nonzero == zeros + padding_row
    assert loaded.weight_bytes >= 4 * loaded.params_total and loaded.load_seconds > 0
    metrics = Metrics()
    backend = make_backend(ModelSpec(name="sparse50", source=str(variants / "sparse50")), Settings())

    async def started() -> dict:
        await backend.start()
        record_backend(backend, metrics)
        await backend.close(1.0)
        return backend.describe()

    described = asyncio.run(started())
    assert (
        metrics.registry.get_sample_value("trimserve_model_parameters", {"variant": "sparse50", "kind": "total"})
        == loaded.params_total
    )
    assert described["manifest"]["base"]["source"] == "smollm2-135m" and described["backend"] == "native"
    assert loaded.dtype_reason == "requested" and described["dtype_reason"].startswith("auto: ")
    # A tampered weight file is refused.
    tampered = tmp_path / "tampered"
    save_variant(
        tiny_llama(layers=1),
        loaded.tokenizer,
        tampered,
        VariantManifest(name="t", base=BaseModelRef(source="x"), method="m"),
    )
    with open(tampered / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    with pytest.raises(VariantError, match="sha256"):
        load_variant("t", str(tampered))


def test_config_files_toml_and_yaml(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text(
        '[[models]]\nname = "full"\nsource = "smollm2-135m"\ndtype = "bf16"\n\n'
        '[[models]]\nname = "d8"\npath = "/v/d8"\ndevice = "cpu"\n\n[ab]\nchat = {full = 80, d8 = 20}\n'
    )
    yaml = tmp_path / "serve.yaml"
    yaml.write_text(
        "models:\n  - {name: full, source: smollm2-135m, dtype: bf16}\n  - {name: d8, path: /v/d8, device: cpu}\n"
        "ab:\n  chat: {full: 80, d8: 20}\n"
    )
    for path in (toml, yaml):
        plan = serve_plan(Settings(config_file=path, dtype="fp32"))
        specs, ab = plan.models, plan.ab
        assert [(s.name, s.source, s.dtype, s.device) for s in specs] == [
            ("full", "smollm2-135m", "bf16", "cpu"),
            ("d8", "/v/d8", "fp32", "cpu"),
        ]
        assert ab == {"chat": {"full": 80, "d8": 20}}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nname = "x"\nsource = "y"\ndtype = "int3"\n')
    with pytest.raises(ValueError, match="int3"):
        read_config(bad)
    with pytest.raises(ValueError, match="unique"):
        serve_plan(Settings(models=[ModelSpec(name="a", source="p"), ModelSpec(name="a", source="q")]))


def test_parse_model_arg() -> None:
    assert parse_model_arg("depth8=/tmp/d8") == ModelSpec(name="depth8", source="/tmp/d8")
    for bad in ("nopath", "=x", "bad name=/p"):
        with pytest.raises(ValueError):
            parse_model_arg(bad)


def test_ab_split_is_sticky_and_weighted() -> None:
    experiment = parse_ab("chat=full:80,depth8:20")
    assert experiment == Experiment("chat", (("full", 80), ("depth8", 20)))
    arms = Counter(experiment.pick(f"user-{i}") for i in range(4000))
    assert 0.76 < arms["full"] / 4000 < 0.84
    assert all(experiment.pick("alice") == experiment.pick("alice") for _ in range(5))
    assert parse_ab("x=a:0,b:1").pick("anyone") == "b"
    for bad in ("chat", "chat=full", "chat=full:x", "chat=full:0", "chat=a:1,a:2"):
        with pytest.raises(ValueError):
            parse_ab(bad)
    with pytest.raises(ValueError, match="unknown variants"):
        experiments_from({"chat": {"full": 1, "ghost": 1}}, {"full"})
    with pytest.raises(ValueError, match="same name"):
        experiments_from({"full": {"full": 1}}, {"full"})


def test_incremental_detokenizer_handles_split_characters(tokenizer) -> None:
    text = " naïve café 😀👍 日本語のテキスト, and ASCII."
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("Prompt:")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text
    assert any(p == "" for p in pieces)  # some tokens only complete a character later


def test_stop_matcher_across_deltas() -> None:
    stopper = StopMatcher(["END", "\n\n"])
    out = [stopper.feed(d) for d in ["Hello E", "N", "d of E", "N", "D later"]]
    assert "".join(out) == "Hello ENd of " and stopper.stopped
    assert out[0] == "Hello "  # "E" held back: it could start "END"
    plain = StopMatcher(["zz"])
    assert plain.feed("abz") + plain.flush() == "abz" and not plain.stopped


def test_requests_convert_to_sampling_params() -> None:
    request = CompletionRequest(model="m", prompt="x", temperature=0, seed=3, ignore_eos=True, stop="a", cache_salt="s")
    params = request.to_sampling_params(default_max_tokens=16)
    assert (params.max_tokens, params.temperature, params.seed, params.ignore_eos) == (16, 0.0, 3, True)
    assert params.cache_salt == "s"
    assert request.stop_strings() == ["a"]
    chat = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_completion_tokens=7
    )
    assert chat.to_sampling_params(256).max_tokens == 7
    assert chat.conversation() == [{"role": "user", "content": "hi"}]
    assert CompletionRequest(model="m", prompt=[[1, 2, 3]]).single_prompt() == [1, 2, 3]


def test_app_loads_models_from_settings_at_startup(variants: Path) -> None:
    settings = Settings(variants_dir=variants, models=[ModelSpec(name="s50", source=str(variants / "sparse50"))])
    app = create_app(settings)

    async def scenario() -> tuple[int, dict, str]:
        transport = httpx2.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx2.AsyncClient(transport=transport, base_url="http://t") as http,
        ):
            info = (await http.get("/v1/variants/s50")).json()
            return (await http.get("/ready")).status_code, info, (await http.get("/metrics")).text

    status, info, metrics = asyncio.run(scenario())
    assert status == 200 and info["manifest"]["method"] == "magnitude" and info["params"]["nonzero"] > 0
    assert 'trimserve_model_load_seconds{variant="s50"}' in metrics
