"""Choosing the next token per request: greedy, or temperature and nucleus (top-p) sampling.

Each sampling request draws from its own `torch.Generator`, so a seeded request produces the
same tokens whatever else shares its batch.
"""

from __future__ import annotations

import secrets

import torch

from service.backend import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded from the request (or at random); None for greedy requests."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (at least one); (vocab,)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already suffices
    drop[0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one request from its logits row (vocab,).

    The logits are shifted so their maximum is 0 before dividing by the temperature: then any
    positive temperature, however small, gives finite scores (the best token 0, the others
    negative or -inf), where dividing first overflows to inf and softmax returns NaN.
    """
    if generator is None:
        return int(torch.argmax(logits))
    logits = logits.float()
    scaled = top_p_filter((logits - logits.max()) / params.temperature, params.top_p)
    probs = scaled.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
