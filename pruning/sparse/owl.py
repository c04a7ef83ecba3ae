"""OWL: layer-wise sparsity from each block's share of outlier Wanda scores.

LOD (layer outlier distribution) of a block = percentage of its Wanda scores (all sub-layers
pooled) above M times their mean. LODs are min-max scaled to [0, 2*lambda] and shifted so their
mean is the target density 1 - S; block sparsity = 1 - density. More outliers, less pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OwlConfig:
    lam: float = 0.08  # half-width of the density range around the target
    m: float = 5.0  # outlier threshold, in multiples of the mean score
    nsamples: int | None = None  # calibration windows for the dense outlier pass (None: all)

    def __post_init__(self) -> None:
        if not 0 <= self.lam < 0.5:
            raise ValueError(f"OWL lambda must be in [0, 0.5), got {self.lam}")
        if self.m <= 0:
            raise ValueError(f"OWL M must be positive, got {self.m}")
        if self.nsamples is not None and self.nsamples < 1:
            raise ValueError(f"OWL nsamples must be positive, got {self.nsamples}")


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Percentage of scores (pooled over a block's sub-layers) above m times their mean."""
    pooled = torch.cat([s.flatten().float() for s in scores])
    return float((pooled > m * pooled.mean()).double().mean() * 100)


def owl_sparsities(lod: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from per-block LOD (mean equals `sparsity`)."""
    ratios = torch.tensor(lod, dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    if len(lod) < 2 or spread == 0:
        return [sparsity] * len(lod)
    density = (ratios - ratios.min()) / spread * (2 * lam)
    density = density - density.mean() + (1 - sparsity)
    return [float(1 - d) for d in density]
