"""Hidden states at every depth, and the NLL of a layer stack run from cached states.

`depth_states` runs calibration windows block by block (through `pruning.blocks`) and keeps the
residual stream entering every layer plus the one leaving the last: h_0 .. h_L. Criteria compare
these states; greedy methods (SLEB, TrimLLM) re-run only the layers after a candidate from the
cached state in front of it, then the final norm and LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from pruning.blocks import capture_block_inputs, decoder_layers, final_norm, run_layers


@torch.no_grad()
def depth_states(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 1
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """[h_0, ..., h_L], each (n, seqlen, hidden) in float32, and the block kwargs.

    h_i enters layer i; h_L leaves the last layer (before the final norm).
    """
    hidden, kwargs = capture_block_inputs(model, windows)
    states = [hidden.float()]
    for layer in decoder_layers(model):
        hidden = run_layers([layer], hidden, kwargs, batch_size)
        states.append(hidden.float())
    return states, kwargs


def next_token_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits from last-layer states (before the final norm)."""
    head = model.get_output_embeddings()
    return head(final_norm(model)(hidden.to(head.weight.dtype))).float()


def lm_nll(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL from last-layer states (n, seqlen, hidden) and their token ids (n, seqlen)."""
    total = torch.zeros((), dtype=torch.float64)
    for h, row in zip(hidden, ids, strict=True):
        logits = next_token_logits(model, h[:-1])  # (seqlen-1, vocab)
        total += F.cross_entropy(logits, row[1:].to(logits.device), reduction="sum").double().cpu()
    return total / (ids.shape[0] * (ids.shape[1] - 1))


@torch.no_grad()
def stack_nll(
    model: PreTrainedModel,
    layers: list[nn.Module],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    ids: torch.Tensor,
    batch_size: int = 1,
) -> float:
    """NLL of running `layers` from `hidden` and then the model's final norm and head."""
    return float(lm_nll(model, run_layers(layers, hidden, kwargs, batch_size), ids))


@dataclass(frozen=True)
class RemovalScan:
    full: float  # NLL of the whole stack
    nll: dict[int, float]  # candidate position -> NLL of the stack without that layer
    norm: dict[int, float]  # candidate position -> mean L2 norm of its output states


@torch.no_grad()
def removal_scan(
    model: PreTrainedModel,
    layers: list[nn.Module],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    ids: torch.Tensor,
    candidates: list[int],
) -> RemovalScan:
    """Remove each candidate position p of `layers` in turn and score the rest on windows `ids`.

    States in front of each layer are computed once, so removing p only re-runs layers p+1 .. end.
    The norms are TrimLLM's tie-break (largest output activation norm).
    """
    prefix = [hidden]
    for layer in layers:
        prefix.append(run_layers([layer], prefix[-1], kwargs))
    nll = {p: stack_nll(model, layers[p + 1 :], prefix[p], kwargs, ids) for p in candidates}
    norm = {p: float(prefix[p + 1].float().norm(dim=-1).mean()) for p in candidates}
    return RemovalScan(full=float(lm_nll(model, prefix[-1], ids)), nll=nll, norm=norm)
