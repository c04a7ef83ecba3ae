"""ALPS: ADMM on the layer reconstruction ||X W' - X W||^2 under a sparsity constraint.

Meng et al., NeurIPS 2024 (arXiv 2406.07831), following the released code (mazumder-lab/ALPS):
1. Damp and scale: H += damping * mean(diag H) * I; s = sqrt(diag H) + 1e-8; H <- H / (s s^T);
   work on B = W * s (inputs scaled to unit norm), target T = B0 H.
2. Eigendecompose H once; every ridge solve (H + rho I)^-1 then costs matrix products only.
3. Start from D = B0 with all but its k largest |entries| zeroed, V = 0, rho = rho0.
4. Iterate: B = (T - V + rho D) (H + rho I)^-1; D = the k largest entries of B + V / rho;
   V += rho (B - D). Every `check_every` iterations compare the support with the last check and
   adapt rho (growth while the support moves, shrink and restart while it settles too early), stop
   once the support no longer moves after rho has started growing, or once it moves by less than
   `stop_change` after `stop_after` iterations.
5. Keep the k largest entries of B and refit them on that fixed support with a few steps of
   conjugate gradient on the scaled H (unit diagonal, so the scaling is its Jacobi preconditioner);
   unscale by s.

"k largest" is over the whole matrix (unstructured, as released), per row (`row_sparsity`, exact
counts from `prune_counts`, for TRIM's allocation) or per group of M consecutive inputs of a row
(N:M). Differences from the released code, none changing the iterates: the refit stops on each
row's residual restricted to its support (the released test used the unrestricted residual, which
never reaches rtol, so it always ran all steps); the error it computed at every check only for
printing is not computed; errors are reported on the undamped H. Helpers below (scaling,
projections, refit, error) are shared with `admm`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pruning.sparse.masks import check_pattern, prune_counts, row_ranks, rowwise_mask

_EPS = 1e-8  # added to the input norms before scaling (released code)


@dataclass(frozen=True)
class AlpsConfig:
    """ALPS settings; the defaults are the released code's.

    Support change = entries whose kept/pruned status flipped since the last check, as a fraction
    of the kept entries. At a check: above `fast_change` rho *= fast_growth, above `mid_change`
    rho *= mid_growth (both mark rho as growing); any other change rho *= slow_growth once rho grows,
    else rho /= shrink and the iterates restart from the initial point; no change stops once rho
    grows, else rho /= shrink. rho is capped at `rho_max`.
    """

    max_iterations: int = 300
    rho0: float = 0.1
    check_every: int = 3
    fast_change: float = 0.1
    fast_growth: float = 1.3
    mid_change: float = 0.005
    mid_growth: float = 1.2
    slow_growth: float = 1.1
    shrink: float = 5.0
    rho_max: float = 1e6
    stop_after: int = 30  # early stop allowed from this iteration (0-based) on ...
    stop_change: float = 3e-4  # ... once a check sees a support change below this fraction
    damping: float = 0.01  # fraction of mean(diag H) added to the diagonal before scaling
    cg_steps: int = 10  # refit on the final support; 0 keeps ADMM's weights
    cg_rtol: float = 1e-4  # stop the refit once every row's residual is below rtol * its right-hand side

    def __post_init__(self) -> None:
        if self.max_iterations < 1 or self.check_every < 1:
            raise ValueError("ALPS max_iterations and check_every must be positive")
        if not self.rho0 > 0 or not self.rho_max >= self.rho0:
            raise ValueError(f"ALPS needs rho0 > 0 and rho_max >= rho0, got {self.rho0}, {self.rho_max}")
        if min(self.fast_growth, self.mid_growth, self.slow_growth, self.shrink) < 1:
            raise ValueError("ALPS rho growth factors and shrink must be at least 1")
        if not 0 <= self.mid_change <= self.fast_change <= 1 or not 0 <= self.stop_change <= 1:
            raise ValueError("ALPS needs 0 <= mid_change <= fast_change <= 1 and stop_change in [0, 1]")
        if self.stop_after < 0:
            raise ValueError(f"ALPS stop_after must be non-negative, got {self.stop_after}")
        if not 0 <= self.damping < 1:
            raise ValueError(f"ALPS damping must be in [0, 1), got {self.damping}")
        if self.cg_steps < 0 or not self.cg_rtol > 0:
            raise ValueError("ALPS cg_steps must be non-negative and cg_rtol positive")


@dataclass(frozen=True)
class AlpsResult:
    weight: torch.Tensor  # (D, N) new weight, dtype of the input weight
    mask: torch.Tensor  # (D, N) bool, True = keep
    iterations: int  # ADMM iterations run
    rho: float  # final rho
    stop: str  # "converged" (support settled), "early" (stop_change rule) or "max_iterations"
    restarts: int  # restarts from the initial point (rho shrunk after a small change)
    support_changes: tuple[float, ...]  # support change at each check, fraction of kept entries
    error_before_refit: float  # ||X W' - X W||^2 / ||X W||^2 on the undamped H
    error_after_refit: float
    cg_steps: int  # refit steps run

    def stats(self) -> dict[str, Any]:
        """JSON-ready statistics for a manifest: every field but the tensors."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("weight", "mask")}


