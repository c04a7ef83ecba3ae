"""TrimLLM (Hu, Rosing and Zhang, 2024): progressive layer dropping with sparse-update domain fine-tuning.

1. A calibration scan (Block Influence on held-out domain windows) ranks the layers; only the
   most important `trainable_fraction` of them (plus the final norm and LM head, configurable)
   train, as they are or through LoRA adapters; everything else is frozen.
2. Loop until `remove` layers are gone or the quality floor is hit: heal on domain windows for
   `steps_per_round` steps; then remove each remaining layer in turn, measure the held-out domain
   NLL, and drop the least harmful layer (ties: largest output norm).
Healing (`heal`) is the paper's LM loss, distillation from a teacher's cached next-token
distributions (`pruning.depth.distill`; the teacher is the unpruned model, optionally fine-tuned
on the same text first), or both. Whole layers are dropped, so the result is a standard checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning.blocks import capture_block_inputs, decoder_layers, final_norm
from pruning.depth.criteria import block_influence
from pruning.depth.distill import TeacherLogits, check_teacher_memory, kd_loss, next_token_nll, teacher_top_k
from pruning.depth.states import RemovalScan, depth_states, removal_scan
from pruning.depth.surgery import remove_layers
from pruning.depth.train import adamw, detached_embeddings, freeze_all_but, lm_loss, lora_adapters, optimizer_step

log = logging.getLogger(__name__)

HEALS = ("lm", "kd", "kd+lm")
# Settings left unset are derived from the domain text's size (`TrimLLMConfig.resolved`): a held-out
# slice of 1% of the windows (1 to 4), one pass over the training windows at batch 1 (at most
# MAX_STEPS, about 15 minutes of steps on a 2-core CPU), half of it spread over the drops and half
# after the last, and lr 5e-4 (the best measured on PubMedQA), 2e-4 on under 64 windows, where a
# high lr overfits; LoRA adapters take 4x the lr, as they start from zero.
MAX_STEPS = 320


@dataclass(frozen=True)
class TrimLLMConfig:
    remove: int  # layers to drop (target depth = L - remove)
    heal: str = "lm"  # lm | kd | kd+lm: the loss of the fine-tuning between and after drops (lm measured best)
    trainable_fraction: float = 0.25  # most important layers that train
    train_head: bool = True  # also train the final norm and LM head (only the norm with LoRA)
    steps_per_round: int | None = None  # fine-tuning steps before each drop (None: derived)
    final_steps: int | None = None  # fine-tuning steps after the last drop (None: derived)
    lr: float | None = None  # None: derived
    weight_decay: float = 0.0
    batch_size: int = 1
    seqlen: int = 512
    heldout_windows: int | None = None  # held-out slice for the scan, in windows of seqlen (None: derived)
    quality_floor: float | None = None  # stop before held-out ppl would exceed floor x the start
    kd_top_k: int = 64  # teacher log-probabilities kept per token
    kd_weight: float = 0.5  # kd+lm: loss = kd_weight * KD + (1 - kd_weight) * LM
    teacher_finetune_steps: int = 0  # LM steps on the domain for the teacher before its logits are cached
    lora_rank: int = 0  # 0: the trainable layers' weights train; r: LoRA adapters of rank r, merged at the end
    lora_alpha: float | None = None  # LoRA scale numerator (None: 2 x rank)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.remove < 1:
            raise ValueError(f"remove must be at least 1 layer (got {self.remove})")
        if self.heal not in HEALS:
            raise ValueError(f"heal must be one of {HEALS}, not {self.heal!r}")
        if not 0 < self.trainable_fraction <= 1:
            raise ValueError(f"trainable_fraction must be in (0, 1] (got {self.trainable_fraction})")
        counts = (self.steps_per_round, self.final_steps, self.teacher_finetune_steps, self.lora_rank)
        if min(c for c in counts if c is not None) < 0 or self.batch_size < 1 or (self.heldout_windows or 1) < 1:
            raise ValueError("steps and lora_rank must be >= 0, batch_size and heldout_windows >= 1")
        if self.seqlen < 2 or (self.lr is not None and self.lr <= 0):
            raise ValueError("seqlen must be at least 2 and lr positive")
        if self.quality_floor is not None and self.quality_floor <= 1:
            raise ValueError(f"quality_floor is a ppl ratio above 1 (got {self.quality_floor})")
        if self.kd_top_k < 1 or not 0 <= self.kd_weight <= 1:
            raise ValueError(f"kd_top_k must be >= 1 and kd_weight in [0, 1] (got {self.kd_top_k}, {self.kd_weight})")
        if self.teacher_finetune_steps and not self.distils:
            raise ValueError("teacher_finetune_steps needs a teacher: heal kd or kd+lm")

    @property
    def distils(self) -> bool:
        return self.heal != "lm"

    def check(self, num_layers: int) -> None:
        if self.remove >= num_layers:
            raise ValueError(f"cannot remove {self.remove} of {num_layers} layers: at least one must remain")

    def resolved(self, tokens: int) -> TrimLLMConfig:
        """This config with every unset setting derived from a domain text of `tokens` tokens."""
        windows = tokens // self.seqlen
        heldout = self.heldout_windows or min(4, max(1, windows // 100))
        train_windows = max(windows - heldout, 1)
        budget = min(MAX_STEPS, max(4 * self.remove, train_windows // self.batch_size))
        per_round = self.steps_per_round if self.steps_per_round is not None else max(1, budget // (2 * self.remove))
        final = self.final_steps if self.final_steps is not None else max(0, budget - per_round * self.remove)
        lr = self.lr or (5e-4 if train_windows >= 64 else 2e-4) * (4 if self.lora_rank else 1)
        return dataclasses.replace(self, heldout_windows=heldout, steps_per_round=per_round, final_steps=final, lr=lr)


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
    config: TrimLLMConfig  # as run, with the derived settings filled in
    trajectory: list[DropStep] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    stopped: str = ""
    losses: list[float] = field(default_factory=list)  # every healing step's loss, in order

    def stats(self) -> dict:
        return {
            "trainable_layers": self.trainable_layers,
            "importance_block_influence": self.importance,
            "removed": self.removed,
            "stopped": self.stopped,
            "training": asdict(self.config),
            "losses": self.losses,
            "trajectory": [asdict(s) for s in self.trajectory],
        }


def split_domain(stream: torch.Tensor, config: TrimLLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows (n, seqlen), held-out windows (heldout_windows, seqlen)); held-out is the tail.

    The training windows are fixed, so a teacher's logits for them can be computed once."""
    config = config.resolved(stream.numel())  # settings given stay as they are
    held = config.heldout_windows * config.seqlen
    if stream.numel() < held + config.seqlen:
        raise ValueError(
            f"domain text has {stream.numel()} tokens; it needs at least {held + config.seqlen} "
            f"({config.heldout_windows} held-out windows of {config.seqlen} plus one training window)"
        )
    train = stream[:-held]
    count = train.numel() // config.seqlen
    return train[: count * config.seqlen].view(count, config.seqlen), stream[-held:].view(-1, config.seqlen)


