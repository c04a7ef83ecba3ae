"""ADMM pruning: a cheap ADMM weight update with gradual mask selection (Boza, arXiv 2401.02938).

Following the released code (fmfi-compbio/admm-pruning), for one linear layer:
1. Scale: s = sqrt(diag H) + 1e-8; H <- H / (s s^T) + damping * mean(diag) * I; work on B = W * s,
   target T = B0 H (so the damping pulls the weights towards the dense ones).
2. Invert H + rho I once (rho fixed).
3. With U = 0, iterate: Z = (B + U) restricted to the mask; U += B - Z; B = (T + rho (Z - U)) (H + rho I)^-1.
   During the first `mask_iterations` iterations the mask is re-chosen from |B + U| (the scaled
   weights, i.e. a Wanda-like score of the current solution) before Z: with `gradual`, at the
   cubic schedule s_t = s (1 - (1 - (t + 1) / mask_iterations)^3), reaching the target at the last
   mask iteration (the paper's gradual pruning); otherwise at the target every time (what the
   released code does for unstructured sparsity). Then the mask is frozen.
4. Z = (B + U) on the frozen mask, refit on that support by conjugate gradient (the least-squares
   solve on the support), unscale by s.
Without mask iterations the mask is chosen once from |B0| (magnitude of the scaled weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pruning.sparse.alps import Projector, check_target, refit, relative_error, scale_inputs


@dataclass(frozen=True)
class AdmmConfig:
    iterations: int = 20
    mask_iterations: int = 15  # the mask is re-chosen during these first iterations, then frozen
    gradual: bool = True  # cubic sparsity ramp over the mask iterations
    rho: float = 1.0
    damping: float = 0.1  # fraction of the scaled H's mean diagonal (released code: 0.1)
    refit_steps: int = 30  # CG steps of the final solve on the support; 0 returns ADMM's Z
    refit_rtol: float = 1e-4

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"ADMM iterations must be positive, got {self.iterations}")
        if not 0 <= self.mask_iterations <= self.iterations:
            raise ValueError(f"ADMM mask_iterations must be in [0, iterations], got {self.mask_iterations}")
        if not self.rho > 0:
            raise ValueError(f"ADMM rho must be positive, got {self.rho}")
        if not 0 <= self.damping < 1:
            raise ValueError(f"ADMM damping must be in [0, 1), got {self.damping}")
        if self.refit_steps < 0 or not self.refit_rtol > 0:
            raise ValueError("ADMM refit_steps must be non-negative and refit_rtol positive")


@dataclass(frozen=True)
class AdmmResult:
    weight: torch.Tensor  # (D, N) new weight, dtype of the input weight
    mask: torch.Tensor  # (D, N) bool, True = keep
    iterations: int
    error_before_refit: float  # ||X W' - X W||^2 / ||X W||^2 on the undamped H
    error_after_refit: float
    refit_steps: int  # CG steps run

    def stats(self) -> dict[str, Any]:
        """JSON-ready statistics for a manifest (no tensors)."""
        return {
            "iterations": self.iterations,
            "error_before_refit": self.error_before_refit,
            "error_after_refit": self.error_after_refit,
            "refit_steps": self.refit_steps,
        }


def ramp(t: int, mask_iterations: int) -> float:
    """Share of the target zeros at mask iteration t (0-based): 1 - (1 - (t + 1) / k)^3."""
    return 1 - (1 - (t + 1) / mask_iterations) ** 3


@torch.no_grad()
def admm_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    row_sparsity: torch.Tensor | None = None,
    cfg: AdmmConfig = AdmmConfig(),
) -> AdmmResult:
    """ADMM pruning of one linear layer: W (D, N), H (N, N) float32 sum of x x^T over calibration tokens.

    Targets as in `alps_prune`: `sparsity` over the whole matrix (exact count), `pattern` (N, M)
    per group of M inputs, or `row_sparsity` (D,) exact per-row counts. Float32, deterministic.
    """
    check_target(W, H, sparsity, pattern, row_sparsity)
    project = Projector(W.shape, sparsity, pattern, row_sparsity)
    if project.drop == 0:
        return AdmmResult(W.clone(), torch.ones_like(W, dtype=torch.bool), 0, 0.0, 0.0, 0)
    Hs, s = scale_inputs(H, cfg.damping, damp_first=False)  # (N, N), (N,)
    B0 = W.float() * s  # (D, N)
    T = B0 @ Hs  # (D, N)
    A = Hs.clone()
    A.diagonal().add_(cfg.rho)
    Ainv = torch.cholesky_inverse(torch.linalg.cholesky(A))  # (N, N)

    B, U = B0.clone(), torch.zeros_like(B0)
    Z, R = torch.empty_like(B0), torch.empty_like(B0)
    mask = project.keep(B0.abs())
    for t in range(cfg.iterations):
        torch.add(B, U, out=Z)
        if t < cfg.mask_iterations:
            mask = project.keep(Z.abs(), ramp(t, cfg.mask_iterations) if cfg.gradual else 1.0)
        Z.mul_(mask)
        U.add_(B).sub_(Z)
        torch.sub(Z, U, out=R).mul_(cfg.rho).add_(T)
        torch.matmul(R, Ainv, out=B)  # B = (T + rho (Z - U)) (H + rho I)^-1
    Z = (B + U) * mask
    error_before = relative_error(W, Z / s, H.float())
    Z, steps = refit(Hs, T, Z, mask, cfg.refit_steps, cfg.refit_rtol)
    W_new = torch.where(mask, Z / s, 0)  # pruned entries +0.0
    return AdmmResult(
        weight=W_new.to(W.dtype),
        mask=mask,
        iterations=cfg.iterations,
        error_before_refit=error_before,
        error_after_refit=relative_error(W, W_new, H.float()),
        refit_steps=steps,
    )
