"""LLM-Streamline (seed 001): replace the most redundant window of layers by one trained block.

1. Score every window of k+1 consecutive layers by the mean all-token cosine between the hidden
   state entering it and the one leaving it (`criteria.window_cosine`); take the most similar.
2. Replace the window by ONE lightweight block: a decoder layer initialised from the window's first
   layer (a standard checkpoint), or a SwiGLU FFN (pre-norm, residual; exported with a no-op
   attention, see `noop`). Net layers removed: k. `replacement="none"` removes a window of k.
3. Train only the replacement: MSE between its output and the window's output on calibration
   hidden states, run with the model's causal attention (the released code omitted the mask), or
   the LM loss of the whole pruned model with everything else frozen, or both in turn ("mse+lm":
   a cheap MSE fit, then LM-loss epochs). AdamW, cosine lr, seeded.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning.blocks import decoder_layers, run_block
from pruning.depth.criteria import best_window, window_cosine
from pruning.depth.noop import check_ffn_support, ffn_layer, mark_noop_layers
from pruning.depth.states import lm_nll
from pruning.depth.surgery import remove_layers, replace_window
from pruning.depth.train import adamw, cosine_lr, freeze_all_but, optimizer_step

log = logging.getLogger(__name__)

REPLACEMENTS = ("layer", "ffn", "none")
LOSSES = ("mse", "lm", "mse+lm")


@dataclass(frozen=True)
class StreamlineConfig:
    remove: int  # net layers removed: a window of remove+1 layers becomes one block
    replacement: str = "layer"  # layer | ffn | none
    loss: str = "mse"  # mse | lm | mse+lm
    lr: float = 2e-4
    lr_min: float = 5e-5
    weight_decay: float = 1e-3
    epochs: int = 1  # MSE epochs (or LM epochs with loss="lm")
    lm_epochs: int = 1  # LM-loss epochs after the MSE fit, with loss="mse+lm"
    batch_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.remove < 1:
            raise ValueError(f"remove must be at least 1 layer (got {self.remove})")
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, not {self.replacement!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, not {self.loss!r}")
        if not 0 < self.lr_min <= self.lr:
            raise ValueError(f"need 0 < lr_min <= lr (got {self.lr_min}, {self.lr})")
        if min(self.epochs, self.lm_epochs, self.batch_size) < 1:
            raise ValueError("epochs, lm_epochs and batch_size must be at least 1")

    @property
    def window(self) -> int:
        """Layers in the removed window."""
        return self.remove if self.replacement == "none" else self.remove + 1

    def check(self, num_layers: int) -> None:
        if self.window >= num_layers:
            raise ValueError(
                f"removing {self.remove} of {num_layers} layers needs a window of {self.window}; "
                f"at most {num_layers - 1 - (self.replacement != 'none')} can be removed"
            )


@dataclass
class StreamlineResult:
    start: int  # first layer of the replaced window (original numbering)
    window: int
    scores: list[float]  # window cosine per start
    losses: list[float] = field(default_factory=list)  # per MSE training step
    lm_losses: list[float] = field(default_factory=list)  # per LM-loss training step
    mse_fit: float | None = None  # calibration MSE right after the MSE fit
    mse_before: float | None = None  # calibration MSE of the untrained replacement
    mse_after: float | None = None
    train_seconds: float = 0.0


def make_replacement(model: PreTrainedModel, start: int, kind: str) -> nn.Module:
    template = decoder_layers(model)[start]
    return ffn_layer(template, start) if kind == "ffn" else copy.deepcopy(template)


@torch.no_grad()
def window_mse(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict[str, Any]) -> float:
    total = 0.0
    for x, y in zip(inputs, targets, strict=True):
        total += F.mse_loss(run_block(block, x[None], kwargs).float(), y[None].float(), reduction="sum").item()
    return total / targets.numel()


def train_mse(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    config: StreamlineConfig,
) -> list[float]:
    """Fit block(inputs) to targets, both (n, seqlen, hidden); kwargs carry the causal mask setup."""
    block.requires_grad_(True)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(run_block(block, inputs[idx], kwargs).float(), targets[idx].float())

    losses = _train(block, len(inputs), config.epochs, config, "streamline mse", loss_of)
    block.requires_grad_(False)
    return losses


def train_lm(
    model: PreTrainedModel,
    start: int,
    inputs: torch.Tensor,
    windows: torch.Tensor,
    kwargs: dict[str, Any],
    config: StreamlineConfig,
    epochs: int,
) -> list[float]:
    """Train the replacement (layer `start` of the pruned `model`) by the whole model's LM loss on
    the calibration `windows`, everything else frozen.

    The layers below the replacement are frozen and unchanged, so the cached states entering it
    (`inputs`, h_start of the windows) stand in for them: a step runs only the replacement, the
    layers above it and the head. Same loss, without the forward through the layers below.
    """
    block = decoder_layers(model)[start]
    freeze_all_but(model, [block])

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return tail_lm_loss(model, start, inputs[idx], windows[idx], kwargs)

    losses = _train(block, len(windows), epochs, config, "streamline lm", loss_of)
    model.requires_grad_(False)
    return losses


def tail_lm_loss(
    model: PreTrainedModel, start: int, hidden: torch.Tensor, ids: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The LM loss of `model` on `ids`, run from `hidden`, the states entering layer `start`."""
    for layer in decoder_layers(model)[start:]:
        hidden = run_block(layer, hidden, kwargs)
    return lm_nll(model, hidden, ids)


