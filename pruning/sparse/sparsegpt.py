"""SparseGPT: prune column blocks with the OBS criterion and update the remaining weights.

H = X X^T / n over the calibration tokens of the layer, dampened by `damp` times its mean
diagonal; the upper Cholesky factor of H^-1 drives the error propagation. In each block of
`blocksize` columns, entries with the lowest w^2 / [H^-1]_jj^2 are pruned (per block jointly,
per row when row sparsities are given, or N of every M columns) and the pruning error of
each column is pushed onto the columns after it.
"""

from __future__ import annotations

import torch

from pruning.sparse.masks import check_pattern, prune_counts


def _hinv_cholesky(H: torch.Tensor, W: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead inputs get W[:, j] = 0."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _block_prune_mask(
    scores: torch.Tensor, sparsity: float, row_counts: torch.Tensor | None, done: torch.Tensor | None
) -> torch.Tensor:
    """Prune-mask (True = prune) of one column block from its OBS scores (D, B)."""
    if row_counts is None:  # one threshold per block, exact count
        k = round(scores.numel() * sparsity)
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        mask[scores.flatten().argsort(stable=True)[:k]] = True
        return mask.view_as(scores)
    ranks = torch.empty_like(order := scores.argsort(dim=1, stable=True))
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks < (row_counts - done).unsqueeze(1)


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    row_sparsity: torch.Tensor | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """New weight (D, N) with the requested zeros and OBS-updated survivors.

    H: (N, N) float32 input Gram matrix. row_sparsity: optional (D,) per-row targets (e.g. from
    TRIM); each row's total then equals `prune_counts` of it, spread evenly over the blocks.
    """
    if pattern:
        check_pattern(pattern)
        if W.shape[1] % pattern[1]:
            raise ValueError(f"N:M pattern needs the input size ({W.shape[1]}) to be a multiple of {pattern[1]}")
    dtype = W.dtype
    W = W.float().clone()  # (D, N)
    cols = W.shape[1]
    Hinv = _hinv_cholesky(H.float(), W, damp)  # (N, N) upper
    totals = prune_counts(row_sparsity, cols) if row_sparsity is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (D, B)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (B,)
        if pattern:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            # Cumulative allocation: rows reach exactly totals[i] zeros by the last block.
            row_counts = (totals * i2 + cols - 1) // cols if totals is not None else None
            done = (totals * i1 + cols - 1) // cols if totals is not None else None
            mask1 = _block_prune_mask(W1**2 / d.unsqueeze(0) ** 2, sparsity, row_counts, done)
        for i in range(i2 - i1):
            w = W1[:, i]
            if pattern and i % pattern[1] == 0:
                n, m = pattern
                tmp = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False, sorted=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d[i]
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(dtype)
