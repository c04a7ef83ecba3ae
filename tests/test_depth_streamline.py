"""LLM-Streamline: window choice, replacement training (causal), and the FFN export round trip."""

from __future__ import annotations

import pytest
import torch

from pruning.blocks import decoder_layers, run_block
from pruning.depth.ffn import NoOpAttention, ffn_layer
from pruning.depth.states import depth_states
from pruning.depth.streamline import StreamlineConfig, streamline, tail_kd_loss, tail_lm_loss, train_mse
from pruning.depth.surgery import replace_window
from pruning.depth.train import lm_loss
from tests.tiny_models import tiny_llama, tiny_opt
from variants.format import BaseModelRef, VariantManifest, read_manifest
from variants.load import load_model
from variants.noop import noop_layers
from variants.write import save_variant


def _calib(n: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(3, 1000, (n, seqlen), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("replacement", ["layer", "ffn"])
def test_training_reduces_mse_and_picks_the_most_similar_window(replacement):
    model = tiny_llama(layers=6)
    windows = _calib()
    states, kwargs = depth_states(model, windows)
    config = StreamlineConfig(remove=2, replacement=replacement, lr=3e-3, lr_min=1e-3, epochs=8)
    result = streamline(model, states, kwargs, config)
    assert result.window == 3 and result.start == max(range(4), key=lambda i: result.scores[i])
    assert result.mse_after < 0.8 * result.mse_before
    assert model.config.num_hidden_layers == 4
    block = decoder_layers(model)[result.start]
    assert isinstance(block.self_attn, NoOpAttention) == (replacement == "ffn")
    assert noop_layers(model) == ([result.start] if replacement == "ffn" else [])


def test_bf16_autocast_and_sampled_kd_positions_train_fp32_weights():
    model = tiny_llama(layers=5)
    windows = _calib()
    states, kwargs = depth_states(model, windows)
    config = StreamlineConfig(
        remove=1, loss="mse+kd", lr=3e-3, lr_min=1e-3, epochs=8, bf16_autocast=True, kd_token_fraction=0.5
    )
    result = streamline(model, states, kwargs, config, windows)
    assert result.mse_fit < 0.8 * result.mse_before
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(result.lm_losses) == 4 and all(0 <= loss < 1 for loss in result.lm_losses)


def test_training_runs_causally():
    model = tiny_llama(layers=4)
    windows = _calib(n=2)
    states, kwargs = depth_states(model, windows)
    block = decoder_layers(model)[1]
    changed = states[1].clone()
    changed[:, 10:] += 1.0  # future tokens differ
    with torch.no_grad():
        a, b = run_block(block, states[1], kwargs), run_block(block, changed, kwargs)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # earlier outputs do not see the future
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    config = StreamlineConfig(remove=1, epochs=2)
    losses = train_mse(block, states[1], states[3], kwargs, config)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("loss", ["lm", "mse+lm", "mse+kd"])
def test_tail_training_trains_only_the_replacement(loss):
    model = tiny_llama(layers=5)
    windows = _calib(n=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states, kwargs = depth_states(model, windows)
    result = streamline(model, states, kwargs, StreamlineConfig(remove=1, loss=loss, lr=1e-3), windows)
    assert len(result.lm_losses) == 2 and len(result.losses) == (0 if loss == "lm" else 2)
    prefix = f"model.layers.{result.start}."
    changed = {k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])}
    # Only the replacement's own weights moved (the rest of the old layer numbering is shifted,
    # so compare the untouched prefix layers and the embeddings/head).
    assert any(k.startswith(prefix) for k in changed)
    untouched = [k for k in before if not k.startswith("model.layers.")] + [
        k for k in before if k.startswith("model.layers.") and int(k.split(".")[2]) < result.start
    ]
    assert not changed & set(untouched)


def test_lm_loss_from_cached_states_equals_the_whole_models_loss():
    model = tiny_llama(layers=6)
    windows = _calib(n=2)
    states, kwargs = depth_states(model, windows)
    replace_window(model, 2, 3, decoder_layers(model)[2])
    with torch.no_grad():
        tail = tail_lm_loss(model, 2, states[2], windows, kwargs)
        torch.testing.assert_close(tail.float(), lm_loss(model, windows), rtol=1e-5, atol=1e-5)


def test_kd_loss_matches_a_reference_kl_and_vanishes_for_the_teacher_itself():
    model = tiny_llama(layers=6)
    windows = _calib(n=2)
    states, kwargs = depth_states(model, windows)
    with torch.no_grad():
        # the unpruned stack run from h_2 reproduces the teacher: zero divergence
        assert tail_kd_loss(model, 2, states[2], states[6], kwargs).abs() < 1e-5
        replace_window(model, 2, 3, decoder_layers(model)[2])
        got = tail_kd_loss(model, 2, states[2], states[6], kwargs)
        positions = torch.tensor([0, 5, 11])
        some = tail_kd_loss(model, 2, states[2], states[6], kwargs, positions)
        p = model.lm_head(model.model.norm(states[6])).softmax(-1)  # teacher distributions
        q = model(windows, use_cache=False).logits.softmax(-1)  # the pruned model's
        reference = (p * (p.log() - q.log())).sum(-1)  # (n, seqlen)
    torch.testing.assert_close(got, reference.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(some, reference[:, positions].mean(), rtol=1e-4, atol=1e-6)
    assert got > 0


def test_ffn_export_loads_through_load_model_with_identical_logits(tmp_path, tokenizer):
    model = tiny_llama(layers=6)
    windows = _calib()
    states, kwargs = depth_states(model, windows)
    streamline(model, states, kwargs, StreamlineConfig(remove=2, replacement="ffn", epochs=2))
    ids = _calib(n=1, seqlen=12)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    manifest = VariantManifest(name="ffn", base=BaseModelRef(source="tiny"), method="depth/streamline", notes=["x"])
    save_variant(model, tokenizer, tmp_path / "v", manifest)
    loaded, _ = load_model(tmp_path / "v")
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, expected)
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, do_sample=False))
    assert read_manifest(tmp_path / "v").num_layers == 4


def test_bad_streamline_inputs():
    with pytest.raises(ValueError, match="at least 1"):
        StreamlineConfig(remove=0)
    with pytest.raises(ValueError, match="replacement"):
        StreamlineConfig(remove=1, replacement="mlp")
    with pytest.raises(ValueError, match="kd losses only"):
        StreamlineConfig(remove=1, loss="mse+lm", kd_token_fraction=0.5)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        StreamlineConfig(remove=1, loss="kd", kd_token_fraction=0)
    model = tiny_llama(layers=4)
    states, kwargs = depth_states(model, _calib(n=1))
    with pytest.raises(ValueError, match="window of 4"):
        streamline(model, states, kwargs, StreamlineConfig(remove=3))
    opt = tiny_opt(layers=4)
    states, kwargs = depth_states(opt, _calib(n=1))
    with pytest.raises(ValueError, match="Llama-like"):
        streamline(opt, states, kwargs, StreamlineConfig(remove=1, replacement="ffn"))


def test_noop_layer_first_keeps_the_kv_cache_consistent():
    model = tiny_llama(layers=4)
    replace_window(model, 0, 2, ffn_layer(decoder_layers(model)[0], 0))
    ids = _calib(n=1, seqlen=8)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(out.sequences[:, :-1], use_cache=False).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], full[0, 7 + step], rtol=1e-4, atol=1e-4)
