"""The DeciLM (Nemotron-NAS) layout of a depth variant: the config vLLM reads, its errors, the round trip."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from pruning.blocks import decoder_layers
from pruning.depth.ffn import ffn_layer
from pruning.depth.surgery import replace_window
from tests.tiny_models import tiny_llama, tiny_qwen2
from variants.decilm import (
    CONFIG_FILE,
    NOTE,
    decilm_config,
    intermediate_size,
    llama_config,
    llama_config_from_decilm,
    write_decilm_layout,
)
from variants.format import BaseModelRef, VariantManifest, read_manifest, verify_variant
from variants.noop import NOOP_KEY, restore_noop_layers
from variants.write import save_variant


def _tiny_config(**changes) -> dict:
    config = tiny_llama(layers=4).config.to_dict()
    return {**config, "intermediate_size": 256, **changes}  # 256 = ffn_mult 6.0 at hidden 64


def _ffn_variant(out: Path, tokenizer) -> LlamaForCausalLM:
    """A 5-layer tiny Llama whose layers 2-3 became one FFN-only layer, saved as a variant."""
    config = tiny_llama(layers=5).config
    config.intermediate_size = 256  # vLLM rounds DeciLM's MLP widths up to a multiple of 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    replace_window(model, 2, 2, ffn_layer(decoder_layers(model)[2], 2))
    manifest = VariantManifest(name="ffn", base=BaseModelRef(source="tiny"), method="depth/streamline")
    save_variant(model, tokenizer, out, manifest)
    return model


def _remote_config_class(directory: Path) -> type:
    """The written configuration_decilm.py's class, imported from the file (no trust_remote_code cache)."""
    spec = importlib.util.spec_from_file_location("configuration_decilm", directory / CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DeciLMConfig


def test_written_layout_is_what_vllm_reads_and_trimserve_loads_it_back(tmp_path, tokenizer):
    model = _ffn_variant(tmp_path / "v", tokenizer)
    before = json.loads((tmp_path / "v" / "config.json").read_text())
    write_decilm_layout(tmp_path / "v")
    after = json.loads((tmp_path / "v" / "config.json").read_text())

    assert after["architectures"] == ["DeciLMForCausalLM"] and after["model_type"] == "nemotron-nas"
    assert after[NOOP_KEY] == [2]
    assert [b["attention"]["no_op"] for b in after["block_configs"]] == [False, False, True, False]
    assert llama_config_from_decilm(after) == before
    verify_variant(tmp_path / "v")  # weights untouched, the .py file is no weight file
    assert NOTE in read_manifest(tmp_path / "v").notes

    # The remote config as vLLM's DeciLMForCausalLM reads it: sections as attributes.
    config = _remote_config_class(tmp_path / "v").from_dict(after)
    assert len(config.block_configs) == config.num_hidden_layers == 4
    for i, block in enumerate(config.block_configs):
        assert block.attention.no_op == (i == 2)
        if not block.attention.no_op:
            assert config.num_attention_heads // block.attention.n_heads_in_group == config.num_key_value_heads
        assert intermediate_size(block.ffn.ffn_mult, config.hidden_size) == config.intermediate_size
    assert not hasattr(config.block_configs[0].ffn, "intermediate_size")  # vLLM takes ffn_mult when present
    assert json.loads(config.to_json_string())["block_configs"] == after["block_configs"]

    # trimserve reads the Llama config back; the weights load into the same model.
    loaded = restore_noop_layers(LlamaForCausalLM.from_pretrained(tmp_path / "v", config=llama_config(tmp_path / "v")))
    ids = torch.randint(3, 1000, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_rewriting_is_idempotent_and_plain_checkpoints_are_not_decilm(tmp_path, tokenizer):
    _ffn_variant(tmp_path / "v", tokenizer)
    assert llama_config(tmp_path / "v") is None
    write_decilm_layout(tmp_path / "v")
    first = (tmp_path / "v" / "config.json").read_text()
    write_decilm_layout(tmp_path / "v")
    assert (tmp_path / "v" / "config.json").read_text() == first
    assert read_manifest(tmp_path / "v").notes.count(NOTE) == 1


def test_a_model_without_noop_layers_gets_attention_everywhere():
    blocks = decilm_config(_tiny_config())["block_configs"]
    assert [(b["attention"]["no_op"], b["attention"]["n_heads_in_group"]) for b in blocks] == [(False, 2)] * 4
    assert {b["ffn"]["ffn_mult"] for b in blocks} == {6.0}
    assert intermediate_size(4.0, 576) == 1536  # the default model's width is expressible


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (tiny_qwen2().config.to_dict(), "Llama models only"),
        (_tiny_config(intermediate_size=128), "ffn_mult"),
        (_tiny_config(**{NOOP_KEY: [0]}), "layer 0"),
        (_tiny_config(**{NOOP_KEY: [4]}), "4 layers"),
        (_tiny_config(num_key_value_heads=3), "groups"),
    ],
)
def test_what_the_layout_cannot_express_is_refused(config, match):
    with pytest.raises(ValueError, match=match):
        decilm_config(config)


def test_foreign_decilm_configs_are_refused():
    good = decilm_config(_tiny_config(**{NOOP_KEY: [1]}))
    with pytest.raises(ValueError, match="not a DeciLM config"):
        llama_config_from_decilm(_tiny_config())
    ffn_noop = json.loads(json.dumps(good))
    ffn_noop["block_configs"][3]["ffn"]["no_op"] = True
    with pytest.raises(ValueError, match="only no-op attention"):
        llama_config_from_decilm(ffn_noop)
    disagree = {**good, NOOP_KEY: [2]}
    with pytest.raises(ValueError, match="no-op"):
        llama_config_from_decilm(disagree)
