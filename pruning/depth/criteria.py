"""Layer-importance criteria from calibration hidden states h_0 .. h_L (see `states.depth_states`).

- Block Influence (ShortGPT): BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}); low BI = removable.
- Window cosine (LLM-Streamline): for a window of `size` layers starting at i, the mean over all
  tokens of cos(h_i, h_{i+size}); high = the window barely changes the residual stream.
- Angular distance (Gromov et al.): arccos(cos(h_i, h_{i+size})) / pi on the last token, averaged
  over windows; low = removable.
- SLEB: greedy; each round removes the layer whose absence gives the lowest calibration NLL
  (never the first or last layer), re-scoring after every removal.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning.blocks import decoder_layers
from pruning.depth.states import removal_scan

log = logging.getLogger(__name__)

CRITERIA = ("shortgpt", "angular", "sleb", "streamline")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine of (..., hidden) states, computed in float64."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def check_window(num_layers: int, size: int) -> None:
    if size < 1:
        raise ValueError(f"window size must be at least 1 layer (got {size})")
    if size >= num_layers:
        raise ValueError(f"a window of {size} layers leaves nothing of a {num_layers}-layer model")


def block_influence(states: list[torch.Tensor]) -> torch.Tensor:
    """(L,) ShortGPT Block Influence of each layer."""
    return torch.stack([1 - _cosine(a, b).mean() for a, b in itertools.pairwise(states)])


def window_cosine(states: list[torch.Tensor], size: int) -> torch.Tensor:
    """(L - size + 1,) mean all-token cosine between the states entering and leaving each window."""
    num_layers = len(states) - 1
    check_window(num_layers, size)
    return torch.stack([_cosine(states[i], states[i + size]).mean() for i in range(num_layers - size + 1)])


def angular_distance(states: list[torch.Tensor], size: int) -> torch.Tensor:
    """(L - size + 1,) last-token angular distance across each window of `size` layers."""
    num_layers = len(states) - 1
    check_window(num_layers, size)
    out = []
    for i in range(num_layers - size + 1):
        cos = _cosine(states[i][:, -1], states[i + size][:, -1]).clamp(-1, 1)
        out.append((torch.arccos(cos) / math.pi).mean())
    return torch.stack(out)


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores, ascending by index."""
    return sorted(torch.argsort(scores, stable=True)[:k].tolist())


def best_window(scores: torch.Tensor, highest: bool) -> int:
    """Start of the window with the highest (cosine) or lowest (distance) score."""
    return int(torch.argmax(scores) if highest else torch.argmin(scores))


@dataclass(frozen=True)
class GreedyResult:
    removed: list[int]  # original layer indices, in removal order
    nlls: list[float]  # calibration NLL after each removal
    rounds: list[dict[int, float]]  # per round: original layer index -> NLL without it


def sleb_greedy(
    model: PreTrainedModel, hidden: torch.Tensor, kwargs: dict[str, Any], ids: torch.Tensor, k: int
) -> GreedyResult:
    """SLEB's greedy removal of k layers on calibration windows `ids` (n, seqlen).

    hidden: the states entering layer 0 for those windows. The model is not modified.
    """
    layers = list(decoder_layers(model))
    num_layers = len(layers)
    if not 0 < k <= num_layers - 2:
        raise ValueError(f"SLEB removes 1 .. {num_layers - 2} layers (first and last are kept), not {k}")
    alive = list(range(num_layers))
    removed, nlls, rounds = [], [], []
    for _ in tqdm(range(k), desc="sleb", unit="layer"):
        candidates = [p for p, idx in enumerate(alive) if idx not in (0, num_layers - 1)]
        scores = removal_scan(model, [layers[i] for i in alive], hidden, kwargs, ids, candidates).nll
        best = min(candidates, key=lambda p: (scores[p], p))
        rounds.append({alive[p]: scores[p] for p in candidates})
        removed.append(alive.pop(best))
        nlls.append(scores[best])
        log.info("sleb: removed layer %d (calibration NLL %.4f)", removed[-1], nlls[-1])
    return GreedyResult(removed=removed, nlls=nlls, rounds=rounds)


def scan_scores(states: list[torch.Tensor], sizes: list[int]) -> dict[str, Any]:
    """Every state-based criterion: Block Influence per layer; per window size, the all-token
    window cosine and the last-token angular distance of every start."""
    num_layers = len(states) - 1
    for size in sizes:
        check_window(num_layers, size)
    return {
        "block_influence": block_influence(states).tolist(),
        "windows": {
            str(size): {
                "cosine": window_cosine(states, size).tolist(),
                "angular": angular_distance(states, size).tolist(),
            }
            for size in sizes
        },
    }
