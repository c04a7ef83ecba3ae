"""Magnitude pruning: score |W|, one threshold per whole matrix (or per N:M group)."""

from __future__ import annotations

import torch

from pruning.sparse.masks import matrix_mask, nm_mask


def magnitude_mask(W: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of W (D, N): drop the smallest |W| of the matrix, or N of every M inputs."""
    scores = W.abs()
    return nm_mask(scores, *pattern) if pattern else matrix_mask(scores, sparsity)
