"""Model runners: prefill one request into a slot, decode one token for the first B slots.

A runner owns a request's KV state by slot index. The scheduler keeps running requests in slots
0..B-1 (compacting with `move` when one leaves), so a decode step works on a prefix of the slot
dimension and never gathers. The engine uses the compact Llama-family forward
(`service.engine.llama`) when the model fits it, and otherwise the generic runner below, which
drives the Hugging Face forward with one cache per request (`service.engine.engine.make_runner`).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What the scheduler needs from a model; all tensors live on the model's device."""

    max_slots: int
    max_seq: int  # positions a slot can hold (prompt + generated)

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run the prompt into `slot` (replacing what it held); logits of the last position (vocab,)."""
        ...

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Append tokens (B,) at positions (B,) to slots first..first+B-1; logits (B, vocab)."""
        ...

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        ...


def max_positions(model: PreTrainedModel, wanted: int) -> int:
    """`wanted` capped by the model's position limit, if it has one."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


class HFRunner:
    """Any causal LM through its own forward: one DynamicCache per slot, decoded one slot at a time.

    Correct for every architecture `generate` supports but shares no forward passes; the
    compact Llama-family runner is the fast path.
    """

    def __init__(self, model: PreTrainedModel, max_slots: int, max_seq: int) -> None:
        self.model = model
        self.max_slots = max_slots
        self.max_seq = max_positions(model, max_seq)
        self.device = model.device
        self.caches: list[DynamicCache | None] = [None] * max_slots

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        self.caches[slot] = cache
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, first: int = 0) -> torch.Tensor:
        rows = []
        for b in range(tokens.shape[0]):
            cache = self.caches[first + b]
            if cache is None:
                raise RuntimeError(f"slot {first + b} holds no request")
            extra = cache.get_seq_length() - int(positions[b])
            if extra > 0:  # a retried decode (see LLMEngine._decode) must not append twice
                cache.crop(-extra)
            out = self.model(input_ids=tokens[b].view(1, 1), cache=cache, use_cache=True, logits_to_keep=1)
            rows.append(out.logits[0, -1])
        return torch.stack(rows)

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst] = self.caches[src]
        self.caches[src] = None
