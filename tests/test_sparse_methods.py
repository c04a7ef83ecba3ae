"""Sparsity methods as pure functions: exact counts, N:M groups, and reference re-implementations."""

from __future__ import annotations

import math

import pytest
import torch

from pruning.sparse.magnitude import magnitude_mask
from pruning.sparse.masks import matrix_mask, nm_mask, parse_pattern, prune_counts, row_ranks, rowwise_mask
from pruning.sparse.owl import OwlConfig, outlier_ratio, owl_sparsities
from pruning.sparse.sparsegpt import sparsegpt_prune
from pruning.sparse.trim import TrimConfig, gram_sketch, trim_allocation
from pruning.sparse.wanda import wanda_mask


def _data(D: int = 24, N: int = 32, c: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, N, generator=g)
    X = torch.randn(N, c, generator=g) * torch.linspace(0.2, 3.0, N).unsqueeze(1)  # uneven feature norms
    return W, X


def test_prune_counts_exact_total_and_floor_or_ceil():
    s = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.9
    counts = prune_counts(s, 37)
    assert int(counts.sum()) == round(37 * float(s.sum()))
    assert torch.all((counts == (37 * s).floor()) | (counts == (37 * s).ceil()))


def test_rowwise_and_matrix_masks_are_exact():
    scores = torch.randn(10, 40)
    ranks = row_ranks(scores)
    assert torch.equal(ranks.sort(1).values, torch.arange(40).expand(10, 40))
    counts = torch.arange(10)
    keep = rowwise_mask(ranks, counts)
    assert torch.equal((~keep).sum(1), counts)
    # the dropped entries are each row's lowest scores
    for i in range(10):
        assert set(torch.nonzero(~keep[i]).flatten().tolist()) == set(scores[i].argsort()[: counts[i]].tolist())
    assert int((~matrix_mask(scores, 0.7)).sum()) == round(400 * 0.7)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_valid_in_every_group(pattern):
    n, m = pattern
    scores = torch.randn(16, 64)
    keep = nm_mask(scores, n, m)
    groups = keep.view(16, -1, m)
    assert torch.all((~groups).sum(2) == n)
    # the dropped entries of a group are its n lowest
    lowest = scores.view(16, -1, m).sort(2).values[..., n - 1 : n]
    assert torch.all(scores.view(16, -1, m)[~groups].view(16, -1, n) <= lowest)


def test_pattern_parsing_and_errors():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(None) is None
    for bad in ("4:4", "5:4", "0:4", "2-4", "a:b"):
        with pytest.raises(ValueError):
            parse_pattern(bad)
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(torch.randn(4, 10), 2, 4)


def test_magnitude_is_one_threshold_per_matrix():
    W = torch.randn(20, 30)
    keep = magnitude_mask(W, 0.6)
    assert int((~keep).sum()) == 360
    assert W.abs()[~keep].max() <= W.abs()[keep].min()


def test_wanda_matches_reference_scoring():
    W, X = _data()
    sq = X.pow(2).sum(1)  # (N,)
    keep = wanda_mask(W, sq, 0.5)
    # reference: S_ij = |W_ij| * ||X_j||_2, each row drops its 16 lowest (N * 0.5)
    ref = torch.ones_like(W, dtype=torch.bool)
    for i in range(W.shape[0]):
        metric = [
            abs(W[i, j].item()) * math.sqrt(sum(X[j, t].item() ** 2 for t in range(X.shape[1]))) for j in range(32)
        ]
        for j in sorted(range(32), key=metric.__getitem__)[:16]:
            ref[i, j] = False
    assert torch.equal(keep, ref)


