"""One entry point for every depth method: the model and its inputs in, the pruned model and stats out.

`DepthSettings` holds every knob of the method (validated before any work); `prune_depth` runs it
on the model in place from calibration windows (or their cached states), or for TrimLLM from the
domain's token stream, and returns what goes into the manifest. Reading data is the caller's job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from pruning.blocks import capture_block_inputs, decoder_layers
from pruning.depth.criteria import (
    angular_distance,
    best_window,
    block_influence,
    check_window,
    lowest,
    sleb_greedy,
)
from pruning.depth.distill import TeacherLogits
from pruning.depth.states import depth_states
from pruning.depth.streamline import REPLACEMENTS, StreamlineConfig, streamline
from pruning.depth.surgery import check_removal, remove_layers
from pruning.depth.trimllm import TrimLLMConfig, domain_teacher, trimllm

log = logging.getLogger(__name__)

METHODS = ("streamline", "shortgpt", "angular", "sleb", "trimllm")


@dataclass(frozen=True)
class DepthSettings:
    method: str
    remove: int
    seed: int = 0
    streamline: StreamlineConfig | None = None  # method streamline (default: layer replacement, MSE)
    trimllm: TrimLLMConfig | None = None  # method trimllm

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.remove < 1:
            raise ValueError(f"--remove must be at least 1 (got {self.remove})")
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


@dataclass
class DepthOutcome:
    removed: list[int]  # original indices of layers gone (a replaced window counts all its layers)
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Calibration:
    """Calibration windows and, for the state-based methods, their hidden states h_0 .. h_L."""

    windows: torch.Tensor  # (n, seqlen) token ids
    states: list[torch.Tensor] | None = None
    kwargs: dict[str, Any] | None = None


def prune_depth(
    model: PreTrainedModel,
    settings: DepthSettings,
    calibration: Calibration | None = None,
    domain: torch.Tensor | None = None,
    tracker: Callable[[PreTrainedModel], float] | None = None,
    teacher: PreTrainedModel | TeacherLogits | None = None,
) -> DepthOutcome:
    """Run the configured method on `model` in place.

    Every method but TrimLLM reads `calibration` (windows, and optionally their states h_0 .. h_L
    from this model, so callers can share one pass between methods); TrimLLM reads `domain`, the
    domain text's token ids, and reports `tracker(model)` (e.g. WikiText-2 perplexity) per drop.
    A distilling TrimLLM learns from `teacher`: its cached logits, or a model whose logits to cache
    (default: this model before any layer goes).
    """
    num_layers = len(decoder_layers(model))
    settings.check(num_layers)
    began = time.perf_counter()
    if settings.method == "trimllm":
        if domain is None:
            raise ValueError("trimllm needs the domain text's token ids")
        config = settings.trimllm
        if config.distils and not isinstance(teacher, TeacherLogits):
            teacher = domain_teacher(model if teacher is None else teacher, domain, config)
        result = trimllm(model, domain, config, tracker, teacher if config.distils else None)
        outcome = DepthOutcome(removed=result.removed, stats=result.stats())
        if config.distils:
            outcome.stats["teacher"] = teacher.about
    else:
        if calibration is None:
            raise ValueError(f"{settings.method} needs calibration windows")
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
    return DepthOutcome(removed=list(range(result.start, result.start + result.window)), stats=stats)


def _keyed(rounds: list[dict[int, float]]) -> list[dict[str, float]]:
    return [{str(k): v for k, v in r.items()} for r in rounds]


__all__ = ["METHODS", "REPLACEMENTS", "Calibration", "DepthOutcome", "DepthSettings", "prune_depth"]
