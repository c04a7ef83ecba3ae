"""Training helpers shared by the depth methods: cosine schedule, AdamW, freezing, LoRA, LM steps."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """Cosine decay from lr (step 0) to lr_min (last step)."""
    if total <= 1:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * step / (total - 1)))


def adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def freeze_all_but(model: nn.Module, trainable: Iterable[nn.Module]) -> int:
    """requires_grad only for the parameters of `trainable`; returns how many parameters train."""
    model.requires_grad_(False)
    count, seen = 0, set()
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
    return count


def lora_adapters(model: PreTrainedModel, modules: list[nn.Module], rank: int, alpha: float) -> PeftModel:
    """LoRA adapters (peft) of `rank` on every linear inside `modules`; everything else frozen.

    The model is changed in place and stays usable as it is; the returned peft model's
    `merge_and_unload()` folds the adapters into the weights, leaving a plain checkpoint."""
    inside = {id(m) for module in modules for m in module.modules()}
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]
    if not targets:
        raise ValueError("LoRA found no linear layer to adapt in the trainable layers")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    with warnings.catch_warnings():  # peft 0.21 calls `is_gradient_checkpointing`, deprecated in transformers 5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


@contextlib.contextmanager
def detached_embeddings(model: PreTrainedModel) -> Iterator[None]:
    """Stop gradients at the input embeddings' output, so tied embeddings train only through the
    LM head and backward stops at the lowest trainable layer instead of running to the input."""
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.detach())
    try:
        yield
    finally:
        handle.remove()


def lm_loss(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, seqlen) window batch."""
    return model(batch, labels=batch, use_cache=False).loss


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One gradient step on `loss`; returns its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()
