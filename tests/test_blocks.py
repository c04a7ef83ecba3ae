import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pruning.blocks import (
    UnsupportedArchitecture,
    capture_block_inputs,
    decoder_layers,
    final_norm,
    linear_layers,
    run_layers,
)


def test_block_by_block_reproduces_full_forward(tiny_model):
    windows = torch.randint(3, 1000, (3, 24), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_block_inputs(tiny_model, windows)
    assert hidden.shape == (3, 24, tiny_model.config.hidden_size)
    for block in decoder_layers(tiny_model):
        hidden = run_layers([block], hidden, kwargs, batch_size=2)
    hidden = final_norm(tiny_model)(hidden)
    project_out = getattr(tiny_model.model.get_decoder(), "project_out", None)
    if project_out is not None:
        hidden = project_out(hidden)
    with torch.no_grad():
        expected = tiny_model(windows).logits
        got = tiny_model.lm_head(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_linear_layers_of_a_llama_block(tiny_model):
    names = set(linear_layers(decoder_layers(tiny_model)[0]))
    if tiny_model.config.model_type == "opt":
        assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}
    else:
        assert {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= names


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedArchitecture, match="'gpt2' is not supported"):
        decoder_layers(model)
