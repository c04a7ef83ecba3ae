"""Sequential block-wise calibration: score and prune one decoder block at a time.

Calibration windows are embedded once; then each block collects its statistics from inputs
produced by the already-pruned earlier blocks, has every linear pruned by the configured
method, and is run again to produce the next block's inputs (input and output buffers swap).
With `offload`, the model and the hidden-state buffers stay in host memory and only the
current block visits the compute device. OWL needs one extra pass of the dense model first,
to measure each block's outlier ratio (`outlier_ratios`, reusable across sparsities).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning.blocks import capture_block_inputs, decoder_layers, layout_of, linear_layers, run_layers, to_device
from pruning.sparse.admm import AdmmConfig, admm_prune
from pruning.sparse.alps import AlpsConfig, alps_prune
from pruning.sparse.calibration import LayerStats, Needs, collect_stats
from pruning.sparse.magnitude import magnitude_mask
from pruning.sparse.masks import check_pattern, prune_counts, row_ranks, rowwise_mask
from pruning.sparse.owl import OwlConfig, outlier_ratio, owl_sparsities
from pruning.sparse.sparsegpt import sparsegpt_prune
from pruning.sparse.trim import TrimConfig, gram_sketch, trim_allocation
from pruning.sparse.wanda import wanda_mask, wanda_scores

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt", "alps", "admm")
RECONSTRUCTIONS = ("sparsegpt", "alps", "admm")  # methods that also update the kept weights, from X X^T


@dataclass(frozen=True)
class SparseConfig:
    """What to prune and how. `method` scores (and, for sparsegpt, alps and admm, updates) the
    weights; `owl` sets per-block sparsity; `trim` sets per-row sparsity inside each linear."""

    method: str = "wanda"
    sparsity: float = 0.5
    pattern: tuple[int, int] | None = None
    owl: OwlConfig | None = None
    trim: TrimConfig | None = None
    sequential: bool = False  # re-collect inputs inside a block after each group of linears is pruned
    blocksize: int = 128  # SparseGPT column block
    damp: float = 0.01  # SparseGPT dampening, fraction of mean(diag H)
    alps: AlpsConfig | None = None  # method alps (default: the released code's settings)
    admm: AdmmConfig | None = None  # method admm

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown sparsity method {self.method!r}; choose one of {METHODS}")
        for name, default in (("alps", AlpsConfig), ("admm", AdmmConfig)):
            if self.method == name and getattr(self, name) is None:
                object.__setattr__(self, name, default())
            elif self.method != name and getattr(self, name) is not None:
                raise ValueError(f"{name} settings given for method {self.method!r}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            check_pattern(self.pattern)
            if self.trim is not None:
                raise ValueError("an N:M pattern cannot be combined with TRIM (row-varying sparsity is not N:M)")
            if self.owl is not None:
                raise ValueError("an N:M pattern fixes every layer's sparsity; it cannot be combined with OWL")
            if abs(self.sparsity - self.pattern[0] / self.pattern[1]) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern[0]}:{self.pattern[1]} means sparsity {self.pattern[0] / self.pattern[1]}"
                )
        if self.blocksize < 1 or not 0 <= self.damp < 1:
            raise ValueError("SparseGPT blocksize must be positive and damp in [0, 1)")

    @property
    def needs(self) -> Needs:
        trim_all = self.trim is not None and self.trim.tokens == "all"
        return Needs(
            sq_norms=self.method == "wanda" or self.trim is not None,
            gram=self.method in RECONSTRUCTIONS or trim_all,
            last_token=self.trim is not None and not trim_all,
        )

    @property
    def calibrated(self) -> bool:
        """Whether pruning needs calibration data (plain magnitude pruning does not)."""
        return self.owl is not None or self.needs != Needs()

    @property
    def label(self) -> str:
        trim = ("trim[all]" if self.trim.tokens == "all" else "trim") if self.trim else ""
        parts = [p for p in (trim, "owl" if self.owl else "", self.method, "seq" if self.sequential else "") if p]
        amount = f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"{self.sparsity:.0%}"
        return f"{'+'.join(parts)} {amount}"

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings (tuples become lists), as stored in a manifest."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class SparseReport:
    block_sparsity: list[float]
    outlier_ratios: list[float] | None
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # per linear: sparsity, rows, TRIM
    seconds: float = 0.0


def prune_weight(W: torch.Tensor, stats: LayerStats, cfg: SparseConfig, sparsity: float) -> tuple[torch.Tensor, dict]:
    """New weight for one linear (D, N) at the given sparsity, and the choices made (TRIM's step size
    and objective, the ALPS/ADMM solver's iterations and errors).

    Pruned entries become +0.0 (not -0.0), so the compressed format stores no sign bits.
    """
    if sparsity == 0:
        return W, {}
    if cfg.trim is None:
        if cfg.method == "magnitude":
            return W.masked_fill(~magnitude_mask(W, sparsity, cfg.pattern), 0), {}
        if cfg.method == "wanda":
            return W.masked_fill(~wanda_mask(W, stats.sq_norms, sparsity, cfg.pattern), 0), {}
        return reconstruct(W, stats, cfg, sparsity, None)
    # TRIM ranks rows by magnitude or Wanda scores (a reconstruction takes TRIM's allocation from Wanda's).
    scores = W.abs().float() if cfg.method == "magnitude" else wanda_scores(W, stats.sq_norms)
    ranks = row_ranks(scores)
    X = gram_sketch(stats.gram, cfg.trim.sketch) if cfg.trim.tokens == "all" else stats.last_inputs()
    result = trim_allocation(W, X, ranks, sparsity, cfg.trim)
    info = {"lr": result.lr, "objective": result.objective, "uniform_objective": result.uniform_objective}
    if cfg.method in RECONSTRUCTIONS:
        W, solver = reconstruct(W, stats, cfg, sparsity, result.row_sparsity)
        return W, info | solver
    return W.masked_fill(~rowwise_mask(ranks, prune_counts(result.row_sparsity, W.shape[1])), 0), info


def reconstruct(
    W: torch.Tensor, stats: LayerStats, cfg: SparseConfig, sparsity: float, row_sparsity: torch.Tensor | None
) -> tuple[torch.Tensor, dict]:
    """SparseGPT, ALPS or ADMM from the layer's X X^T, at `sparsity` or per-row targets."""
    if cfg.method == "sparsegpt":
        return sparsegpt_prune(W, stats.gram, sparsity, cfg.pattern, row_sparsity, cfg.blocksize, cfg.damp), {}
    solve = alps_prune if cfg.method == "alps" else admm_prune
    result = solve(W, stats.gram, sparsity, cfg.pattern, row_sparsity, cfg.alps or cfg.admm)
    info = {k: v for k, v in result.stats().items() if k != "support_changes"}  # per-check detail stays out
    return result.weight, info


def row_summary(W: torch.Tensor) -> dict[str, float]:
    """Sparsity of a weight and the spread of its per-row sparsities."""
    rows = (W == 0).double().mean(1)  # (D,)
    return {
        "sparsity": float(rows.mean()),
        "row_min": float(rows.min()),
        "row_max": float(rows.max()),
        "row_std": float(rows.std()) if rows.numel() > 1 else 0.0,
    }


def block_lod(stats: dict[str, LayerStats], block: torch.nn.Module, m: float) -> float:
    """OWL's outlier ratio of one block from its Wanda scores."""
    linears = linear_layers(block)
    return outlier_ratio([wanda_scores(linears[n].weight, stats[n].sq_norms) for n in linears], m)


class _Passes:
    """Block inputs, their kwargs, and where blocks compute (shared by every pass)."""

    def __init__(
        self, model: PreTrainedModel, windows: torch.Tensor, device: torch.device, offload: bool, batch_size: int
    ):
        layout_of(model)  # unsupported architectures fail before any work
        self.model, self.device, self.offload, self.batch_size = model, device, offload, batch_size
        self.host = torch.device("cpu") if offload else device
        if not offload:
            model.to(device)
        self.blocks = decoder_layers(model)
        self.inputs, kwargs = capture_block_inputs(model, windows, device=self.host)
        self.kwargs = to_device(kwargs, device)

    def passes(self, desc: str, nsamples: int | None = None):
        """Yield (index, block on device, inputs, output buffer); outputs become the next inputs.

        `nsamples` runs the pass on the first windows only."""
        inputs = self.inputs[:nsamples].clone()
        outputs = torch.empty_like(inputs)
        for i, block in enumerate(tqdm(self.blocks, desc=desc, unit="block")):
            block.to(self.device)
            yield i, block, inputs, outputs
            if self.offload:
                block.to(self.host)
            inputs, outputs = outputs, inputs


@torch.no_grad()
def outlier_ratios(runner: _Passes, owl: OwlConfig) -> list[float]:
    """OWL's LOD of every block, from one pass of the dense model."""
    lod = []
    needs, n = Needs(sq_norms=True), runner.batch_size
    for _, block, inputs, outputs in runner.passes("OWL outliers (dense)", owl.nsamples):
        stats = collect_stats(block, inputs, runner.kwargs, needs, n, runner.device, outputs)
        lod.append(block_lod(stats, block, owl.m))
    return lod


def _groups(block: torch.nn.Module, inputs: torch.Tensor, runner: _Passes) -> list[list[str]]:
    """Linears of a block grouped by shared input (q/k/v, gate/up), in the order they run."""
    probe = collect_stats(block, inputs[:1], runner.kwargs, Needs(), 1, runner.device)
    groups: dict[int, list[str]] = {}
    for name, stats in probe.items():
        groups.setdefault(id(stats), []).append(name)
    return list(groups.values())


@torch.no_grad()
def prune_blocks(runner: _Passes, cfg: SparseConfig, lod: list[float] | None = None) -> SparseReport:
    """Prune every block in place; `lod` reuses OWL outlier ratios measured earlier."""
    start = time.perf_counter()
    if cfg.owl is not None and lod is None:
        lod = outlier_ratios(runner, cfg.owl)
    n = len(runner.blocks)
    targets = owl_sparsities(lod, cfg.sparsity, cfg.owl.lam) if cfg.owl else [cfg.sparsity] * n
    report = SparseReport(block_sparsity=targets, outlier_ratios=lod if cfg.owl else None)
    for i, block, inputs, outputs in runner.passes(f"prune {cfg.label}"):
        for group in _groups(block, inputs, runner) if cfg.sequential else [None]:
            stats = collect_stats(
                block, inputs, runner.kwargs, cfg.needs, runner.batch_size, runner.device, None, group
            )
            _prune_linears(i, block, stats, cfg, targets[i], report)
            del stats
        run_layers([block], inputs, runner.kwargs, runner.batch_size, out=outputs)
    report.seconds = time.perf_counter() - start
    return report


@torch.no_grad()
def _prune_uncalibrated(model: PreTrainedModel, cfg: SparseConfig) -> SparseReport:
    """Plain magnitude pruning: every block in place, no calibration pass needed."""
    start = time.perf_counter()
    blocks = decoder_layers(model)
    report = SparseReport(block_sparsity=[cfg.sparsity] * len(blocks), outlier_ratios=None)
    for i, block in enumerate(tqdm(blocks, desc=f"prune {cfg.label}", unit="block")):
        _prune_linears(i, block, {name: LayerStats() for name in linear_layers(block)}, cfg, cfg.sparsity, report)
    report.seconds = time.perf_counter() - start
    return report


def _prune_linears(
    i: int,
    block: torch.nn.Module,
    stats: dict[str, LayerStats],
    cfg: SparseConfig,
    sparsity: float,
    report: SparseReport,
) -> None:
    """Prune the linears of block i named in `stats` in place and record them in the report."""
    linears = linear_layers(block)
    for name in stats:
        W, info = prune_weight(linears[name].weight.data, stats[name], cfg, sparsity)
        linears[name].weight.data.copy_(W)
        report.layers[f"layers.{i}.{name}"] = row_summary(W) | info


def prune_model(
    model: PreTrainedModel,
    windows: torch.Tensor | None,
    cfg: SparseConfig,
    device: torch.device | str = "cpu",
    offload: bool = False,
    batch_size: int = 8,
    lod: list[float] | None = None,
) -> SparseReport:
    """Prune `model` in place from calibration windows (n, seqlen) token ids; plain magnitude
    pruning needs none and ignores them. `lod`: OWL outlier ratios measured earlier on the same
    windows (`owl_outlier_ratios`), so several sparsities share one dense pass."""
    if not cfg.calibrated:
        if not offload:
            model.to(device)
        return _prune_uncalibrated(model, cfg)
    if windows is None or len(windows) == 0:
        raise ValueError(f"{cfg.label} needs calibration windows")
    return prune_blocks(_Passes(model, windows, torch.device(device), offload, batch_size), cfg, lod)


def owl_outlier_ratios(
    model: PreTrainedModel,
    windows: torch.Tensor,
    owl: OwlConfig,
    device: torch.device | str = "cpu",
    offload: bool = False,
    batch_size: int = 8,
) -> list[float]:
    """OWL's outlier ratio (LOD) of every block of the dense `model` (which stays unchanged)."""
    return outlier_ratios(_Passes(model, windows, torch.device(device), offload, batch_size), owl)