def _reference_trim(W, X, scores, T, cfg: TrimConfig):
    """TRIM's allocation written from the method description, row by row in plain Python."""
    D, N = W.shape
    order = [sorted(range(N), key=lambda j, i=i: scores[i, j].item()) for i in range(D)]
    Y = (W @ X).double()

    def counts(s):
        target = [N * min(max(v, 0.0), 1.0) for v in s]
        k = [math.floor(t) for t in target]
        deficit = round(sum(target)) - sum(k)
        by_remainder = sorted(range(D), key=lambda i: -(target[i] - k[i]))  # stable: ties by index
        for i in by_remainder[: max(deficit, 0)]:
            k[i] += 1
        return k

    def outputs(s):
        Wp = W.clone()
        for i, k in enumerate(counts(s)):
            Wp[i, order[i][:k]] = 0
        return (Wp @ X).double()

    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    uniform = [T] * D
    base = cos(Y, outputs(uniform))
    best_s, best_obj, best_lr = uniform, base, 0.0
    for lrs in (cfg.lrs, cfg.negative_lrs):
        for lr in lrs:
            s, Yh, run_s, run_obj = list(uniform), outputs(uniform), None, base
            for _ in range(cfg.steps):
                q = [cos(Y[i], Yh[i]) for i in range(D)]
                lo, hi = min(q), max(q)
                step = [2 * lr * (v - lo) / (hi - lo) for v in q]
                mean_step = sum(step) / D
                s = [min(max(a + b - mean_step, 0.0), cfg.max_row_sparsity) for a, b in zip(s, step, strict=True)]
                shift = T - sum(s) / D
                s = [v + shift for v in s]
                Yh = outputs(s)
                obj = cos(Y, Yh)
                if obj > run_obj:
                    run_s, run_obj = list(s), obj
            if run_obj <= best_obj:
                break
            best_s, best_obj, best_lr = run_s, run_obj, lr
        if best_lr != 0.0:
            break
    return best_s, best_obj, best_lr


@pytest.mark.parametrize("seed", [0, 1])
def test_trim_matches_reference_update_rule(seed):
    W, X = _data(seed=seed)
    scores = W.abs() * X.pow(2).sum(1).sqrt()
    cfg = TrimConfig(steps=5)
    result = trim_allocation(W, X, row_ranks(scores), 0.7, cfg)
    ref_s, ref_obj, ref_lr = _reference_trim(W, X, scores, 0.7, cfg)
    assert result.lr == ref_lr
    assert result.objective == pytest.approx(ref_obj, rel=1e-9)
    assert torch.allclose(result.row_sparsity, torch.tensor(ref_s, dtype=torch.float64), atol=1e-12)
    assert result.objective >= result.uniform_objective
    assert float(result.row_sparsity.mean()) == pytest.approx(0.7)


def test_gram_sketch_reproduces_all_token_inner_products():
    _, X = _data(N=12, c=40)
    H = X @ X.T
    S = gram_sketch(H, 12)
    assert torch.allclose(S @ S.T, H, atol=1e-3)


def test_sparsegpt_exact_sparsity_and_better_reconstruction():
    W, X = _data(D=16, N=256, c=400)
    H = X @ X.T / X.shape[1]
    new = sparsegpt_prune(W, H, 0.6, blocksize=128)
    zeros = new == 0
    for block in (zeros[:, :128], zeros[:, 128:]):
        assert int(block.sum()) == round(block.numel() * 0.6)
    err_sgpt = ((W - new) @ X).norm()
    err_mag = ((W - W * magnitude_mask(W, 0.6)) @ X).norm()
    assert err_sgpt < err_mag
    nm = sparsegpt_prune(W, H, 0.5, pattern=(2, 4)) == 0
    assert torch.all(nm.view(16, -1, 4).sum(2) == 2)
    rows = torch.linspace(0.3, 0.9, 16, dtype=torch.float64)
    per_row = (sparsegpt_prune(W, H, 0.6, row_sparsity=rows) == 0).sum(1)
    assert torch.equal(per_row, prune_counts(rows, 256))


def test_owl_ratios_mean_range_and_direction():
    lod = [1.0, 5.0, 3.0, 9.0]
    s = owl_sparsities(lod, 0.7, 0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s.index(min(s)) == 3  # most outliers, least pruning
    assert owl_sparsities([2.0, 2.0], 0.5, 0.08) == [0.5, 0.5]
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 100.0])], 2) == pytest.approx(25.0)
    for bad in ({"lam": 0.6}, {"m": 0}, {"nsamples": 0}):
        with pytest.raises(ValueError):
            OwlConfig(**bad)