def _train(
    block: nn.Module,
    n: int,
    epochs: int,
    config: StreamlineConfig,
    desc: str,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
) -> list[float]:
    """AdamW on `block` over `epochs` seeded shuffles of n examples, cosine lr; `loss_of(indices)`."""
    opt = adamw(block.parameters(), config.lr, config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    total = -(-n // config.batch_size) * epochs
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, unit="step")
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, config.batch_size):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(len(losses), total, config.lr, config.lr_min)
            losses.append(optimizer_step(opt, loss_of(order[i : i + config.batch_size])))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            bar.update()
    bar.close()
    return losses


def streamline(
    model: PreTrainedModel,
    states: list[torch.Tensor],
    kwargs: dict[str, Any],
    config: StreamlineConfig,
    windows: torch.Tensor | None = None,
) -> StreamlineResult:
    """Prune `model` in place. states: h_0..h_L of the calibration `windows` (see `depth_states`)."""
    num_layers = len(decoder_layers(model))
    config.check(num_layers)
    if config.replacement == "ffn":
        check_ffn_support(model)
    if "lm" in config.loss and config.replacement != "none" and windows is None:
        raise ValueError("the LM loss needs the calibration token windows")
    scores = window_cosine(states, config.window)
    start = best_window(scores, highest=True)
    result = StreamlineResult(start=start, window=config.window, scores=scores.tolist())
    log.info("streamline: window %d .. %d (cosine %.4f)", start, start + config.window - 1, scores[start])
    if config.replacement == "none":
        remove_layers(model, list(range(start, start + config.window)))
        return result
    torch.manual_seed(config.seed)
    block = make_replacement(model, start, config.replacement)
    inputs, targets = states[start], states[start + config.window]
    result.mse_before = window_mse(block, inputs, targets, kwargs)
    began = time.perf_counter()
    if "mse" in config.loss:
        result.losses = train_mse(block, inputs, targets, kwargs, config)
        result.mse_fit = window_mse(block, inputs, targets, kwargs)
    replace_window(model, start, config.window, block)
    if "lm" in config.loss:
        lm_epochs = config.epochs if config.loss == "lm" else config.lm_epochs
        result.lm_losses = train_lm(model, start, inputs, windows, kwargs, config, lm_epochs)
    result.train_seconds = time.perf_counter() - began
    result.mse_after = window_mse(block, inputs, targets, kwargs)
    if config.replacement == "ffn":
        mark_noop_layers(model)
    log.info("streamline: replacement MSE %.5g -> %.5g", result.mse_before, result.mse_after)
    return result