# ---------------------------------------------------------------- shared with admm


def check_target(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None,
    row_sparsity: torch.Tensor | None,
) -> None:
    """ValueError for shapes or targets that cannot be met, before any work."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"need W (D, N) and H (N, N), got {tuple(W.shape)} and {tuple(H.shape)}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern is not None:
        check_pattern(pattern)
        if W.shape[1] % pattern[1]:
            raise ValueError(f"N:M pattern needs the input size ({W.shape[1]}) to be a multiple of {pattern[1]}")
        if row_sparsity is not None:
            raise ValueError("an N:M pattern cannot be combined with per-row sparsity")
    if row_sparsity is not None and row_sparsity.shape != (W.shape[0],):
        raise ValueError(f"row_sparsity must have one value per row ({W.shape[0]}), got {tuple(row_sparsity.shape)}")


def scale_inputs(H: torch.Tensor, damping: float, damp_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_s, s): H_s = H / (s s^T) with s = sqrt(diag H) + 1e-8, damped by `damping` * mean diagonal
    before scaling (ALPS) or after it (ADMM). Float32 (N, N) and (N,)."""
    H = H.float().clone()
    if damp_first:
        H.diagonal().add_(damping * H.diagonal().mean())
    s = H.diagonal().sqrt() + _EPS  # (N,)
    H.div_(s.unsqueeze(0)).div_(s.unsqueeze(1))
    if not damp_first:
        H.diagonal().add_(damping * H.diagonal().mean())
    return H, s


class Projector:
    """Keep-masks of the largest scores: over the whole matrix, per row, or per group of M inputs.

    Counts are exact and ties follow `masks` (lower scores dropped first, among equal scores the
    earlier entry first), so masks are deterministic. `keep(score, fraction)` drops `fraction` of
    the target zeros (1.0 = the target; ADMM's gradual schedule asks for less). Thresholds come
    from numpy's selection and sort on CPU (10-20x faster than torch's kthvalue and sort there).
    """

    def __init__(
        self, shape: torch.Size, sparsity: float, pattern: tuple[int, int] | None, row_sparsity: torch.Tensor | None
    ):
        rows, cols = shape
        self.shape, self.pattern = shape, pattern
        self.row_drop = prune_counts(row_sparsity, cols) if row_sparsity is not None else None  # (D,)
        if pattern is not None:
            self.drop = rows * cols // pattern[1] * pattern[0]
        elif self.row_drop is not None:
            self.drop = int(self.row_drop.sum())
        else:
            self.drop = round(rows * cols * sparsity)
        self.kept = rows * cols - self.drop

    def keep(self, score: torch.Tensor, fraction: float = 1.0) -> torch.Tensor:
        """(D, N) bool keep-mask of scores (D, N)."""
        if self.pattern is not None:
            return self._nm(score, fraction)
        if self.row_drop is not None:
            drop = self.row_drop if fraction == 1.0 else (self.row_drop * fraction).round().long()
            return _drop_lowest_per_row(score, drop.to(score.device))
        drop = self.drop if fraction == 1.0 else round(self.drop * fraction)
        return _drop_lowest(score.reshape(-1), drop).view(self.shape)

    def _nm(self, score: torch.Tensor, fraction: float) -> torch.Tensor:
        """N of every M consecutive inputs dropped; with fraction < 1 only that share of those
        drops, the lowest scores first. Ranks in a group come from one comparison per pair."""
        n, m = self.pattern
        cols = score.reshape(-1, m).T.contiguous()  # (M, D*N/M): column j holds every group's j-th
        rank = torch.zeros(cols.shape, dtype=torch.uint8, device=score.device)  # ascending, ties by position
        for j in range(m):
            for later in range(j + 1, m):
                lower = cols[j] <= cols[later]  # j ranks below `later` (ties: the earlier below)
                rank[later] += lower
                rank[j] += ~lower
        keep = (rank >= n).T.reshape(self.shape)
        if fraction == 1.0:
            return keep
        ranked = score.masked_fill(keep, float("inf"))
        return _drop_lowest(ranked.reshape(-1), round(self.drop * fraction)).view(self.shape)


