"""Wanda: S_ij = |W_ij| * ||X_j||_2; every output row drops its lowest-scoring fraction."""

from __future__ import annotations

import torch

from pruning.sparse.masks import nm_mask, uniform_row_mask


def wanda_scores(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """W: (D, N) weight; sq_norms: (N,) sum over calibration tokens of each input feature squared."""
    return W.abs().float() * sq_norms.float().sqrt().unsqueeze(0)


def wanda_mask(
    W: torch.Tensor, sq_norms: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep-mask of W: per row (unstructured) or per group of M inputs (N:M)."""
    scores = wanda_scores(W, sq_norms)
    return nm_mask(scores, *pattern) if pattern else uniform_row_mask(scores, sparsity)
