"""TrimLLM (Hu, Rosing and Zhang, 2024): progressive layer dropping with sparse-update domain fine-tuning.

1. A calibration scan (Block Influence on held-out domain windows) ranks the layers; only the
   most important `trainable_fraction` of them (plus the final norm and LM head, configurable)
   train; everything else is frozen.
2. Loop until `remove` layers are gone or the quality floor is hit: fine-tune on domain windows
   with the LM loss for `steps_per_round` steps; then remove each remaining layer in turn, measure
   the held-out domain NLL, and drop the least harmful layer (ties: largest output norm).
Whole layers are dropped, so the result is a standard checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning.blocks import capture_block_inputs, decoder_layers, final_norm
from pruning.depth.criteria import block_influence
from pruning.depth.states import RemovalScan, depth_states, removal_scan
from pruning.depth.surgery import remove_layers
from pruning.depth.train import adamw, detached_embeddings, freeze_all_but, lm_loss, optimizer_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrimLLMConfig:
    remove: int  # layers to drop (target depth = L - remove)
    trainable_fraction: float = 0.25  # most important layers that train
    train_head: bool = True  # also train the final norm and LM head
    steps_per_round: int = 10  # fine-tuning steps before each drop
    final_steps: int = 0  # fine-tuning steps after the last drop
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 1
    seqlen: int = 512
    heldout_windows: int = 2  # held-out calibration slice for the scan (windows of seqlen)
    quality_floor: float | None = None  # stop before held-out ppl would exceed floor x the start
    seed: int = 0

    def __post_init__(self) -> None:
        if self.remove < 1:
            raise ValueError(f"remove must be at least 1 layer (got {self.remove})")
        if not 0 < self.trainable_fraction <= 1:
            raise ValueError(f"trainable_fraction must be in (0, 1] (got {self.trainable_fraction})")
        if min(self.steps_per_round, self.final_steps) < 0 or self.batch_size < 1 or self.heldout_windows < 1:
            raise ValueError("steps must be >= 0, batch_size and heldout_windows >= 1")
        if self.seqlen < 2 or self.lr <= 0:
            raise ValueError("seqlen must be at least 2 and lr positive")
        if self.quality_floor is not None and self.quality_floor <= 1:
            raise ValueError(f"quality_floor is a ppl ratio above 1 (got {self.quality_floor})")

    def check(self, num_layers: int) -> None:
        if self.remove >= num_layers:
            raise ValueError(f"cannot remove {self.remove} of {num_layers} layers: at least one must remain")


@dataclass
class DropStep:
    step: int
    dropped: int | None  # original layer index (None: the starting point)
    layers: int
    heldout_ppl: float  # domain perplexity on the held-out slice after this step
    tracked_ppl: float | None  # e.g. WikiText-2, when a tracker is given
    seconds: float  # since the start


@dataclass
class TrimLLMResult:
    trainable_layers: list[int]
    importance: list[float]  # Block Influence per original layer
    trajectory: list[DropStep] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    stopped: str = ""

    def stats(self) -> dict:
        return {
            "trainable_layers": self.trainable_layers,
            "importance_block_influence": self.importance,
            "removed": self.removed,
            "stopped": self.stopped,
            "trajectory": [asdict(s) for s in self.trajectory],
        }


def split_domain(stream: torch.Tensor, config: TrimLLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train token stream, held-out windows (heldout_windows, seqlen)); held-out is the tail."""
    held = config.heldout_windows * config.seqlen
    if stream.numel() < held + config.seqlen + 1:
        raise ValueError(
            f"domain text has {stream.numel()} tokens; it needs at least {held + config.seqlen + 1} "
            f"({config.heldout_windows} held-out windows of {config.seqlen} plus one training window)"
        )
    return stream[:-held], stream[-held:].view(config.heldout_windows, config.seqlen)


def sample_batch(stream: torch.Tensor, config: TrimLLMConfig, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - config.seqlen, (config.batch_size,), generator=gen)
    return torch.stack([stream[s : s + config.seqlen] for s in starts.tolist()])


def most_important(importance: torch.Tensor, config: TrimLLMConfig) -> list[int]:
    """Original indices of the most important layers (highest Block Influence)."""
    count = max(1, round(config.trainable_fraction * len(importance)))
    return sorted(torch.argsort(importance, descending=True, stable=True)[:count].tolist())


