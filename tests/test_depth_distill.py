"""TrimLLM's healing: cached teacher logits, the KD loss, LoRA, settings derived from the text size."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pruning.depth.distill import check_teacher_memory, kd_loss, teacher_top_k
from pruning.depth.pipeline import DepthSettings, prune_depth
from pruning.depth.trimllm import (
    MAX_STEPS,
    TrimLLMConfig,
    domain_fine_tune,
    domain_teacher,
    split_domain,
    trimllm,
)
from tests.tiny_models import save_tiny_variant, tiny_llama
from variants.build import load_teacher
from variants.load import load_model

VOCAB = 64
CONFIG = TrimLLMConfig(
    remove=1, heal="kd", steps_per_round=4, final_steps=4, seqlen=16, heldout_windows=1, lr=3e-3, kd_top_k=8
)


def _stream(n: int = 160) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(5))


def test_teacher_top_k_keeps_the_largest_log_probabilities():
    model = tiny_llama(layers=2, vocab_size=VOCAB)
    windows = _stream(48).view(3, 16)
    cached = teacher_top_k(model, windows, top_k=5, batch_size=2)
    full = F.log_softmax(model(windows).logits, dim=-1)
    top = full.topk(5, dim=-1)
    assert torch.allclose(cached.logprobs, top.values, atol=1e-6)
    assert torch.equal(cached.indices.long(), top.indices)
    assert cached.nbytes == 3 * 16 * 5 * 8
    assert cached.mass == pytest.approx(top.values.exp().sum(-1).mean().item(), rel=1e-5)


def test_kd_loss_is_the_kl_divergence_of_top_k_plus_the_rest_and_zero_for_the_teacher():
    model = tiny_llama(layers=2, vocab_size=VOCAB)
    windows = _stream(32).view(2, 16)
    whole = teacher_top_k(model, windows, top_k=VOCAB)  # every token kept: the exact KL
    idx = torch.tensor([1, 0])
    assert kd_loss(model(windows[idx]).logits, whole, idx).item() == pytest.approx(0.0, abs=1e-5)
    other = tiny_llama(layers=2, vocab_size=VOCAB, seed=1)
    student = F.log_softmax(other(windows[idx]).logits, dim=-1)
    teacher = F.log_softmax(model(windows[idx]).logits, dim=-1)
    plain = (teacher.exp() * (teacher - student)).sum(-1).mean()
    assert kd_loss(other(windows[idx]).logits, whole, idx).item() == pytest.approx(plain.item(), rel=1e-4)
    assert plain.item() > 0.01
    top = teacher_top_k(model, windows, top_k=4)  # the top 4 and one bucket for the other tokens
    lumped = _lumped(teacher, top.indices[idx].long()), _lumped(student, top.indices[idx].long())
    expected = (lumped[0].exp() * (lumped[0] - lumped[1])).sum(-1).mean()
    assert kd_loss(other(windows[idx]).logits, top, idx).item() == pytest.approx(expected.item(), rel=1e-4)


def _lumped(logprobs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the `keep` tokens and of everything else together, written plainly."""
    kept = logprobs.gather(-1, keep)
    rest = torch.log(1 - kept.exp().sum(-1, keepdim=True))
    return torch.cat([kept, rest], dim=-1)


def test_distillation_moves_the_student_towards_the_teacher():
    teacher = tiny_llama(layers=3, vocab_size=VOCAB)
    student = tiny_llama(layers=3, vocab_size=VOCAB, seed=1)
    config = dataclasses.replace(CONFIG, trainable_fraction=1.0, kd_top_k=VOCAB)
    stream = _stream()
    logits = domain_teacher(teacher, stream, config)
    windows, _ = split_domain(stream, config)
    idx = torch.arange(len(windows))
    with torch.no_grad():
        before = kd_loss(student(windows).logits, logits, idx).item()
    domain_fine_tune(student, stream, config, steps=20, teacher=logits)
    with torch.no_grad():
        after = kd_loss(student(windows).logits, logits, idx).item()
    assert after < 0.8 * before


def test_teacher_fine_tuning_changes_the_cached_logits_not_the_model():
    model = tiny_llama(layers=2, vocab_size=VOCAB)
    state = copy.deepcopy(model.state_dict())
    plain = domain_teacher(model, _stream(), CONFIG)
    tuned = domain_teacher(model, _stream(), dataclasses.replace(CONFIG, teacher_finetune_steps=5))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.allclose(plain.logprobs, tuned.logprobs)
    assert tuned.about["finetune_steps"] == 5 and plain.about["top_k"] == 8


