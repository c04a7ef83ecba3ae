"""Layer surgery: removed layers leave, the rest are renumbered, caches and checkpoints still work."""

from __future__ import annotations

import pytest
import torch

from pruning.blocks import decoder_layers
from pruning.depth.surgery import remove_layers, replace_window
from tests.tiny_models import tiny_llama, tiny_opt, tiny_qwen2
from variants.format import BaseModelRef, VariantManifest
from variants.load import load_model
from variants.write import save_variant


def _ids(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_opt], ids=["llama", "qwen2", "opt"])
def test_removed_layers_leave_and_rest_renumber(build):
    model = build(layers=6)
    layers = list(decoder_layers(model))
    remove_layers(model, [1, 4])
    now = list(decoder_layers(model))
    assert [id(m) for m in now] == [id(layers[i]) for i in (0, 2, 3, 5)]
    assert model.config.num_hidden_layers == 4
    for j, layer in enumerate(now):
        idxs = {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")}
        assert idxs == {j}
    keys = {k.split("layers.")[1].split(".")[0] for k in model.state_dict() if "layers." in k}
    assert keys == {"0", "1", "2", "3"}


def test_per_layer_config_lists_are_sliced():
    model = tiny_qwen2(layers=5)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "x", "y"]
    remove_layers(model, [0, 3])
    assert model.config.layer_types == ["sliding_attention", "full_attention", "y"]


def _reference_logits(layers_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layers_model(ids, use_cache=False).logits


def test_generation_with_kv_cache_after_surgery():
    model = tiny_llama(layers=6)
    remove_layers(model, [0, 2, 5])
    ids = _ids()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    # Each cached step's logits equal a fresh full forward over the same prefix.
    seq = out.sequences
    full = _reference_logits(model, seq[:, :-1])
    for step, logits in enumerate(out.logits):
        pos = ids.shape[1] - 1 + step
        torch.testing.assert_close(logits[0], full[0, pos], rtol=1e-4, atol=1e-4)


def test_replace_window_and_save_reload_identical_logits(tmp_path, tokenizer):
    model = tiny_llama(layers=6)
    replace_window(model, 2, 3, decoder_layers(model)[2])
    assert model.config.num_hidden_layers == 4
    ids = _ids()
    before = _reference_logits(model, ids)
    manifest = VariantManifest(name="t", base=BaseModelRef(source="tiny"), method="depth/test")
    save_variant(model, tokenizer, tmp_path / "v", manifest)
    loaded, _ = load_model(tmp_path / "v")
    assert loaded.config.num_hidden_layers == 4
    assert torch.equal(_reference_logits(loaded, ids), before)
    gen = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize(
    ("remove", "message"),
    [([], "no layers"), ([0, 1, 2, 3], "at least one"), ([4], "0 .. 3"), ([-1], "0 .. 3"), ([1, 1], "duplicate")],
)
def test_bad_removals_raise_before_touching_the_model(remove, message):
    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match=message):
        remove_layers(model, remove)
    assert model.config.num_hidden_layers == 4 and len(decoder_layers(model)) == 4


@pytest.mark.parametrize(
    ("start", "size", "message"), [(2, 3, "past the last"), (0, 1, "at least 2"), (0, 4, "past|whole")]
)
def test_bad_windows_raise(start, size, message):
    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match=message):
        replace_window(model, start, size, torch.nn.Identity())
    assert len(decoder_layers(model)) == 4
