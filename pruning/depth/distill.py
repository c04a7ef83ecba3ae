"""Distillation from cached teacher logits, for healing a depth-pruned model on domain text.

The teacher (the unpruned model, possibly fine-tuned on the domain first) runs once over the fixed
training windows; its top-k next-token log-probabilities are kept and every training step reads
them instead of running the teacher again. Full logits would not fit: PubMedQA's 300 training
windows of 512 tokens at a 49,152-token vocabulary are 7.7e9 values (15 GB in bf16). The top 64
cost 8 bytes a kept value (fp32 log-probability + int32 token id), 76 MiB for the same windows,
and on the default model hold 90% of the teacher's probability mass per token (89.7% measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

BYTES_PER_KEPT = 8  # fp32 log-probability + int32 token id


@dataclass(frozen=True)
class TeacherLogits:
    """The teacher's top-k next-token log-probabilities at every position of every training window."""

    logprobs: torch.Tensor  # (windows, seqlen, k) float32, unnormalised over the k kept tokens
    indices: torch.Tensor  # (windows, seqlen, k) int32 token ids
    mass: float  # mean probability mass the k kept tokens hold
    about: dict = field(default_factory=dict)  # how the teacher was made, for the manifest

    @property
    def nbytes(self) -> int:
        return self.logprobs.nbytes + self.indices.nbytes


def teacher_cache_bytes(windows: int, seqlen: int, top_k: int) -> int:
    return windows * seqlen * top_k * BYTES_PER_KEPT


def check_teacher_memory(windows: int, seqlen: int, top_k: int, available: int | None = None) -> int:
    """The cache's size in bytes; ValueError when it would take more than half the available memory
    (the training itself needs the rest)."""
    need = teacher_cache_bytes(windows, seqlen, top_k)
    available = psutil.virtual_memory().available if available is None else available
    if need > available // 2:
        raise ValueError(
            f"--heal kd caches the teacher's top-{top_k} logits for {windows} windows of {seqlen} tokens: "
            f"{need / 2**20:,.0f} MiB, more than half of the {available / 2**20:,.0f} MiB available; "
            "lower --kd-top-k or use less domain text"
        )
    return need


@torch.no_grad()
def teacher_top_k(teacher: PreTrainedModel, windows: torch.Tensor, top_k: int, batch_size: int = 4) -> TeacherLogits:
    """Run `teacher` over `windows` (n, seqlen) once and keep its top-k next-token log-probabilities."""
    teacher.eval()
    n, seqlen = windows.shape
    logprobs = torch.empty(n, seqlen, top_k, dtype=torch.float32)
    indices = torch.empty(n, seqlen, top_k, dtype=torch.int32)
    mass = 0.0
    device = next(teacher.parameters()).device
    for i in tqdm(range(0, n, batch_size), desc="teacher logits", unit="batch", leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = teacher(batch, use_cache=False).logits.float()
        top = logits.topk(top_k, dim=-1)  # on the logits: no full log-softmax is materialised
        values = top.values - logits.logsumexp(-1, keepdim=True)
        logprobs[i : i + len(batch)] = values.cpu()
        indices[i : i + len(batch)] = top.indices.int().cpu()
        mass += values.exp().sum().item()
    return TeacherLogits(logprobs, indices, mass / (n * seqlen))


def kd_loss(student_logits: torch.Tensor, teacher: TeacherLogits, idx: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the teacher's top-k tokens plus one bucket for all
    the others, on windows `idx`.

    The bucket keeps the teacher's leftover mass (about 10% at k = 64) as a target: renormalising
    the top k instead would teach the student to push every other token towards zero, and the
    true next token is one of those others often enough to cost more perplexity than the
    distillation gains (measured: the full model healed that way got worse on its domain).
    """
    target = teacher.logprobs[idx].to(student_logits.device)
    tokens = teacher.indices[idx].to(student_logits.device).long()
    student = F.log_softmax(student_logits.float(), dim=-1).gather(-1, tokens)
    kept = (target.exp() * (target - student)).sum(-1)
    rest_t = (1 - target.exp().sum(-1)).clamp_min(0)
    log_rest_s = torch.log((-torch.expm1(student.logsumexp(-1))).clamp_min(1e-12))
    rest = rest_t * (torch.log(rest_t.clamp_min(1e-12)) - log_rest_s)
    return (kept + rest).mean()


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `ids` (batch, seqlen) under `logits` (batch, seqlen, vocab)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
