"""Calibration statistics of a block's linear layers, collected with forward pre-hooks.

One pass of the block over the calibration windows fills, per linear layer, what the chosen
methods need: the sum of squared inputs per feature (Wanda, OWL), the input Gram matrix
X X^T (SparseGPT, TRIM on all tokens) and each sequence's last-token input (TRIM). Layers
reading the same input tensor (q/k/v, gate/up) share one accumulator, and the pass stops as
soon as every linear has seen its input, so the block's last matmul is never computed.
All statistics accumulate in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pruning.blocks import linear_layers, run_block


@dataclass(frozen=True)
class Needs:
    sq_norms: bool = False
    gram: bool = False
    last_token: bool = False


@dataclass
class LayerStats:
    """Statistics of one linear's inputs (N features) over all calibration tokens."""

    tokens: int = 0
    sq_norms: torch.Tensor | None = None  # (N,) sum of x_j^2
    gram: torch.Tensor | None = None  # (N, N) sum of x x^T
    last: list[torch.Tensor] = field(default_factory=list)  # per batch (b, N)

    def last_inputs(self) -> torch.Tensor:
        """(N, n_sequences): each sequence's last-token input, one column per sequence."""
        return torch.cat(self.last).T

    def add(self, x: torch.Tensor, needs: Needs, batch: int) -> None:
        x = x.float().reshape(batch, -1, x.shape[-1])  # (b, L, N); OPT flattens tokens before its MLP
        flat = x.reshape(-1, x.shape[-1])  # (b*L, N)
        self.tokens += flat.shape[0]
        if needs.sq_norms:
            sq = flat.pow(2).sum(0)
            self.sq_norms = sq if self.sq_norms is None else self.sq_norms + sq
        if needs.gram:
            gram = flat.T @ flat
            self.gram = gram if self.gram is None else self.gram.add_(gram)
        if needs.last_token:
            self.last.append(x[:, -1, :].clone())


class _AllSeen(Exception):
    """Raised once every linear of the block has seen its input: the rest of the block is skipped."""


@torch.no_grad()
def collect_stats(
    block: nn.Module,
    inputs: torch.Tensor,
    kwargs: dict[str, Any],
    needs: Needs,
    batch_size: int,
    device: torch.device,
    out: torch.Tensor | None = None,
    names: list[str] | None = None,
) -> dict[str, LayerStats]:
    """Run `block` over inputs (n, seqlen, hidden) and return statistics per linear (by name).

    Without `out` the pass stops once every linear has seen its input; with `out` (same shape
    as inputs) the block runs to the end and its outputs are written there. `names` restricts
    the statistics to some linears (the pass then stops once those have seen their inputs).
    The returned dict lists linears in the order they are called.
    """
    linears = {n: m for n, m in linear_layers(block).items() if names is None or n in names}
    stats: dict[str, LayerStats] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, owner); holds the tensor alive
    called: set[str] = set()
    batch = [0]  # size of the current batch

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if id(x) in seen:
                stats[name] = stats[seen[id(x)][1]]  # same input as an earlier layer: share
            else:
                seen[id(x)] = (x, name)
                stats.setdefault(name, LayerStats()).add(x, needs, batch[0])
            called.add(name)
            if out is None and len(called) == len(linears):
                raise _AllSeen

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in linears.items()]
    try:
        for start in range(0, len(inputs), batch_size):
            seen.clear()
            called.clear()
            batch[0] = len(inputs[start : start + batch_size])
            with contextlib.suppress(_AllSeen):
                hidden = run_block(block, inputs[start : start + batch_size].to(device), kwargs)
                if out is not None:
                    out[start : start + batch_size] = hidden.to(out.device)
    finally:
        for handle in handles:
            handle.remove()
    seen.clear()
    missing = set(linears) - set(stats)
    if missing:
        raise RuntimeError(f"linear layers never called during the block's forward: {sorted(missing)}")
    return stats
