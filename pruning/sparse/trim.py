"""TRIM: row-wise iterative sparsity allocation for one linear layer.

Rows are ranked once by a base score (Wanda or magnitude); row i with sparsity s_i drops its
floor(N * s_i) lowest entries (largest remainders round the total to exact). From uniform s = T,
each step measures how well each row's output is kept, q_i = cos(Y_i, Y_hat_i), min-max
normalises q, and moves sparsity towards well-kept rows: s += 2 * lr * (q_norm - mean(q_norm)),
clamped to [0, max_row_sparsity] and re-centred on T. The layer objective is the cosine of the
flattened Y and Y_hat (fp64); the best strictly improving allocation is kept. Step sizes are
tried in increasing order until a larger one stops helping; negative ones only if no positive
one beats uniform. TRIM is therefore never worse than uniform on its calibration objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning.sparse.masks import prune_counts, rowwise_mask


@dataclass(frozen=True)
class TrimConfig:
    lrs: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16)
    negative_lrs: tuple[float, ...] = (-0.01, -0.02, -0.04)
    steps: int = 10
    max_row_sparsity: float = 0.95
    tokens: str = "last"  # "last": each sequence's last token (released code); "all": every token
    sketch: int = 256  # columns of the all-token sketch (top eigenvectors of X X^T)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TRIM steps must be positive, got {self.steps}")
        if not 0 < self.max_row_sparsity <= 1:
            raise ValueError(f"TRIM max row sparsity must be in (0, 1], got {self.max_row_sparsity}")
        if self.tokens not in ("last", "all"):
            raise ValueError(f"TRIM tokens must be 'last' or 'all', not {self.tokens!r}")
        if self.sketch < 1:
            raise ValueError(f"TRIM sketch must be positive, got {self.sketch}")


@dataclass(frozen=True)
class TrimResult:
    row_sparsity: torch.Tensor  # (D,) float64, mean = target
    lr: float  # chosen step size; 0.0 = uniform kept
    objective: float  # cosine(Y, Y_hat) of the chosen allocation
    uniform_objective: float


def gram_sketch(H: torch.Tensor, columns: int) -> torch.Tensor:
    """X_s (N, r) with X_s X_s^T = the best rank-r approximation of H = X X^T (all tokens)."""
    eigvals, eigvecs = torch.linalg.eigh(H.double())  # ascending
    r = min(columns, H.shape[0])
    top = eigvals[-r:].clamp_min(0).sqrt()
    return (eigvecs[:, -r:] * top).float()  # (N, r)


def _row_cosine(Y: torch.Tensor, Y_hat: torch.Tensor) -> torch.Tensor:
    dots = (Y * Y_hat).sum(1)
    return dots / (Y.norm(dim=1) * Y_hat.norm(dim=1)).clamp_min(1e-30)


def _cosine(Y: torch.Tensor, Y_hat: torch.Tensor) -> float:
    return float((Y * Y_hat).sum() / (Y.norm() * Y_hat.norm()).clamp_min(1e-30))


def trim_allocation(
    W: torch.Tensor, X: torch.Tensor, ranks: torch.Tensor, target: float, cfg: TrimConfig
) -> TrimResult:
    """Per-row sparsities for W (D, N) given calibration inputs X (N, c) and row ranks (D, N).

    The loop runs many small tensor operations, which are faster on one CPU thread than on
    several competing ones, so it runs single-threaded on CPU.
    """
    threads = torch.get_num_threads()
    if W.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _allocate(W, X, ranks, target, cfg)
    finally:
        torch.set_num_threads(threads)


def _allocate(W: torch.Tensor, X: torch.Tensor, ranks: torch.Tensor, target: float, cfg: TrimConfig) -> TrimResult:
    rows, cols = W.shape
    W32, X32 = W.float(), X.float()
    Y = (W32 @ X32).double()  # (D, c) dense outputs

    def outputs(s: torch.Tensor) -> torch.Tensor:
        keep = rowwise_mask(ranks, prune_counts(s, cols))
        return ((W32 * keep) @ X32).double()

    uniform = torch.full((rows,), target, dtype=torch.float64)
    Y_uniform = outputs(uniform)
    best = TrimResult(uniform, 0.0, _cosine(Y, Y_uniform), _cosine(Y, Y_uniform))

    def run(lr: float) -> TrimResult:
        s, Y_hat = uniform.clone(), Y_uniform
        found = TrimResult(uniform, lr, best.uniform_objective, best.uniform_objective)
        for _ in range(cfg.steps):
            q = _row_cosine(Y, Y_hat)
            spread = q.max() - q.min()
            if spread <= 0:
                break
            step = 2 * lr * (q - q.min()) / spread
            s = (s + step - step.mean()).clamp(0, cfg.max_row_sparsity)
            s = s - s.mean() + target
            Y_hat = outputs(s)
            objective = _cosine(Y, Y_hat)
            if objective > found.objective:
                found = TrimResult(s.clone(), lr, objective, best.uniform_objective)
        return found

    for lrs in (cfg.lrs, cfg.negative_lrs):
        for lr in lrs:
            result = run(lr)
            if result.objective <= best.objective:
                break
            best = result
        if best.lr != 0.0:
            break
    return best