def window_batches(count: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of training windows, batch by batch, each pass over them in a new seeded order."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(count, generator=gen)])
        yield order[:batch_size]
        order = order[batch_size:]


def most_important(importance: torch.Tensor, config: TrimLLMConfig) -> list[int]:
    """Original indices of the most important layers (highest Block Influence)."""
    count = max(1, round(config.trainable_fraction * len(importance)))
    return sorted(torch.argsort(importance, descending=True, stable=True)[:count].tolist())


@dataclass
class DomainTraining:
    """TrimLLM's sparse-update fine-tuning set up on a model: data, trainable layers, optimizer."""

    config: TrimLLMConfig  # resolved
    windows: torch.Tensor  # (n, seqlen) training windows
    heldout: torch.Tensor  # (heldout_windows, seqlen)
    importance: torch.Tensor  # Block Influence per layer, on the held-out windows
    trainable: list[int]
    opt: torch.optim.Optimizer
    batches: Iterator[torch.Tensor]
    teacher: TeacherLogits | None
    adapters: object | None  # the peft model holding LoRA adapters, merged by `finish`


def prepare_training(
    model: PreTrainedModel, stream: torch.Tensor, config: TrimLLMConfig, teacher: TeacherLogits | None = None
) -> DomainTraining:
    """Split the domain text, rank layers on the held-out slice, freeze all but the most important
    `trainable_fraction` (plus the head unless told not to), or give them LoRA adapters, and make
    the optimizer. `teacher`: cached logits of these training windows (heal kd, kd+lm)."""
    config = config.resolved(stream.numel())
    windows, heldout = split_domain(stream, config)
    if config.distils and (teacher is None or teacher.indices.shape[:2] != windows.shape):
        raise ValueError(f"heal {config.heal} needs the teacher's logits for the {len(windows)} training windows")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    states, _ = depth_states(model, heldout)
    importance = block_influence(states)
    del states
    trainable = most_important(importance, config)
    layers = [decoder_layers(model)[i] for i in trainable]
    adapters = None
    if config.lora_rank:
        adapters = lora_adapters(model, layers, config.lora_rank, config.lora_alpha or 2 * config.lora_rank)
        final_norm(model).requires_grad_(config.train_head)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        extra = [final_norm(model), model.get_output_embeddings()] if config.train_head else []
        count = freeze_all_but(model, layers + extra)
    log.info(
        "trimllm: training layers %s (+head: %s, LoRA rank %d), %d parameters",
        trainable,
        config.train_head,
        config.lora_rank,
        count,
    )
    opt = adamw(model.parameters(), config.lr, config.weight_decay)
    batches = window_batches(len(windows), config.batch_size, gen)
    return DomainTraining(config, windows, heldout, importance, trainable, opt, batches, teacher, adapters)


def heal_loss(model: PreTrainedModel, training: DomainTraining, idx: torch.Tensor) -> torch.Tensor:
    """The configured healing loss on training windows `idx`."""
    config, batch = training.config, training.windows[idx].to(model.device)
    if config.heal == "lm":
        return lm_loss(model, batch)
    logits = model(batch, use_cache=False).logits
    kd = kd_loss(logits, training.teacher, idx)
    if config.heal == "kd":
        return kd
    return config.kd_weight * kd + (1 - config.kd_weight) * next_token_nll(logits, batch)


def fine_tune(model: PreTrainedModel, training: DomainTraining, steps: int, desc: str) -> list[float]:
    """`steps` healing steps on the training windows (frozen parts stay frozen)."""
    losses = []
    if steps == 0:
        return losses
    model.train()
    with detached_embeddings(model):
        bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
        for _ in bar:
            losses.append(optimizer_step(training.opt, heal_loss(model, training, next(training.batches))))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    model.eval()
    return losses


def finish(model: PreTrainedModel, training: DomainTraining) -> None:
    """Merge LoRA adapters into the weights and freeze the model."""
    if training.adapters is not None:
        training.adapters.merge_and_unload()
    model.requires_grad_(False)


def domain_fine_tune(
    model: PreTrainedModel,
    stream: torch.Tensor,
    config: TrimLLMConfig,
    steps: int,
    teacher: TeacherLogits | None = None,
) -> list[float]:
    """The model healed exactly as TrimLLM heals between drops, `steps` steps, no layer dropped
    (the baseline that tells what the drops cost, and the teacher's own fine-tuning)."""
    training = prepare_training(model, stream, config, teacher)
    losses = fine_tune(model, training, steps, "domain ft")
    finish(model, training)
    return losses


def domain_teacher(teacher: PreTrainedModel, stream: torch.Tensor, config: TrimLLMConfig) -> TeacherLogits:
    """The teacher's cached top-k logits for the training windows: a copy of `teacher` (the
    unpruned model, or another with the same tokenizer) fine-tuned with the LM loss for
    `teacher_finetune_steps` steps when set, then run once over the windows."""
    # The teacher trains its layers themselves, at the lr derived (or given) for that.
    tuning = dataclasses.replace(config, heal="lm", lora_rank=0, teacher_finetune_steps=0).resolved(stream.numel())
    config = config.resolved(stream.numel())
    windows, _ = split_domain(stream, config)
    check_teacher_memory(len(windows), config.seqlen, config.kd_top_k)
    began = time.perf_counter()
    about: dict = {"top_k": config.kd_top_k, "finetune_steps": config.teacher_finetune_steps, "lr": tuning.lr}
    if config.teacher_finetune_steps:
        teacher = copy.deepcopy(teacher)
        losses = domain_fine_tune(teacher, stream, tuning, config.teacher_finetune_steps)
        about |= {"finetune_loss_last10": sum(losses[-10:]) / len(losses[-10:])}
        about["finetune_seconds"] = round(time.perf_counter() - began, 1)
    logits = teacher_top_k(teacher, windows, config.kd_top_k)
    about |= {"mass": round(logits.mass, 4), "cache_bytes": logits.nbytes}
    about["seconds"] = round(time.perf_counter() - began, 1)
    log.info("trimllm teacher: %s", about)
    return dataclasses.replace(logits, about=about)


def trimllm(
    model: PreTrainedModel,
    stream: torch.Tensor,
    config: TrimLLMConfig,
    tracker: Callable[[PreTrainedModel], float] | None = None,
    teacher: TeacherLogits | None = None,
) -> TrimLLMResult:
    """Drop `config.remove` layers of `model` in place; `stream` is the domain text's token ids.

    Distilling heals need `teacher`, the cached logits of the training windows (`domain_teacher`,
    run on the unpruned model before this)."""
    num_layers = len(decoder_layers(model))
    config.check(num_layers)
    began = time.perf_counter()
    training = prepare_training(model, stream, config, teacher)
    config, heldout = training.config, training.heldout
    log.info(
        "trimllm: %d domain tokens: %d training windows of %d, %d held out; heal %s, %d steps per drop + %d "
        "after the last, lr %g (settings not given are derived from the text's size)",
        stream.numel(),
        len(training.windows),
        config.seqlen,
        config.heldout_windows,
        config.heal,
        config.steps_per_round,
        config.final_steps,
        config.lr,
    )
    result = TrimLLMResult(trainable_layers=training.trainable, importance=training.importance.tolist(), config=config)
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
        result.losses += fine_tune(model, training, config.steps_per_round, f"trimllm heal {round_ + 1}")
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
        result.losses += fine_tune(model, training, config.final_steps, "trimllm final heal")
        record(None, scan(model, heldout).full)
    finish(model, training)
    return result


@torch.no_grad()
def scan(model: PreTrainedModel, heldout: torch.Tensor, with_candidates: bool = False) -> RemovalScan:
    """Held-out NLL of the current model and, optionally, of it without each layer in turn."""
    hidden, kwargs = capture_block_inputs(model, heldout)
    layers = list(decoder_layers(model))
    return removal_scan(model, layers, hidden, kwargs, heldout, list(range(len(layers))) if with_candidates else [])