def _kth_smallest(values: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) of a flat tensor."""
    if values.device.type == "cpu":
        return float(np.partition(values.detach().numpy(), k - 1)[k - 1])
    return float(values.kthvalue(k).values)


def _drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat keep-mask without the k lowest entries of a flat score (ties: earlier dropped first)."""
    n = score.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k <= 0, dtype=torch.bool, device=score.device)
    v = _kth_smallest(score, k)
    keep = score > v
    extra = n - k - int(torch.count_nonzero(keep))  # entries equal to v that stay: the last ones
    if extra > 0:
        ties = score == v
        from_end = ties.flip(0).cumsum(0).flip(0)  # ties at or after each position
        keep |= ties & (from_end <= extra)
    return keep


def _drop_lowest_per_row(score: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Keep-mask without each row's drop[i] lowest entries (ties: earlier dropped first)."""
    cols = score.shape[1]
    if score.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(score.detach().numpy(), axis=1))  # (D, N) ascending
    else:
        ordered = score.sort(dim=1).values
    v = ordered.gather(1, (drop - 1).clamp(0, cols - 1).unsqueeze(1))  # (D, 1) drop-th smallest
    v[drop == 0] = -float("inf")
    keep = score > v
    tied = (keep.sum(1) != cols - drop).nonzero().flatten()  # rows whose threshold value repeats
    if len(tied):
        keep[tied] = rowwise_mask(row_ranks(score[tied]), drop[tied])
    return keep


@torch.no_grad()
def refit(
    H: torch.Tensor, T: torch.Tensor, B: torch.Tensor, mask: torch.Tensor, steps: int, rtol: float
) -> tuple[torch.Tensor, int]:
    """Conjugate gradient on every row's system restricted to its support: B_S H_SS = T_S.

    H: (N, N) symmetric positive definite; T, B: (D, N) right-hand sides and start (zero off the
    support); mask: (D, N) support. Stops after `steps` or once every row's residual norm is below
    rtol times its right-hand side's. Returns (B, steps run); B stays zero off the support.
    """
    B = B * mask
    R = (T - B @ H) * mask  # (D, N)
    stop = rtol**2 * (T * mask).pow(2).sum(1)  # (D,)
    rr = R.pow(2).sum(1)  # (D,)
    P = R.clone()
    AP = torch.empty_like(P)
    for step in range(steps):
        if bool((rr <= stop).all()):
            return B, step
        torch.matmul(P, H, out=AP).mul_(mask)
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rr / pap, 0).unsqueeze(1)
        B.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1)
        rr_new = R.pow(2).sum(1)
        beta = torch.where(rr > 0, rr_new / rr, 0).unsqueeze(1)
        P.mul_(beta).add_(R)
        rr = rr_new
    return B, steps


def relative_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """||X W_new^T - X W^T||^2 / ||X W^T||^2 with H = X^T X: tr(E H E^T) / tr(W H W^T)."""
    W, E = W.float(), W_new.float() - W.float()
    num = ((E @ H) * E).double().sum()
    den = ((W @ H) * W).double().sum()
    return float(num / den) if den > 0 else float(num > 0)


# ---------------------------------------------------------------- ALPS


