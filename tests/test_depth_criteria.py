"""Depth criteria against their formulas written out here, and SLEB against brute force."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pruning.blocks import capture_block_inputs
from pruning.depth.criteria import (
    angular_distance,
    best_window,
    block_influence,
    lowest,
    scan_scores,
    sleb_greedy,
    window_cosine,
)
from pruning.depth.states import depth_states
from pruning.depth.surgery import remove_layers
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=5)
    windows = torch.randint(3, 1000, (3, 16), generator=torch.Generator().manual_seed(1))
    states, kwargs = depth_states(model, windows)
    return model, windows, states, kwargs


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def test_states_match_the_models_own_hidden_states(setup):
    model, windows, states, _ = setup
    assert len(states) == 6
    with torch.no_grad():
        hs = model(windows, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(5):  # the model's last entry has the final norm applied
        torch.testing.assert_close(states[i], hs[i], rtol=1e-5, atol=1e-5)


def test_block_influence_formula(setup):
    _, _, states, _ = setup
    expected = []
    for i in range(5):
        a, b = states[i].reshape(-1, 64), states[i + 1].reshape(-1, 64)
        expected.append(1 - sum(_cos(a[t], b[t]) for t in range(len(a))) / len(a))
    torch.testing.assert_close(block_influence(states), torch.tensor(expected, dtype=torch.float64))


def test_window_cosine_and_angular_formulas(setup):
    _, _, states, _ = setup
    size = 2
    cos_expected, ang_expected = [], []
    for i in range(5 - size + 1):
        a, b = states[i].reshape(-1, 64), states[i + size].reshape(-1, 64)
        cos_expected.append(sum(_cos(a[t], b[t]) for t in range(len(a))) / len(a))
        last = [_cos(states[i][n, -1], states[i + size][n, -1]) for n in range(3)]
        ang_expected.append(sum(math.acos(max(-1.0, min(1.0, c))) / math.pi for c in last) / 3)
    torch.testing.assert_close(window_cosine(states, size), torch.tensor(cos_expected, dtype=torch.float64))
    torch.testing.assert_close(angular_distance(states, size), torch.tensor(ang_expected, dtype=torch.float64))
    scores = scan_scores(states, [size])
    assert scores["windows"]["2"]["cosine"] == pytest.approx(cos_expected)


def test_selection_helpers():
    assert lowest(torch.tensor([0.3, 0.1, 0.2, 0.05]), 2) == [1, 3]
    assert best_window(torch.tensor([0.2, 0.9, 0.5]), highest=True) == 1
    assert best_window(torch.tensor([0.2, 0.1, 0.5]), highest=False) == 1


@pytest.mark.parametrize("size", [0, 5, 7])
def test_window_out_of_range(setup, size):
    _, _, states, _ = setup
    with pytest.raises(ValueError, match="window"):
        window_cosine(states, size)


def _brute_nll(model, windows: torch.Tensor, remove: list[int]) -> float:
    pruned = remove_layers(copy.deepcopy(model), remove)
    with torch.no_grad():
        logits = pruned(windows, use_cache=False).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def test_sleb_matches_brute_force(setup):
    model, windows, _, _ = setup
    hidden, kwargs = capture_block_inputs(model, windows)
    result = sleb_greedy(model, hidden, kwargs, windows, 2)
    first = {i: _brute_nll(model, windows, [i]) for i in (1, 2, 3)}
    assert result.rounds[0] == pytest.approx(first, rel=1e-4)
    assert result.removed[0] == min(first, key=first.get)
    assert 0 not in result.removed and 4 not in result.removed
    assert result.nlls[1] == pytest.approx(_brute_nll(model, windows, result.removed), rel=1e-4)
    assert len(list(model.model.layers)) == 5  # scoring leaves the model alone
    with pytest.raises(ValueError, match="SLEB"):
        sleb_greedy(model, hidden, kwargs, windows, 4)