def fine_tune(
    model: PreTrainedModel,
    opt: torch.optim.Optimizer,
    stream: torch.Tensor,
    steps: int,
    config: TrimLLMConfig,
    gen: torch.Generator,
    desc: str,
) -> list[float]:
    """`steps` LM-loss steps on random windows of the training stream (frozen parts stay frozen)."""
    losses = []
    if steps == 0:
        return losses
    model.train()
    with detached_embeddings(model):
        bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
        for _ in bar:
            loss = lm_loss(model, sample_batch(stream, config, gen).to(model.device))
            losses.append(optimizer_step(opt, loss))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    model.eval()
    return losses


@dataclass
class DomainTraining:
    """TrimLLM's sparse-update fine-tuning set up on a model: data split, trainable layers, optimizer."""

    train: torch.Tensor  # token stream to sample training windows from
    heldout: torch.Tensor  # (heldout_windows, seqlen)
    importance: torch.Tensor  # Block Influence per layer, on the held-out windows
    trainable: list[int]
    opt: torch.optim.Optimizer
    gen: torch.Generator


def prepare_training(model: PreTrainedModel, stream: torch.Tensor, config: TrimLLMConfig) -> DomainTraining:
    """Split the domain text, rank layers on the held-out slice, freeze all but the most important
    `trainable_fraction` (plus the head unless told not to), and make the optimizer."""
    train_stream, heldout = split_domain(stream, config)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    states, _ = depth_states(model, heldout)
    importance = block_influence(states)
    del states
    trainable = most_important(importance, config)
    layers = list(decoder_layers(model))
    modules = [layers[i] for i in trainable]
    if config.train_head:
        modules += [final_norm(model), model.get_output_embeddings()]
    count = freeze_all_but(model, modules)
    log.info("trimllm: training layers %s (+head: %s), %d parameters", trainable, config.train_head, count)
    opt = adamw(model.parameters(), config.lr, config.weight_decay)
    return DomainTraining(train_stream, heldout, importance, trainable, opt, gen)


def domain_fine_tune(model: PreTrainedModel, stream: torch.Tensor, config: TrimLLMConfig, steps: int) -> list[float]:
    """The model fine-tuned exactly as TrimLLM fine-tunes between drops, `steps` steps, no layer dropped
    (the baseline that tells what the drops cost)."""
    training = prepare_training(model, stream, config)
    losses = fine_tune(model, training.opt, training.train, steps, config, training.gen, "domain ft")
    model.requires_grad_(False)
    return losses


def trimllm(
    model: PreTrainedModel,
    stream: torch.Tensor,
    config: TrimLLMConfig,
    tracker: Callable[[PreTrainedModel], float] | None = None,
) -> TrimLLMResult:
    """Drop `config.remove` layers of `model` in place; `stream` is the domain text's token ids."""
    num_layers = len(decoder_layers(model))
    config.check(num_layers)
    began = time.perf_counter()
    training = prepare_training(model, stream, config)
    train_stream, heldout, opt, gen = training.train, training.heldout, training.opt, training.gen
    result = TrimLLMResult(trainable_layers=training.trainable, importance=training.importance.tolist())
    original = list(range(num_layers))  # original index of each current layer

    def record(dropped: int | None, nll: float) -> None:
        tracked = tracker(model) if tracker else None
        seconds = time.perf_counter() - began
        step = DropStep(len(result.trajectory), dropped, len(original), math.exp(nll), tracked, seconds)
        result.trajectory.append(step)
        log.info("trimllm: %s", step)

    start_nll = scan(model, heldout).full
    record(None, start_nll)
    for round_ in range(config.remove):
        fine_tune(model, opt, train_stream, config.steps_per_round, config, gen, f"trimllm ft {round_ + 1}")
        scores = scan(model, heldout, with_candidates=True)
        best = min(scores.nll, key=lambda p: (round(scores.nll[p], 6), -scores.norm[p]))
        if config.quality_floor and math.exp(scores.nll[best] - start_nll) > config.quality_floor:
            result.stopped = f"quality floor: dropping another layer would exceed {config.quality_floor}x"
            break
        dropped = original.pop(best)
        remove_layers(model, [best])
        result.removed.append(dropped)
        record(dropped, scores.nll[best])
    else:
        result.stopped = f"target depth {num_layers - config.remove} reached"
    if config.final_steps:
        fine_tune(model, opt, train_stream, config.final_steps, config, gen, "trimllm final ft")
        record(None, scan(model, heldout).full)
    model.requires_grad_(False)
    return result


@torch.no_grad()
def scan(model: PreTrainedModel, heldout: torch.Tensor, with_candidates: bool = False) -> RemovalScan:
    """Held-out NLL of the current model and, optionally, of it without each layer in turn."""
    hidden, kwargs = capture_block_inputs(model, heldout)
    layers = list(decoder_layers(model))
    return removal_scan(model, layers, hidden, kwargs, heldout, list(range(len(layers))) if with_candidates else [])