@pytest.mark.parametrize("heal", ["kd", "kd+lm"])
def test_distilling_trimllm_through_the_pipeline_is_deterministic(heal):
    settings = DepthSettings("trimllm", 1, trimllm=dataclasses.replace(CONFIG, heal=heal))
    runs = []
    for _ in range(2):
        model = tiny_llama(layers=4, vocab_size=VOCAB)
        outcome = prune_depth(model, settings, domain=_stream())
        runs.append((outcome, model.state_dict()))
    (first, a), (second, b) = runs
    assert first.removed == second.removed and first.stats["losses"] == second.stats["losses"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.stats["training"]["heal"] == heal and first.stats["teacher"]["top_k"] == 8
    assert len(first.stats["losses"]) == 8


def test_lora_trains_adapters_only_and_merges_into_a_plain_model():
    model = tiny_llama(layers=4, vocab_size=VOCAB)
    before = copy.deepcopy(model.state_dict())
    config = dataclasses.replace(CONFIG, heal="lm", lora_rank=4)
    result = trimllm(model, _stream(), config)
    state = model.state_dict()
    assert not any("lora" in k for k in state) and set(state) <= set(before)
    kept = [i for i in range(4) if i not in result.removed]
    for new, old in enumerate(kept):
        trained = old in result.trainable_layers
        same = all(
            torch.equal(v, before[k.replace(f"layers.{new}.", f"layers.{old}.")])
            for k, v in state.items()
            if k.startswith(f"model.layers.{new}.")
        )
        assert same != trained, (old, trained)
    assert not torch.equal(state["model.norm.weight"], before["model.norm.weight"])
    assert torch.equal(
        state["model.embed_tokens.weight"], before["model.embed_tokens.weight"]
    )  # the head is not trained
    assert all(not p.requires_grad for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM"


def test_unset_settings_are_derived_from_the_text_size():
    config = TrimLLMConfig(remove=8, seqlen=512)
    pubmed = config.resolved(156_000)  # 304 windows: 3 held out
    assert (pubmed.heldout_windows, pubmed.steps_per_round, pubmed.final_steps, pubmed.lr) == (3, 18, 157, 5e-4)
    small = config.resolved(20 * 512)  # 19 training windows: at least 4 steps a layer, a lower lr
    assert (small.heldout_windows, small.steps_per_round, small.final_steps, small.lr) == (1, 2, 16, 2e-4)
    huge = config.resolved(10**7)
    assert huge.heldout_windows == 4 and huge.steps_per_round * 8 + huge.final_steps == MAX_STEPS
    assert TrimLLMConfig(remove=8, lora_rank=8).resolved(156_000).lr == 2e-3
    given = TrimLLMConfig(remove=2, steps_per_round=0, final_steps=7, heldout_windows=2, lr=1e-5).resolved(10**6)
    assert (given.steps_per_round, given.final_steps, given.heldout_windows, given.lr) == (0, 7, 2, 1e-5)


def test_bad_healing_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="heal must be one of"):
        TrimLLMConfig(remove=1, heal="mse")
    with pytest.raises(ValueError, match="needs a teacher"):
        TrimLLMConfig(remove=1, heal="lm", teacher_finetune_steps=3)
    with pytest.raises(ValueError, match="kd_top_k"):
        TrimLLMConfig(remove=1, kd_top_k=0)
    with pytest.raises(ValueError, match="lora_rank"):
        TrimLLMConfig(remove=1, lora_rank=-1)
    with pytest.raises(ValueError, match="teacher's logits"):
        trimllm(tiny_llama(layers=3, vocab_size=VOCAB), _stream(), CONFIG)  # kd without a teacher


def test_the_teacher_cache_must_fit_in_memory():
    assert check_teacher_memory(300, 512, 64, available=1 << 34) == 300 * 512 * 64 * 8
    with pytest.raises(ValueError, match=r"75 MiB, more than half of the 100 MiB available"):
        check_teacher_memory(300, 512, 64, available=100 << 20)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tokenizer):
    model, tok = load_model(save_tiny_variant(tmp_path / "student", tokenizer, layers=2))
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<trimserve-extra-token>"])
    teacher_dir = save_tiny_variant(tmp_path / "teacher", other, layers=2)
    assert load_teacher(None, tok, model, "cpu") is None
    with pytest.raises(ValueError, match="tokenizer differs from the student's"):
        load_teacher(str(teacher_dir), tok, model, "cpu")
