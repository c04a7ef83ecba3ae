"""Keep-masks from scores: per-row counts, one threshold per matrix, and N:M groups.

Masks are boolean with True = keep. Scores are (D rows, N inputs); lower scores are pruned first,
and ties are broken by column order (stable sorts), so masks are deterministic.
"""

from __future__ import annotations

import torch


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): prune N of every M consecutive inputs. None or '' -> None."""
    if not text:
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"pattern must look like N:M (e.g. 2:4), not {text!r}") from None
    check_pattern((n, m))
    return n, m


def check_pattern(pattern: tuple[int, int]) -> None:
    n, m = pattern
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")


def prune_counts(row_sparsity: torch.Tensor, n_cols: int) -> torch.Tensor:
    """How many entries each row drops: floor(N * s_i), plus one for the rows with the largest
    remainders until the total equals round(N * sum(s)), so the matrix sparsity is exact.

    row_sparsity: (D,) values in [0, 1] (clamped). Returns (D,) int64 counts in [0, N].
    """
    target = n_cols * row_sparsity.double().clamp(0, 1)  # (D,)
    counts = target.floor()
    deficit = round(target.sum().item()) - int(counts.sum().item())
    if deficit > 0:
        order = (target - counts).argsort(descending=True, stable=True)
        counts[order[:deficit]] += 1
    return counts.long().clamp(0, n_cols)


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Position of every entry in its row's ascending order: (D, N) int64, each row a permutation."""
    order = scores.argsort(dim=1, stable=True)  # (D, N)
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def rowwise_mask(ranks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row i keeps every entry whose rank is at least counts[i] (drops its counts[i] lowest)."""
    return ranks >= counts.unsqueeze(1)


def uniform_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Every row drops the same fraction of its lowest scores (Wanda's comparison group)."""
    rows, cols = scores.shape
    counts = prune_counts(torch.full((rows,), sparsity, dtype=torch.float64), cols)
    return rowwise_mask(row_ranks(scores), counts)


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold for the whole matrix: exactly round(numel * s) lowest scores are dropped."""
    k = round(scores.numel() * sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[scores.flatten().argsort(stable=True)[:k]] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of M consecutive inputs of a row, drop the N lowest scores."""
    check_pattern((n, m))
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    drop = groups.argsort(dim=2, stable=True)[..., :n]  # (D, N/M, n)
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(2, drop, False)
    return keep.view(rows, cols)
