"""Perplexity and multiple-choice accuracy.

Perplexity follows the protocol of the pruning papers: the text is tokenised once, cut into
non-overlapping windows of `seqlen` tokens (remainder dropped), each window scored alone, and
ppl = exp(mean token NLL over all windows). Multiple choice follows lm-eval-harness: each
option is scored by the sum of its token log-probabilities after the prompt; `acc` takes the
argmax, `acc_norm` the argmax after dividing by the option's length in characters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evaluation.data import eval_windows, load_texts, tokenize_joined
from evaluation.questions import MCQuestion, load_mc


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def window_nll(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl") -> float:
    """Mean next-token NLL over (n, seqlen) windows, each scored without outside context."""
    device = _device(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="win", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return total / count


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    desc: str = "ppl",
) -> float:
    """Perplexity of documents joined into one stream (see module docstring)."""
    windows = eval_windows(tokenize_joined(texts, tokenizer), seqlen, max_windows)
    return math.exp(window_nll(model, windows, batch_size, desc))


def source_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> float:
    """Perplexity of a named source (`wikitext2`, `c4`, ...) or a local text file."""
    return perplexity(model, tokenizer, load_texts(source), seqlen, max_windows, batch_size, desc=f"ppl {source}")


@torch.no_grad()
def option_logprobs(model: PreTrainedModel, prompt_ids: list[int], options: list[list[int]]) -> list[float]:
    """Sum of log p(option tokens | prompt) for each option."""
    device = _device(model)
    if all(len(o) == 1 for o in options):
        # One forward of the prompt gives every single-token option (lettered answers, yes/no).
        # logits_to_keep=1 skips the LM head on every other position (a fifth of the FLOPs here).
        out = model(torch.tensor([prompt_ids], device=device), use_cache=False, logits_to_keep=1)
        logits = out.logits[0, -1].float()
        logp = logits.log_softmax(-1)
        return [logp[o[0]].item() for o in options]
    seqs = [prompt_ids + o for o in options]
    width = max(map(len, seqs))
    pad = 0
    batch = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logp = model(batch, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
    scores = []
    for row, option in enumerate(options):
        start = len(prompt_ids)
        positions = torch.arange(start - 1, start - 1 + len(option), device=device)
        target = torch.tensor(option, device=device)
        scores.append(logp[row, positions, target].sum().item())
    return scores


def mc_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[MCQuestion], desc: str = "mc"
) -> dict[str, float]:
    """acc and acc_norm over a list of questions."""
    correct = correct_norm = 0
    for q in tqdm(questions, desc=desc, unit="q", leave=False):
        prompt_ids = tokenizer(q.prompt).input_ids
        # Tokenise prompt+option together and split, so merges across the boundary match scoring.
        options = [tokenizer(q.prompt + c).input_ids[len(prompt_ids) :] or tokenizer(c).input_ids for c in q.choices]
        scores = option_logprobs(model, prompt_ids, options)
        normed = [s / max(len(c), 1) for s, c in zip(scores, q.choices, strict=True)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == q.answer)
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == q.answer)
    n = max(len(questions), 1)
    return {"acc": correct / n, "acc_norm": correct_norm / n}


EvalData = tuple[dict[str, list[str]], dict[str, list[MCQuestion]]]


def load_eval_data(ppl: list[str] = (), mc: list[str] = (), mc_limit: int | None = None) -> EvalData:
    """Read every requested source and set up front, so bad input fails before any model work."""
    return {s: load_texts(s) for s in ppl}, {name: load_mc(name, limit=mc_limit) for name in mc}


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ppl: list[str] = (),
    mc: list[str] = (),
    seqlen: int = 2048,
    max_windows: int | None = None,
    mc_limit: int | None = None,
    data: EvalData | None = None,
) -> dict[str, float]:
    """Run the requested metrics; keys name them (`ppl_wikitext2`, `mc_pubmedqa_acc`, ...).

    `data` is what `load_eval_data(ppl, mc, mc_limit)` returned, when the caller loaded it already.
    """
    texts, questions = data or load_eval_data(ppl, mc, mc_limit)
    results: dict[str, float] = {}
    for source, docs in texts.items():
        results[f"ppl_{metric_name(source)}"] = perplexity(
            model, tokenizer, docs, seqlen, max_windows, desc=f"ppl {source}"
        )
    for name, qs in questions.items():
        for key, value in mc_accuracy(model, tokenizer, qs, desc=f"mc {name}").items():
            results[f"mc_{metric_name(name)}_{key}"] = value
    return results


def metric_name(source: str) -> str:
    """A source or set name as a metric key: 'data/my.jsonl:body' -> 'my', 'mmlu:anatomy' -> 'mmlu_anatomy'."""
    stem = source.rsplit("/", 1)[-1].split(".")[0] if "/" in source or "." in source else source
    return "".join(ch if ch.isalnum() else "_" for ch in stem).strip("_").lower()
