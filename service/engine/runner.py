"""Model runners: one forward that decodes a token for the first B slots and prefills prompt chunks.

A runner owns a request's KV state by slot index. The scheduler keeps decoding requests in slots
0..B-1 (compacting with `move` when one leaves), so a decode step works on a prefix of the slot
dimension and never gathers. New prompts ride in the same forward as `Chunk`s, whole or in pieces
(a long prompt is prefilled over several steps while the others keep decoding). The engine uses
the compact Llama-family forward (`service.engine.llama`) when the model fits it, and otherwise
the generic runner below, which drives the Hugging Face forward with one cache per request
(`service.engine.engine.make_runner`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens for one slot: `ids` go to positions start..start+len(ids)-1.

    The slot must already hold positions 0..start-1 (earlier chunks of the same prompt); a chunk
    with start 0 replaces whatever the slot held.
    """

    slot: int
    ids: list[int]
    start: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


class Runner(Protocol):
    """What the scheduler needs from a model; all tensors live on the model's device."""

    max_slots: int
    max_seq: int  # positions a slot can hold (prompt + generated)
    cache_bytes: int | None  # what the KV cache holds now, if the runner can tell

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, chunks: Sequence[Chunk] = (), first: int = 0
    ) -> torch.Tensor:
        """Append tokens (B,) at positions (B,) to slots first..first+B-1 and prefill `chunks`, in one
        forward; logits (B + len(chunks), vocab): the B decode rows, then each chunk's last position."""
        ...

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        ...

    def save(self, slot: int, length: int) -> tuple[object, int] | None:
        """A copy of the first `length` positions of `slot` and its bytes, for the prefix cache; None
        if this runner keeps no prefixes."""
        ...

    def restore(self, saved: object, slot: int, length: int) -> None:
        """Make `slot` hold the first `length` positions of a copy `save` made (replacing what it held)."""
        ...

    def logits(self, ids: list[int], keep: int) -> torch.Tensor:
        """Logits (keep, vocab) of the last `keep` positions of `ids`, leaving every slot as it was."""
        ...


class StepShortcuts:
    """`prefill` and `decode` as single-purpose steps of a runner's `step` (warm-up, benchmarks, tests)."""

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run a whole prompt into `slot` (replacing what it held); logits of its last position (vocab,)."""
        none = torch.empty(0, dtype=torch.long)
        return self.step(none, none, [Chunk(slot, list(ids))])[0]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Append tokens (B,) at positions (B,) to slots first..first+B-1; logits (B, vocab)."""
        return self.step(tokens, positions, (), first)


MAX_AUTO_SLOTS = 64  # more requests per step than this stop paying on the hosts we measure


def free_memory(device: torch.device) -> int:
    """Bytes free for the cache on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: what the OS reports as free
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_bytes_per_position(model: PreTrainedModel) -> int:
    """Cache bytes one position of one request takes: keys and values of every layer (fp32 on CPU)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = 4 if model.device.type == "cpu" else model.dtype.itemsize
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def slots_for_memory(model: PreTrainedModel, max_seq: int, budget: int | None = None) -> int:
    """Batch slots whose caches fit `budget` bytes (default a quarter of free memory) at full context.

    Sized for the worst case, every slot at `max_seq` positions; the cache itself grows with use.
    """
    budget = free_memory(model.device) // 4 if budget is None else budget
    per_slot = kv_bytes_per_position(model) * max_positions(model, max_seq)
    slots = max(1, min(MAX_AUTO_SLOTS, budget // per_slot))
    log.info(
        "%d batch slots: %.1f MiB of cache each at %d positions, budget %.0f MiB",
        slots,
        per_slot / 2**20,
        max_positions(model, max_seq),
        budget / 2**20,
    )
    return slots


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc keeps what loading and packing freed)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to give back this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def max_positions(model: PreTrainedModel, wanted: int) -> int:
    """`wanted` capped by the model's position limit, if it has one."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


class HFRunner(StepShortcuts):
    """Any causal LM through its own forward: one DynamicCache per slot, run one slot at a time.

    Correct for every architecture `generate` supports but shares no forward passes; the
    compact Llama-family runner is the fast path.
    """

    def __init__(self, model: PreTrainedModel, max_slots: int, max_seq: int) -> None:
        self.model = model
        self.max_slots = max_slots
        self.max_seq = max_positions(model, max_seq)
        self.device = model.device
        self.caches: list[DynamicCache | None] = [None] * max_slots
        self.cache_bytes = None  # Hugging Face caches do not report their size

    @torch.inference_mode()
    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, chunks: Sequence[Chunk] = (), first: int = 0
    ) -> torch.Tensor:
        rows = [self._append(first + b, [int(tokens[b])], int(positions[b])) for b in range(tokens.shape[0])]
        rows += [self._append(c.slot, c.ids, c.start) for c in chunks]
        return torch.stack(rows)

    def _append(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Run `ids` at positions start.. on top of the slot's cache; logits of the last one."""
        if start == 0:
            self.caches[slot] = DynamicCache(config=self.model.config)
        cache = self.caches[slot]
        if cache is None:
            raise RuntimeError(f"slot {slot} holds no request")
        extra = cache.get_seq_length() - start
        if extra > 0:  # a retried step (see LLMEngine._run) must not append twice
            cache.crop(-extra)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]

    @torch.inference_mode()
    def logits(self, ids: list[int], keep: int) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits[0]

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst] = self.caches[src]
        self.caches[src] = None

    def save(self, slot: int, length: int) -> None:
        """None: no prefixes kept. The caches of other architectures (sliding windows, linear
        attention) cannot always be cut back to a prefix."""
        return None

    def restore(self, saved: object, slot: int, length: int) -> None:
        raise RuntimeError("the generic runner saves no prefixes, so it has none to restore")
