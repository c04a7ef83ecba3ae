import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.evaluate import mc_accuracy, metric_name, option_logprobs, perplexity, window_nll
from evaluation.questions import MCQuestion
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def reference_ppl(model, ids, seqlen):
    """Windows of `seqlen`, each scored alone; exp of the mean token NLL."""
    nlls = []
    for start in range(0, len(ids) - seqlen + 1, seqlen):
        window = ids[start : start + seqlen].unsqueeze(0)
        with torch.no_grad():
            logits = model(window).logits[0, :-1]
        nlls.append(F.cross_entropy(logits, window[0, 1:], reduction="none"))
    return math.exp(torch.cat(nlls).mean().item())


def test_perplexity_matches_reference(model, tokenizer):
    text = "The committee met on Tuesday to discuss the budget. " * 40
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    got = perplexity(model, tokenizer, [text], seqlen=64)
    assert got == pytest.approx(reference_ppl(model, ids, 64), rel=1e-5)
    capped = perplexity(model, tokenizer, [text], seqlen=64, max_windows=2)
    assert capped == pytest.approx(reference_ppl(model, ids[:128], 64), rel=1e-5)


def test_window_nll_does_not_depend_on_batch_size(model):
    windows = torch.randint(3, 5000, (4, 32), generator=torch.Generator().manual_seed(1))
    assert window_nll(model, windows, batch_size=1) == pytest.approx(window_nll(model, windows, batch_size=3), rel=1e-5)


def full_sequence_logprob(model, prompt, option):
    ids = torch.tensor([prompt + option])
    with torch.no_grad():
        logp = model(ids).logits[0].log_softmax(-1)
    return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(option))


def test_option_logprobs_single_and_multi_token(model):
    prompt = [5, 17, 300, 42]
    single = [[7], [8], [9]]
    multi = [[7, 8], [9], [10, 11, 12]]
    for options in (single, multi):
        got = option_logprobs(model, prompt, options)
        want = [full_sequence_logprob(model, prompt, o) for o in options]
        assert got == pytest.approx(want, abs=1e-4)


def test_mc_accuracy_picks_argmax(model, tokenizer):
    prompt = "Question: is water wet?\nAnswer:"
    choices = (" yes", " no", " maybe")
    prompt_ids = tokenizer(prompt).input_ids
    scores = [
        full_sequence_logprob(model, prompt_ids, tokenizer(prompt + c).input_ids[len(prompt_ids) :]) for c in choices
    ]
    best = max(range(3), key=scores.__getitem__)
    normed = [s / len(c) for s, c in zip(scores, choices, strict=True)]
    best_norm = max(range(3), key=normed.__getitem__)
    right = MCQuestion(prompt, choices, best)
    wrong = MCQuestion(prompt, choices, (best + 1) % 3)
    result = mc_accuracy(model, tokenizer, [right, wrong])
    assert result["acc"] == 0.5
    assert result["acc_norm"] == 0.5 * (best_norm == best) + 0.5 * (best_norm == (best + 1) % 3)


def test_metric_names():
    assert metric_name("wikitext2") == "wikitext2"
    assert metric_name("pubmedqa-test") == "pubmedqa_test"
    assert metric_name("/data/my notes.txt") == "my_notes"
    assert metric_name("corpus.jsonl:body") == "corpus"
    assert metric_name("mmlu:anatomy,virology") == "mmlu_anatomy_virology"
