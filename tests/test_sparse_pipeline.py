"""The block-wise sparsity pipeline on tiny Llama, Qwen2 and OPT models, and compressed storage."""

from __future__ import annotations

import pytest
import torch

from pruning.blocks import decoder_layers, linear_layers
from pruning.sparse.admm import AdmmConfig
from pruning.sparse.alps import AlpsConfig
from pruning.sparse.magnitude import magnitude_mask
from pruning.sparse.masks import prune_counts
from pruning.sparse.owl import OwlConfig
from pruning.sparse.pipeline import SparseConfig, prune_model
from pruning.sparse.trim import TrimConfig
from pruning.sparse.wanda import wanda_mask
from tests.tiny_models import TINY_MODELS, tiny_llama
from variants.compressed import load_compressed, nonzero_bits, save_compressed, unique_state

WINDOWS = torch.randint(3, 1000, (6, 24), generator=torch.Generator().manual_seed(0))
CONFIGS = {
    "magnitude": SparseConfig("magnitude", 0.6),
    "wanda": SparseConfig("wanda", 0.7),
    "sparsegpt": SparseConfig("sparsegpt", 0.5),
    "wanda 2:4": SparseConfig("wanda", 0.5, pattern=(2, 4)),
    "sparsegpt 4:8": SparseConfig("sparsegpt", 0.5, pattern=(4, 8)),
    "magnitude 2:4": SparseConfig("magnitude", 0.5, pattern=(2, 4)),
    "owl+wanda": SparseConfig("wanda", 0.7, owl=OwlConfig(nsamples=3)),
    "trim+owl+wanda": SparseConfig("wanda", 0.7, owl=OwlConfig(), trim=TrimConfig(steps=3)),
    "trim+magnitude": SparseConfig("magnitude", 0.8, trim=TrimConfig(steps=3)),
    "trim[all]+sparsegpt": SparseConfig("sparsegpt", 0.7, trim=TrimConfig(steps=3, tokens="all")),
    "trim+wanda seq": SparseConfig("wanda", 0.6, trim=TrimConfig(steps=3), sequential=True),
    "alps": SparseConfig("alps", 0.7, alps=AlpsConfig(max_iterations=30)),
    "admm 2:4": SparseConfig("admm", 0.5, pattern=(2, 4)),
    "owl+admm": SparseConfig("admm", 0.7, owl=OwlConfig()),
    "trim+owl+alps seq": SparseConfig(
        "alps", 0.7, owl=OwlConfig(), trim=TrimConfig(steps=2), sequential=True, alps=AlpsConfig(max_iterations=30)
    ),
}


def _weights(model):
    return {f"{i}.{n}": m.weight for i, b in enumerate(decoder_layers(model)) for n, m in linear_layers(b).items()}


CASES = [("llama", name) for name in CONFIGS] + [
    (arch, name)
    for arch in ("opt", "qwen2")
    for name in ("wanda", "sparsegpt 4:8", "trim+owl+wanda", "trim+wanda seq", "trim+owl+alps seq")
]


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_pipeline_exact_sparsity(arch, name):
    cfg = CONFIGS[name]
    model = TINY_MODELS[arch](layers=2)
    report = prune_model(model, WINDOWS, cfg, batch_size=4)
    weights = _weights(model)
    assert len(report.layers) == len(weights)
    if cfg.owl:
        assert sum(report.block_sparsity) / 2 == pytest.approx(0.7)
    for key, W in weights.items():
        target = report.block_sparsity[int(key.split(".")[0])]
        zeros = W == 0
        if cfg.pattern:
            n, m = cfg.pattern
            assert torch.all(zeros.view(W.shape[0], -1, m).sum(2) == n), key
        elif cfg.method == "wanda" and not cfg.trim:  # uniform per row: floor or ceil of N * s
            per_row = zeros.sum(1).float()
            assert torch.all((per_row - W.shape[1] * target).abs() < 1), key
        else:  # whole matrix exact to rounding (SparseGPT: per 128-column block)
            assert abs(int(zeros.sum()) - W.numel() * target) <= 1, key
        if cfg.trim:
            assert report.layers[f"layers.{key}"]["objective"] >= report.layers[f"layers.{key}"]["uniform_objective"]
            rows = prune_counts(torch.full((W.shape[0],), target, dtype=torch.float64), W.shape[1])
            assert int(zeros.sum()) == int(rows.sum()), key  # TRIM's rows add up to the layer's exact count
        if cfg.method in ("alps", "admm"):  # the solver's record is in the report (and so the manifest)
            info = report.layers[f"layers.{key}"]
            assert info["error_after_refit"] <= info["error_before_refit"] + 1e-6 and info["iterations"] >= 1


