"""ALPS and ADMM reconstructions: exact targets, reference re-implementations, and error versus SparseGPT."""

from __future__ import annotations

import pytest
import torch

import pruning.sparse.admm as admm_module
import pruning.sparse.alps as alps_module
from pruning.sparse.admm import AdmmConfig, admm_prune, ramp
from pruning.sparse.alps import AlpsConfig, Projector, alps_prune, refit, relative_error
from pruning.sparse.masks import matrix_mask, nm_mask, prune_counts, row_ranks, rowwise_mask
from pruning.sparse.sparsegpt import sparsegpt_prune

ROWS = torch.linspace(0.3, 0.9, 48, dtype=torch.float64)  # per-row targets, mean 0.6
TARGETS = [(0.5, None, None), (0.7, None, None), (0.8, None, None), (0.5, (2, 4), None), (0.6, None, ROWS)]


def _layer(correlated: bool = False, D: int = 48, N: int = 64, tokens: int = 320, seed: int = 0):
    """W (D, N) and H = X^T X (N, N) of X (tokens, N): uneven feature norms, or inputs that mostly
    live in 8 directions (SparseGPT's one-pass column order is then far from the best update)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, N, generator=g)
    if correlated:
        X = torch.randn(tokens, 8, generator=g) @ torch.randn(8, N, generator=g)
        X += 0.3 * torch.randn(tokens, N, generator=g)
    else:
        X = torch.randn(tokens, N, generator=g) * torch.linspace(0.2, 3.0, N)
    return W, X.T @ X


def _prune(method: str, W, H, sparsity, pattern=None, rows=None):
    if method == "alps":
        return alps_prune(W, H, sparsity, pattern, rows)
    return admm_prune(W, H, sparsity, pattern, rows)


# ---------------------------------------------------------------- configs and targets


@pytest.mark.parametrize(
    "bad",
    [
        {"rho0": 0.0},
        {"rho0": -1.0},
        {"max_iterations": 0},
        {"check_every": 0},
        {"damping": 1.0},
        {"damping": -0.01},
        {"fast_growth": 0.9},
        {"shrink": 0.5},
        {"mid_change": 0.2},  # above fast_change
        {"stop_change": 1.5},
        {"stop_after": -1},
        {"rho_max": 0.01},  # below rho0
        {"cg_steps": -1},
        {"cg_rtol": 0.0},
    ],
)
def test_alps_config_rejects_invalid_settings(bad):
    with pytest.raises(ValueError):
        AlpsConfig(**bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"iterations": 0},
        {"iterations": 10, "mask_iterations": 11},
        {"mask_iterations": -1},
        {"rho": 0.0},
        {"damping": 1.0},
        {"refit_steps": -1},
        {"refit_rtol": 0.0},
    ],
)
def test_admm_config_rejects_invalid_settings(bad):
    with pytest.raises(ValueError):
        AdmmConfig(**bad)


@pytest.mark.parametrize("method", ["alps", "admm"])
@pytest.mark.parametrize(
    "args",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": 0.5, "pattern": (4, 4)},
        {"sparsity": 0.5, "pattern": (3, 5)},  # 64 inputs are not groups of 5
        {"sparsity": 0.5, "row_sparsity": torch.full((47,), 0.5)},
        {"sparsity": 0.5, "pattern": (2, 4), "row_sparsity": torch.full((48,), 0.5)},
        {"sparsity": 0.5, "H": torch.eye(63)},
    ],
)
def test_invalid_targets_raise_before_any_work(method, args, monkeypatch):
    def no_work(*_args, **_kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(alps_module, "scale_inputs", no_work)
    monkeypatch.setattr(admm_module, "scale_inputs", no_work)
    W, H = _layer()
    args = {"H": H} | args
    with pytest.raises(ValueError):
        (alps_prune if method == "alps" else admm_prune)(W, **args)


# ---------------------------------------------------------------- exact targets


@pytest.mark.parametrize("method", ["alps", "admm"])
@pytest.mark.parametrize("sparsity,pattern,rows", TARGETS)
def test_exact_sparsity_rows_and_patterns(method, sparsity, pattern, rows):
    W, H = _layer()
    result = _prune(method, W, H, sparsity, pattern, rows)
    zeros = result.weight == 0
    assert torch.equal(zeros, ~result.mask)  # zero exactly off the support, no kept entry zero
    assert not torch.signbit(result.weight[zeros]).any()  # pruned entries are +0.0
    if pattern is not None:
        n, m = pattern
        assert torch.all(zeros.view(48, -1, m).sum(2) == n)
    elif rows is not None:
        assert torch.equal(zeros.sum(1), prune_counts(rows, 64))
    else:
        assert int(zeros.sum()) == round(W.numel() * sparsity)


@pytest.mark.parametrize("method", ["alps", "admm"])
def test_other_patterns_dtypes_and_zero_sparsity(method):
    W, H = _layer()
    for n, m in ((4, 8), (1, 4)):
        zeros = _prune(method, W, H, n / m, (n, m)).weight == 0
        assert torch.all(zeros.view(48, -1, m).sum(2) == n)
    half = _prune(method, W.bfloat16(), H, 0.7).weight
    assert half.dtype == torch.bfloat16 and int((half == 0).sum()) == round(W.numel() * 0.7)
    dense = _prune(method, W, H, 0.0)
    assert torch.equal(dense.weight, W) and bool(dense.mask.all())


@pytest.mark.parametrize("method", ["alps", "admm"])
def test_dead_inputs_stay_finite(method):
    W, H = _layer()
    H[[5, 17], :] = 0
    H[:, [5, 17]] = 0  # two inputs never active on the calibration tokens
    for sparsity in (0.1, 0.7):
        result = _prune(method, W, H, sparsity)
        assert torch.isfinite(result.weight).all() and result.weight.abs().max() < 10 * W.abs().max()
        assert int((result.weight == 0).sum()) == round(W.numel() * sparsity)


def test_projector_matches_masks_with_ties():
    g = torch.Generator().manual_seed(3)
    for shape in ((48, 64), (300, 256)):
        scores = torch.randint(0, 6, shape, generator=g).float()  # many ties
        smooth = torch.rand(shape, generator=g)
        for s in (scores, smooth):
            assert torch.equal(Projector(s.shape, 0.7, None, None).keep(s), matrix_mask(s, 0.7))
            assert torch.equal(Projector(s.shape, 0.5, (2, 4), None).keep(s), nm_mask(s, 2, 4))
            rows = torch.rand(shape[0], generator=g, dtype=torch.float64)
            counts = prune_counts(rows, shape[1])
            assert torch.equal(Projector(s.shape, 0.0, None, rows).keep(s), rowwise_mask(row_ranks(s), counts))
        kept = Projector(scores.shape, 0.7, None, None).keep(scores, 0.5)  # ADMM's partial drop
        assert int((~kept).sum()) == round(round(scores.numel() * 0.7) * 0.5)


# ---------------------------------------------------------------- reconstruction quality


@pytest.mark.parametrize("method", ["alps", "admm"])
@pytest.mark.parametrize("sparsity,pattern,rows", TARGETS)
def test_error_at_most_sparsegpt(method, sparsity, pattern, rows):
    W, H = _layer()
    ours = relative_error(W, _prune(method, W, H, sparsity, pattern, rows).weight, H)
    theirs = relative_error(W, sparsegpt_prune(W, H, sparsity, pattern, rows), H)
    assert ours <= theirs


@pytest.mark.parametrize("method", ["alps", "admm"])
@pytest.mark.parametrize("sparsity,pattern", [(0.7, None), (0.5, (2, 4))])
def test_error_far_below_sparsegpt_on_correlated_inputs(method, sparsity, pattern):
    W, H = _layer(correlated=True)
    ours = relative_error(W, _prune(method, W, H, sparsity, pattern).weight, H)
    theirs = relative_error(W, sparsegpt_prune(W, H, sparsity, pattern), H)
    assert ours < 0.5 * theirs


def test_alps_result_statistics():
    W, H = _layer()
    result = alps_prune(W, H, 0.7)
    assert 0 < result.iterations <= 300 and result.stop in ("converged", "early", "max_iterations")
    assert len(result.support_changes) == result.iterations // 3
    assert result.error_after_refit <= result.error_before_refit + 1e-7
    assert result.error_after_refit == pytest.approx(relative_error(W, result.weight, H), rel=1e-6)
    assert set(result.stats()) >= {"iterations", "rho", "error_before_refit", "error_after_refit"}


@pytest.mark.parametrize("method", ["alps", "admm"])
def test_deterministic(method):
    W, H = _layer(correlated=True)
    W_in, H_in = W.clone(), H.clone()
    first, second = _prune(method, W, H, 0.7), _prune(method, W, H, 0.7)
    assert torch.equal(W, W_in) and torch.equal(H, H_in)  # inputs untouched
    assert torch.equal(first.weight, second.weight) and torch.equal(first.mask, second.mask)
    assert first.stats() == second.stats()


# ---------------------------------------------------------------- reference re-implementations


def _keep(M, drop, pattern=None, rows=None):
    """Keep-mask of |M| without its `drop` lowest entries (or per row, or N:M), via `masks`."""
    score = M.abs()
    if pattern is not None:
        return nm_mask(score, *pattern)
    if rows is not None:
        return rowwise_mask(row_ranks(score), prune_counts(rows, M.shape[1]))
    keep = torch.ones(M.numel(), dtype=torch.bool)
    keep[score.flatten().argsort(stable=True)[:drop]] = False
    return keep.view_as(M)


def _reference_alps(W, H, sparsity, pattern, rows, cfg: AlpsConfig):
    """ALPS from the update equations in float64, a dense solve per iteration (no eigenbasis)."""
    H = H.double().clone()
    N = H.shape[0]
    H += cfg.damping * H.diag().mean() * torch.eye(N, dtype=torch.float64)
    s = H.diag().sqrt() + 1e-8
    H = H / s.unsqueeze(0) / s.unsqueeze(1)
    B0 = W.double() * s
    T = B0 @ H
    drop = round(W.numel() * sparsity)
    kept = W.numel() - (int(prune_counts(rows, N).sum()) if rows is not None else drop)
    D0 = B0 * _keep(B0, drop, pattern, rows)
    B, D, V, rho = B0.clone(), D0.clone(), torch.zeros_like(B0), cfg.rho0
    last, growing, it = D0 != 0, False, cfg.max_iterations
    for i in range(cfg.max_iterations):
        B = torch.linalg.solve(H + rho * torch.eye(N, dtype=torch.float64), (T - V + rho * D).T).T
        D = (B + V / rho) * _keep(B + V / rho, drop, pattern, rows)
        V = V + rho * (B - D)
        if (i + 1) % cfg.check_every == 0:
            support = D != 0
            change = int((support != last).sum()) / kept
            last = support
            if change > cfg.fast_change:
                growing, rho = True, rho * cfg.fast_growth
            elif change > cfg.mid_change:
                growing, rho = True, rho * cfg.mid_growth
            elif change > 0:
                if growing:
                    rho = rho * cfg.slow_growth
                else:
                    rho = rho / cfg.shrink
                    B, D, V = B0.clone(), D0.clone(), torch.zeros_like(B0)
            elif growing:
                it = i + 1
                break
            else:
                rho = rho / cfg.shrink
            rho = min(rho, cfg.rho_max)
            if i >= cfg.stop_after and change < cfg.stop_change:
                it = i + 1
                break
    B = B * _keep(B, drop, pattern, rows)
    return B / s, it, rho


FIXED_RHO = AlpsConfig(rho0=1.0, max_iterations=25, check_every=1000, cg_steps=0)  # no checks: rho stays


@pytest.mark.parametrize(
    "sparsity,pattern,rows,cfg,stop,restarts",
    [
        (0.7, None, None, FIXED_RHO, "max_iterations", 0),
        (0.5, (2, 4), None, FIXED_RHO, "max_iterations", 0),
        (0.6, None, ROWS, FIXED_RHO, "max_iterations", 0),
        (0.7, None, None, AlpsConfig(cg_steps=0), "converged", 0),  # the default rho schedule
        (0.5, (2, 4), None, AlpsConfig(cg_steps=0), "converged", 0),
        (0.5, None, None, AlpsConfig(rho0=20.0, cg_steps=0), "converged", 2),  # shrinks, restarts on small changes
        (0.7, None, None, AlpsConfig(stop_after=6, stop_change=0.01, cg_steps=0), "early", 0),
    ],
)
def test_alps_matches_plain_reference(sparsity, pattern, rows, cfg, stop, restarts):
    W, H = _layer(correlated=True)
    result = alps_prune(W, H, sparsity, pattern, rows, cfg)
    ref, iterations, rho = _reference_alps(W, H, sparsity, pattern, rows, cfg)
    assert (result.stop, result.restarts) == (stop, restarts)
    assert result.iterations == iterations and result.rho == pytest.approx(rho, rel=1e-12)
    assert torch.equal(result.mask, ref != 0)
    assert torch.allclose(result.weight.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_refit_is_least_squares_on_the_support():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(200, 24, generator=g, dtype=torch.float64)
    H, T = X.T @ X / 200, torch.randn(6, 24, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 24, generator=g) < 0.4
    B, _ = refit(H.float(), T.float(), torch.zeros(6, 24), mask, steps=24, rtol=1e-7)
    for i in range(6):
        S = mask[i]
        exact = torch.linalg.solve(H[S][:, S], T[i, S])
        assert torch.allclose(B[i, S].double(), exact, atol=1e-4)
        assert torch.all(B[i, ~S] == 0)


def _reference_admm(W, H, sparsity, pattern, cfg: AdmmConfig):
    """ADMM pruning from the update equations in float64, with a dense solve per iteration."""
    H = H.double().clone()
    N = H.shape[0]
    s = H.diag().sqrt() + 1e-8
    H = H / s.unsqueeze(0) / s.unsqueeze(1)
    H += cfg.damping * H.diag().mean() * torch.eye(N, dtype=torch.float64)
    B0 = W.double() * s
    T = B0 @ H
    total = W.numel() * pattern[0] // pattern[1] if pattern else round(W.numel() * sparsity)

    def select(M, t):
        if not cfg.gradual or t == cfg.mask_iterations - 1:
            return _keep(M, total, pattern)
        drop = round(total * ramp(t, cfg.mask_iterations))
        score = M.abs().masked_fill(_keep(M, 0, pattern), float("inf")) if pattern else M.abs()
        keep = torch.ones(M.numel(), dtype=torch.bool)
        keep[score.flatten().argsort(stable=True)[:drop]] = False
        return keep.view_as(M)

    B, U, mask = B0.clone(), torch.zeros_like(B0), _keep(B0, total, pattern)
    for t in range(cfg.iterations):
        if t < cfg.mask_iterations:
            mask = select(B + U, t)
        Z = (B + U) * mask
        U = U + B - Z
        B = torch.linalg.solve(H + cfg.rho * torch.eye(N, dtype=torch.float64), (T + cfg.rho * (Z - U)).T).T
    return (B + U) * mask / s


@pytest.mark.parametrize("gradual", [True, False])
@pytest.mark.parametrize("sparsity,pattern", [(0.7, None), (0.5, (2, 4))])
def test_admm_matches_plain_reference(gradual, sparsity, pattern):
    W, H = _layer(correlated=True)
    cfg = AdmmConfig(iterations=12, mask_iterations=8, gradual=gradual, refit_steps=0)
    result = admm_prune(W, H, sparsity, pattern, cfg=cfg)
    ref = _reference_admm(W, H, sparsity, pattern, cfg)
    assert torch.equal(result.mask, ref != 0)
    assert torch.allclose(result.weight.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_admm_gradual_ramp_reaches_the_target():
    assert [round(ramp(t, 4), 6) for t in range(4)] == [0.578125, 0.875, 0.984375, 1.0]


@pytest.mark.parametrize("method", ["alps", "admm"])
def test_thread_count_restored(method):
    W, H = _layer()
    threads = torch.get_num_threads()
    _prune(method, W, H, 0.5)
    assert torch.get_num_threads() == threads