class _Ridge:
    """X (H + rho I)^-1 for (D, N) matrices X from one eigendecomposition of H (float64).

    Two ways per rho: form the inverse Q diag(1/(L + rho)) Q^T (N^3 work each time rho changes,
    then one product per solve) or apply the factors ((X Q) / (L + rho)) Q^T (two products per
    solve). The cheaper is chosen from the shape, assuming rho changes every `check_every` solves.
    """

    def __init__(self, H: torch.Tensor, rows: int, check_every: int):
        L, Q = torch.linalg.eigh(H.double())
        self.L, self.Q = L, Q.float()
        self.QT = self.Q.T.contiguous()
        N = H.shape[0]
        self.explicit = check_every * rows > 2 * N
        self.rho = None
        self.tmp = None if self.explicit else H.new_empty(rows, N)

    def set_rho(self, rho: float) -> None:
        if rho == self.rho:
            return
        self.rho = rho
        self.d = (1 / (self.L + rho)).float()  # (N,)
        if self.explicit:
            self.inv = (self.Q * self.d) @ self.QT

    def solve(self, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.explicit:
            return torch.matmul(X, self.inv, out=out)
        torch.matmul(X, self.Q, out=self.tmp).mul_(self.d)
        return torch.matmul(self.tmp, self.QT, out=out)


@contextlib.contextmanager
def single_threaded(device: torch.device):
    """One intra-op thread on CPU for the duration: these loops of many passes over a layer-sized
    matrix ran 2-4x slower (wall and CPU time) on two threads of a shared 2-core machine, and its
    multi-threaded float64 eigendecomposition up to 20x slower (as in `trim`)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def alps_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    row_sparsity: torch.Tensor | None = None,
    cfg: AlpsConfig = AlpsConfig(),
) -> AlpsResult:
    """ALPS on one linear layer: W (D, N), H (N, N) float32 sum of x x^T over calibration tokens.

    `sparsity` is the fraction of zeros over the whole matrix (exactly round(D * N * sparsity));
    `pattern` (N, M) drops N of every M consecutive inputs of a row; `row_sparsity` (D,) sets
    per-row targets (exact counts from `prune_counts`) and overrides `sparsity`.
    Runs in float32 (the eigendecomposition in float64), single-threaded on CPU, deterministic.
    """
    check_target(W, H, sparsity, pattern, row_sparsity)
    project = Projector(W.shape, sparsity, pattern, row_sparsity)
    if project.drop == 0:
        keep = torch.ones_like(W, dtype=torch.bool)
        return AlpsResult(W.clone(), keep, 0, cfg.rho0, "converged", 0, (), 0.0, 0.0, 0)
    with single_threaded(W.device):
        return _alps(W, H.float(), project, cfg)


def _alps(W: torch.Tensor, H: torch.Tensor, project: Projector, cfg: AlpsConfig) -> AlpsResult:
    Hs, s = scale_inputs(H, cfg.damping, damp_first=True)  # (N, N), (N,)
    B0 = W.float() * s  # (D, N) scaled weight
    T = B0 @ Hs  # (D, N) target
    ridge = _Ridge(Hs, W.shape[0], cfg.check_every)
    rho = cfg.rho0
    ridge.set_rho(rho)

    last = project.keep(B0.abs())  # support at the last check
    D_init = B0 * last
    D, V, B = D_init.clone(), torch.zeros_like(B0), B0.clone()
    R, Z, score = torch.empty_like(B0), torch.empty_like(B0), torch.empty_like(B0)
    growing, restarts, changes = False, 0, []
    stop, it = "max_iterations", cfg.max_iterations
    for i in range(cfg.max_iterations):
        torch.add(T, D, alpha=rho, out=R).sub_(V)
        ridge.solve(R, out=B)  # B = (T - V + rho D) (H + rho I)^-1
        torch.add(B, V, alpha=1 / rho, out=Z)
        mask = project.keep(torch.abs(Z, out=score))
        torch.mul(Z, mask.view(torch.uint8), out=D)  # projection of B + V / rho (uint8: 3x faster than bool)
        V.add_(B, alpha=rho).sub_(D, alpha=rho)
        if (i + 1) % cfg.check_every:
            continue
        flipped = int(torch.count_nonzero(mask != last))
        change = flipped / max(project.kept, 1)
        changes.append(change)
        last = mask
        if change > cfg.fast_change:
            growing, rho = True, rho * cfg.fast_growth
        elif change > cfg.mid_change:
            growing, rho = True, rho * cfg.mid_growth
        elif flipped > 0:
            if growing:
                rho *= cfg.slow_growth
            else:
                rho /= cfg.shrink
                restarts += 1
                B.copy_(B0), D.copy_(D_init), V.zero_()
        elif growing:
            stop, it = "converged", i + 1
            break
        else:
            rho /= cfg.shrink
        rho = min(rho, cfg.rho_max)
        ridge.set_rho(rho)
        if i >= cfg.stop_after and change < cfg.stop_change:
            stop, it = "early", i + 1
            break

    mask = project.keep(B.abs())
    B.mul_(mask.view(torch.uint8))
    error_before = relative_error(W, B / s, H)
    B, steps = refit(Hs, T, B, mask, cfg.cg_steps, cfg.cg_rtol)
    W_new = torch.where(mask, B / s, 0)  # pruned entries +0.0
    return AlpsResult(
        weight=W_new.to(W.dtype),
        mask=mask,
        iterations=it,
        rho=rho,
        stop=stop,
        restarts=restarts,
        support_changes=tuple(changes),
        error_before_refit=error_before,
        error_after_refit=relative_error(W, W_new, H),
        cg_steps=steps,
    )
