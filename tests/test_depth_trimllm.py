"""TrimLLM: sparse update (only the configured set trains) and dropping the least harmful layer."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning.depth.criteria import block_influence
from pruning.depth.states import depth_states
from pruning.depth.surgery import remove_layers
from pruning.depth.trimllm import TrimLLMConfig, scan, split_domain, trimllm
from tests.tiny_models import tiny_llama

CONFIG = TrimLLMConfig(
    remove=1,
    heal="lm",
    trainable_fraction=0.25,
    steps_per_round=3,
    final_steps=0,
    seqlen=16,
    heldout_windows=2,
    lr=1e-3,
)


def _stream(n: int = 200) -> torch.Tensor:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(3))


def test_only_the_configured_set_trains_and_the_least_harmful_layer_goes():
    model = tiny_llama(layers=8)
    stream = _stream()
    _, heldout = split_domain(stream, CONFIG)
    states, _ = depth_states(model, heldout)
    top = sorted(torch.argsort(block_influence(states), descending=True)[:2].tolist())
    before = copy.deepcopy(model)
    result = trimllm(model, stream, CONFIG)
    assert result.trainable_layers == top
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before.state_dict()[_old(k, result)])}
    allowed_layers = {str(_new(i, result)) for i in top if i not in result.removed}
    for key in moved:
        if key.startswith("model.layers."):
            assert key.split(".")[2] in allowed_layers, key
        else:
            assert key in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"), key
    assert any(k.startswith("model.layers.") for k in moved) and "model.norm.weight" in moved
    assert all(not p.requires_grad for p in model.parameters())
    assert len(result.removed) == 1 and model.config.num_hidden_layers == 7
    assert [s.layers for s in result.trajectory] == [8, 7]


def _old(key: str, result) -> str:
    if not key.startswith("model.layers."):
        return key
    parts = key.split(".")
    parts[2] = str(_orig(int(parts[2]), result))
    return ".".join(parts)


def _orig(j: int, result) -> int:
    return [i for i in range(8) if i not in result.removed][j]


def _new(i: int, result) -> int:
    return [k for k in range(8) if k not in result.removed].index(i)


def test_scan_picks_the_layer_whose_removal_hurts_least():
    model = tiny_llama(layers=5)
    _, heldout = split_domain(_stream(), CONFIG)
    scores = scan(model, heldout, with_candidates=True)
    for p in range(5):
        pruned = remove_layers(copy.deepcopy(model), [p])
        assert scores.nll[p] == pytest.approx(scan(pruned, heldout).full, rel=1e-5)
    config = TrimLLMConfig(remove=1, heal="lm", steps_per_round=0, final_steps=0, seqlen=16, heldout_windows=2)
    result = trimllm(model, _stream(), config)
    assert result.removed == [min(scores.nll, key=scores.nll.get)]


def test_bad_trimllm_inputs_fail_before_work():
    with pytest.raises(ValueError, match="held-out"):  # a method raises ValueError; it knows no data layer
        split_domain(_stream(40), CONFIG)
    with pytest.raises(ValueError, match="at least 1"):
        TrimLLMConfig(remove=0)
    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match="at least one must remain"):
        trimllm(model, _stream(), TrimLLMConfig(remove=4, seqlen=16))
    with pytest.raises(ValueError, match="held-out"):
        trimllm(model, _stream(40), CONFIG)
    assert model.config.num_hidden_layers == 4
