"""One entry point per depth method: calibration data in, pruned model plus manifest stats out.

`DepthSettings` holds every knob (validated before any work); `prune_depth` loads calibration
windows, runs the method on the model in place and returns what goes into the manifest.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evaluation.data import calibration_windows, eval_windows, load_texts, tokenize_joined
from evaluation.evaluate import window_nll
from pruning.blocks import capture_block_inputs, decoder_layers
from pruning.depth.criteria import (
    angular_distance,
    best_window,
    block_influence,
    check_window,
    lowest,
    sleb_greedy,
)
from pruning.depth.noop import NOOP_KEY, NOOP_NOTE
from pruning.depth.states import depth_states
from pruning.depth.streamline import REPLACEMENTS, StreamlineConfig, streamline
from pruning.depth.surgery import check_removal, remove_layers
from pruning.depth.trimllm import TrimLLMConfig, split_domain, trimllm

log = logging.getLogger(__name__)

METHODS = ("streamline", "shortgpt", "angular", "sleb", "trimllm")


@dataclass(frozen=True)
class DepthSettings:
    method: str
    remove: int
    calib: str = "c4"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    streamline: StreamlineConfig | None = None  # method streamline (default: layer replacement, MSE)
    trimllm: TrimLLMConfig | None = None  # method trimllm
    domain: str | None = None  # trimllm's domain text source
    track_windows: int = 0  # trimllm: WikiText-2 windows (of seqlen) scored after every drop

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.remove < 1:
            raise ValueError(f"--remove must be at least 1 (got {self.remove})")
        if self.track_windows < 0:
            raise ValueError(f"track_windows must be >= 0 (got {self.track_windows})")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError("nsamples must be >= 1 and seqlen >= 2")
        if self.method == "trimllm" and not self.domain:
            raise ValueError("trimllm needs a domain text source (--domain)")
        if self.method == "streamline" and self.streamline is None:
            object.__setattr__(self, "streamline", StreamlineConfig(remove=self.remove, seed=self.seed))
        if self.method == "trimllm" and self.trimllm is None:
            object.__setattr__(self, "trimllm", TrimLLMConfig(remove=self.remove, seed=self.seed))
        for sub in (self.streamline, self.trimllm):
            if sub is not None and sub.remove != self.remove:
                raise ValueError(f"method config removes {sub.remove} layers, settings say {self.remove}")

    def check(self, num_layers: int) -> None:
        """Everything that depends on the model's depth; call before calibration."""
        if self.remove >= num_layers:
            raise ValueError(f"cannot remove {self.remove} of {num_layers} layers: at least one must remain")
        if self.method == "streamline":
            self.streamline.check(num_layers)
        elif self.method == "angular":
            check_window(num_layers, self.remove)
        elif self.method == "sleb" and self.remove > num_layers - 2:
            raise ValueError(f"SLEB keeps the first and last layer: at most {num_layers - 2} of {num_layers}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DepthOutcome:
    removed: list[int]  # original indices of layers gone (a replaced window counts all its layers)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Calibration:
    """Calibration windows and, for the state-based methods, their hidden states h_0 .. h_L."""

    windows: torch.Tensor  # (n, seqlen) token ids
    states: list[torch.Tensor] | None = None
    kwargs: dict[str, Any] | None = None


def prune_depth(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: DepthSettings,
    calibration: Calibration | None = None,
) -> DepthOutcome:
    """Run the configured method on `model` in place.

    `calibration` lets a caller share one calibration pass between methods (it must come from
    this model and these settings); by default the windows are drawn from `settings.calib`.
    """
    num_layers = len(decoder_layers(model))
    settings.check(num_layers)
    began = time.perf_counter()
    if settings.method == "trimllm":
        stream = tokenize_joined(load_texts(settings.domain), tokenizer)
        split_domain(stream, settings.trimllm)  # too little text: fail before any work
        result = trimllm(model, stream, settings.trimllm, _wikitext_tracker(tokenizer, settings))
        outcome = DepthOutcome(removed=result.removed, stats=result.stats())
    else:
        if calibration is None:
            windows = calibration_windows(
                load_texts(settings.calib), tokenizer, settings.nsamples, settings.seqlen, settings.seed
            )
            calibration = Calibration(windows)
        outcome = _from_states(model, calibration, settings)
    outcome.seconds = time.perf_counter() - began
    outcome.stats["seconds"] = round(outcome.seconds, 1)
    outcome.stats["layers"] = {"before": num_layers, "after": len(decoder_layers(model))}
    return outcome


def _from_states(model: PreTrainedModel, calibration: Calibration, settings: DepthSettings) -> DepthOutcome:
    k, windows = settings.remove, calibration.windows
    if settings.method == "sleb":
        hidden, kwargs = capture_block_inputs(model, windows)
        greedy = sleb_greedy(model, hidden, kwargs, windows, k)
        remove_layers(model, greedy.removed)
        stats = {"removal_order": greedy.removed, "calib_nll": greedy.nlls, "rounds": _keyed(greedy.rounds)}
        return DepthOutcome(removed=sorted(greedy.removed), stats=stats)
    states, kwargs = calibration.states, calibration.kwargs
    if states is None:
        states, kwargs = depth_states(model, windows)
    influence = block_influence(states).tolist()
    if settings.method == "shortgpt":
        removed = lowest(torch.tensor(influence), k)
        remove_layers(model, removed)
        return DepthOutcome(removed=removed, stats={"block_influence": influence})
    if settings.method == "angular":
        scores = angular_distance(states, k)
        start = best_window(scores, highest=False)
        removed = check_removal(len(influence), list(range(start, start + k)))
        remove_layers(model, removed)
        return DepthOutcome(removed=removed, stats={"angular_distance": scores.tolist(), "window_start": start})
    config = settings.streamline
    result = streamline(model, states, kwargs, config, windows)
    stats = {
        "window_cosine": result.scores,
        "window_start": result.start,
        "window_layers": result.window,
        "replacement": config.replacement,
        "mse_before": result.mse_before,
        "mse_after": result.mse_after,
        "train_seconds": round(result.train_seconds, 1),
        "losses": result.losses,
        "lm_losses": result.lm_losses,
        "mse_fit": result.mse_fit,
        "block_influence": influence,
    }
    notes = []
    if config.replacement == "ffn":
        notes.append(NOOP_NOTE.format(layers=getattr(model.config, NOOP_KEY)))
    return DepthOutcome(removed=list(range(result.start, result.start + result.window)), stats=stats, notes=notes)


def _wikitext_tracker(
    tokenizer: PreTrainedTokenizerBase, settings: DepthSettings
) -> Callable[[PreTrainedModel], float] | None:
    """WikiText-2 perplexity on the first `track_windows` windows, for TrimLLM's trajectory."""
    if not settings.track_windows:
        return None
    windows = eval_windows(tokenize_joined(load_texts("wikitext2"), tokenizer), settings.seqlen, settings.track_windows)
    return lambda model: math.exp(window_nll(model, windows, desc="wikitext2"))


def _keyed(rounds: list[dict[int, float]]) -> list[dict[str, float]]:
    return [{str(k): v for k, v in r.items()} for r in rounds]


__all__ = ["METHODS", "REPLACEMENTS", "Calibration", "DepthOutcome", "DepthSettings", "prune_depth"]