def test_plain_magnitude_needs_no_calibration():
    model = tiny_llama(layers=2)
    expected = {k: W * magnitude_mask(W, 0.6) for k, W in _weights(model).items()}
    report = prune_model(model, None, SparseConfig("magnitude", 0.6))
    assert len(report.layers) == len(expected)
    for key, W in _weights(model).items():
        assert torch.equal(W, expected[key]), key
    with pytest.raises(ValueError, match="needs calibration"):
        prune_model(model, None, SparseConfig("wanda", 0.6))


def test_wanda_block0_matches_reference_from_dense_embeddings():
    model = tiny_llama(layers=2)
    with torch.no_grad():
        hidden = torch.cat([model(w.unsqueeze(0), output_hidden_states=True).hidden_states[0] for w in WINDOWS])
        X = decoder_layers(model)[0].input_layernorm(hidden).reshape(-1, 64)  # q_proj inputs, all tokens
    q = decoder_layers(model)[0].self_attn.q_proj.weight
    expected = q * wanda_mask(q, X.pow(2).sum(0), 0.5)
    prune_model(model, WINDOWS, SparseConfig("wanda", 0.5), batch_size=6)
    assert torch.allclose(q, expected)


def test_sequential_recomputes_inputs_inside_the_block():
    a, b = tiny_llama(layers=1), tiny_llama(layers=1)
    prune_model(a, WINDOWS, SparseConfig("wanda", 0.6), batch_size=6)
    prune_model(b, WINDOWS, SparseConfig("wanda", 0.6, sequential=True), batch_size=6)
    qa, qb = a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight
    da, db = a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight
    assert torch.equal(qa, qb)  # first group: same dense inputs
    assert not torch.equal(da == 0, db == 0)  # last group: inputs from the pruned attention and MLP


@pytest.mark.parametrize("method", ["wanda", "alps"])
def test_offload_and_batch_size_give_the_same_model(method):
    a, b = tiny_llama(layers=2), tiny_llama(layers=2)
    cfg = SparseConfig(method, 0.6, owl=OwlConfig(), trim=TrimConfig(steps=2))
    prune_model(a, WINDOWS, cfg, batch_size=6)
    prune_model(b, WINDOWS, cfg, offload=True, batch_size=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_bad_configs_raise():
    for kwargs in (
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"method": "random"},
        {"sparsity": 0.5, "pattern": (4, 4)},
        {"sparsity": 0.5, "pattern": (2, 4), "trim": TrimConfig()},
        {"sparsity": 0.5, "pattern": (2, 4), "owl": OwlConfig()},
        {"sparsity": 0.7, "pattern": (2, 4)},
        {"method": "wanda", "alps": AlpsConfig()},
        {"method": "alps", "admm": AdmmConfig()},
    ):
        with pytest.raises(ValueError):
            SparseConfig(**kwargs)


def test_compressed_storage_round_trip_is_bit_exact(tmp_path):
    model = tiny_llama(layers=2)
    prune_model(model, WINDOWS, SparseConfig("wanda", 0.7), batch_size=6)
    state = unique_state(model)
    weird = torch.tensor([[0.0, -0.0, float("nan"), 1.5], [0.0, 0.0, 0.0, -2.0]])
    state["extra.weird"] = weird
    size = save_compressed(state, tmp_path / "c.safetensors")
    loaded = load_compressed(tmp_path / "c.safetensors")
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        bits = tensor.contiguous().view(torch.int32)
        assert torch.equal(loaded[name].view(torch.int32), bits), name
    assert int(nonzero_bits(weird).sum()) == 4  # -0.0 and NaN are kept as values
    dense = sum(t.numel() * t.element_size() for t in state.values())
    sparse_part = sum(W.numel() * 4 for W in _weights(model).values())
    assert size < dense - 0.5 * sparse_part  # 70% zeros: the block weights shrink by more than half
