"""The embedded default model (integration) and model loading errors."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from variants.load import ModelLoadError, fetch_embedded, load_model, parse_dtype, resolve_device, resolve_model


@pytest.mark.integration
def test_default_model_is_a_plain_checkpoint_that_knows_paris(default_model_dir):
    config = (default_model_dir / "config.json").read_text()
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.integration
def test_fetch_reuses_the_cache(default_model_dir):
    weights = default_model_dir / "model.safetensors"
    before = os.stat(weights).st_mtime_ns
    assert fetch_embedded("smollm2-135m") == default_model_dir
    assert os.stat(weights).st_mtime_ns == before


@pytest.mark.integration
def test_load_model_by_alias_in_bf16(default_model_dir):
    model, tokenizer = load_model("smollm2-135m", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert tokenizer.eos_token == "<|im_end|>"


def test_bad_model_specs_are_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model directory or a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id passes through
    with pytest.raises(ModelLoadError, match="unknown built-in"):
        fetch_embedded("gpt-17")


def test_dtype_and_device_settings():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_auto_dtype_is_bf16_where_the_hardware_has_it(monkeypatch):
    from variants.load import resolve_dtype

    assert resolve_dtype("auto", "cpu", cpu_bf16=lambda: "avx512_bf16") == (
        "bf16",
        "auto: the CPU has native bf16 (avx512_bf16)",
    )
    assert resolve_dtype("auto", "cpu", cpu_bf16=lambda: None) == (
        "fp32",
        "auto: the CPU lacks native bf16 (AVX512-BF16 or AMX)",
    )
    assert resolve_dtype("fp16", "cpu", cpu_bf16=lambda: "amx_bf16") == ("fp16", "requested")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")
    # The CUDA branch, exercised on CPU by pretending a device is there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == ("bf16", "auto: the CUDA device supports bf16")
    assert resolve_dtype("auto", "auto")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == ("fp16", "auto: the CUDA device lacks bf16")


def test_native_cpu_bf16_asks_torch_then_cpuinfo(monkeypatch):
    from variants.load import cpuinfo_bf16, native_cpu_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_cpu_bf16() == "amx_bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_cpu_bf16() is None
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch: read /proc/cpuinfo
    cpuinfo = Path("/proc/cpuinfo")
    assert native_cpu_bf16() == (cpuinfo_bf16(cpuinfo.read_text()) if cpuinfo.is_file() else None)
    flags = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n"
    assert cpuinfo_bf16(flags) == "avx512_bf16"
    assert cpuinfo_bf16(flags.replace("avx512_bf16", "amx_bf16")) == "amx_bf16"
    assert cpuinfo_bf16("flags\t\t: fpu sse avx2\n") is None
