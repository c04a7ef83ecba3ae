"""LLM-Streamline (Chen et al., 2024): replace the most redundant window of layers by one trained block.

1. Score every window of k+1 consecutive layers by the mean all-token cosine between the hidden
   state entering it and the one leaving it (`criteria.window_cosine`); take the most similar.
2. Replace the window by ONE lightweight block: a decoder layer initialised from the window's first
   layer (a standard checkpoint), or a SwiGLU FFN (pre-norm, residual; exported with a no-op
   attention, see `noop`). Net layers removed: k. `replacement="none"` removes a window of k.
3. Train only the replacement: MSE between its output and the window's output on calibration
   hidden states, run with the model's causal attention (the released code omitted the mask), or
   the LM loss of the whole pruned model with everything else frozen, or both in turn ("mse+lm":
   a cheap MSE fit, then LM-loss epochs). AdamW, cosine lr, seeded.
   Our addition, "kd"/"mse+kd": instead of the LM loss on the calibration tokens, distil the
   unpruned model's next-token distributions (KL divergence). The teacher's final states are
   already cached (h_L), so the teacher costs one head forward per step, and every vocabulary
   entry carries signal instead of one target token.
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

from pruning.blocks import decoder_layers, run_block, run_layers
from pruning.depth.criteria import best_window, window_cosine
from pruning.depth.ffn import check_ffn_support, ffn_layer
from pruning.depth.states import lm_nll, next_token_logits
from pruning.depth.surgery import remove_layers, replace_window
from pruning.depth.train import adamw, cosine_lr, freeze_all_but, optimizer_step

log = logging.getLogger(__name__)

REPLACEMENTS = ("layer", "ffn", "none")
LOSSES = ("mse", "lm", "kd", "mse+lm", "mse+kd")


@dataclass(frozen=True)
class StreamlineConfig:
    remove: int  # net layers removed: a window of remove+1 layers becomes one block
    replacement: str = "layer"  # layer | ffn | none
    loss: str = "mse"  # mse | lm | kd | mse+lm | mse+kd
    lr: float = 2e-4
    lr_min: float = 5e-5
    weight_decay: float = 1e-3
    epochs: int = 1  # MSE epochs (or LM/KD epochs with loss="lm"/"kd")
    lm_epochs: int = 1  # LM-loss or KD epochs after the MSE fit, with loss="mse+lm"/"mse+kd"
    batch_size: int = 1
    bf16_autocast: bool = False  # mixed precision: bf16 matmuls, fp32 weights and optimizer
    # KD: share of positions (seeded random, per step) whose distributions are distilled; the
    # layers still run every token, but the head (49k-entry softmaxes) runs only on these
    kd_token_fraction: float = 1.0
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
        if not 0 < self.kd_token_fraction <= 1:
            raise ValueError(f"kd_token_fraction must be in (0, 1] (got {self.kd_token_fraction})")
        if self.kd_token_fraction < 1 and self.tail_loss != "kd":
            raise ValueError(f"kd_token_fraction applies to the kd losses only (loss is {self.loss!r})")
        if min(self.epochs, self.lm_epochs, self.batch_size) < 1:
            raise ValueError("epochs, lm_epochs and batch_size must be at least 1")

    @property
    def fits_mse(self) -> bool:
        """Whether training starts with the MSE fit of the window's output."""
        return self.loss.startswith("mse")

    @property
    def tail_loss(self) -> str | None:
        """The loss trained through the layers above the replacement: "lm", "kd" or None (MSE only)."""
        return None if self.loss == "mse" else self.loss.rpartition("+")[2]

    @property
    def tail_epochs(self) -> int:
        return self.lm_epochs if self.fits_mse else self.epochs

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
    lm_losses: list[float] = field(default_factory=list)  # per LM-loss (or KD) training step
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


def train_tail(
    model: PreTrainedModel,
    start: int,
    inputs: torch.Tensor,
    windows: torch.Tensor | None,
    kwargs: dict[str, Any],
    config: StreamlineConfig,
    epochs: int,
    teacher: torch.Tensor | None = None,
) -> list[float]:
    """Train the replacement (layer `start` of the pruned `model`) through the layers above it and
    the head, everything else frozen: by the whole model's LM loss on the calibration `windows`,
    or, given `teacher` (the unpruned model's final states h_L of the same windows), by the KL
    divergence from its next-token distributions.

    The layers below the replacement are frozen and unchanged, so the cached states entering it
    (`inputs`, h_start of the windows) stand in for them: a step runs only the replacement, the
    layers above it and the head. Same loss, without the forward through the layers below.
    """
    block = decoder_layers(model)[start]
    freeze_all_but(model, [block])
    seqlen = inputs.shape[1]
    scored = max(1, round(config.kd_token_fraction * seqlen))
    gen = torch.Generator().manual_seed(config.seed + 1)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            return tail_lm_loss(model, start, inputs[idx], windows[idx], kwargs)
        positions = torch.randperm(seqlen, generator=gen)[:scored] if scored < seqlen else None
        return tail_kd_loss(model, start, inputs[idx], teacher[idx], kwargs, positions)

    desc = "streamline lm" if teacher is None else "streamline kd"
    losses = _train(block, len(inputs), epochs, config, desc, loss_of)
    model.requires_grad_(False)
    return losses


def tail_lm_loss(
    model: PreTrainedModel, start: int, hidden: torch.Tensor, ids: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The LM loss of `model` on `ids`, run from `hidden`, the states entering layer `start`."""
    return lm_nll(model, run_layers(decoder_layers(model)[start:], hidden, kwargs, batch_size=None), ids)


def tail_kd_loss(
    model: PreTrainedModel,
    start: int,
    hidden: torch.Tensor,
    teacher: torch.Tensor,
    kwargs: dict[str, Any],
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-token KL(teacher || model) of the next-token distributions, run from `hidden`, the
    states entering layer `start`; `teacher`: the unpruned model's final states (before the norm).
    `positions`: score only these sequence positions (all by default)."""
    final = run_layers(decoder_layers(model)[start:], hidden, kwargs, batch_size=None)
    if positions is not None:
        final, teacher = final[:, positions], teacher[:, positions]
    with torch.no_grad():
        target = F.log_softmax(next_token_logits(model, teacher), dim=-1)
    student = F.log_softmax(next_token_logits(model, final), dim=-1)
    return F.kl_div(student.flatten(0, -2), target.flatten(0, -2), log_target=True, reduction="batchmean")


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
    device = next(block.parameters()).device.type
    gen = torch.Generator().manual_seed(config.seed)
    total = -(-n // config.batch_size) * epochs
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, unit="step")
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, config.batch_size):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(len(losses), total, config.lr, config.lr_min)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=config.bf16_autocast):
                loss = loss_of(order[i : i + config.batch_size])
            losses.append(optimizer_step(opt, loss))
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
    if config.tail_loss == "lm" and config.replacement != "none" and windows is None:
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
    if config.fits_mse:
        result.losses = train_mse(block, inputs, targets, kwargs, config)
        result.mse_fit = window_mse(block, inputs, targets, kwargs)
    replace_window(model, start, config.window, block)
    if config.tail_loss:
        teacher = states[num_layers] if config.tail_loss == "kd" else None
        result.lm_losses = train_tail(model, start, inputs, windows, kwargs, config, config.tail_epochs, teacher)
    result.train_seconds = time.perf_counter() - began
    result.mse_after = window_mse(block, inputs, targets, kwargs)
    log.info("streamline: replacement MSE %.5g -> %.5g", result.mse_before, result.mse_after)
    return result
