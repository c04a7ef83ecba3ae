"""PNG charts of depth-pruning scores and TrimLLM trajectories (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_scan(
    block_influence: list[float],
    windows: dict[int, dict[str, list[float]]],
    path: str | Path,
    title: str = "",
    sleb: list[float] | None = None,
) -> Path:
    """Per-layer Block Influence, and per-window cosine / angular distance for each window size."""
    panels = 1 + len(windows) + (sleb is not None)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(block_influence)), block_influence, color="tab:blue")
    ax.set(title="Block Influence per layer (low = removable)", xlabel="layer", ylabel="BI")
    for row, (size, scores) in enumerate(sorted(windows.items()), start=1):
        ax = axes[row][0]
        for name, values in scores.items():
            ax.plot(range(len(values)), values, marker="o", ms=3, label=name)
        ax.set(title=f"windows of {size} layers", xlabel="first layer of window", ylabel="score")
        ax.legend(fontsize=8)
    if sleb is not None:
        ax = axes[-1][0]
        ax.plot(range(1, len(sleb) + 1), sleb, marker="o")
        ax.set(title="SLEB greedy: calibration NLL after each removal", xlabel="layers removed", ylabel="NLL")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_trajectory(trajectory: list[dict], path: str | Path, title: str = "TrimLLM") -> Path:
    """Held-out domain (and tracked, e.g. WikiText-2) perplexity against depth, step by step."""
    fig, ax = plt.subplots(figsize=(8, 4))
    layers = [s["layers"] for s in trajectory]
    ax.plot(layers, [s["heldout_ppl"] for s in trajectory], marker="o", label="domain (held-out)")
    tracked = [(s["layers"], s["tracked_ppl"]) for s in trajectory if s.get("tracked_ppl") is not None]
    if tracked:
        ax.plot(*zip(*tracked, strict=True), marker="s", label="WikiText-2")
    for s in trajectory:
        if s.get("dropped") is not None:
            ax.annotate(
                str(s["dropped"]),
                (s["layers"], s["heldout_ppl"]),
                fontsize=7,
                xytext=(2, 4),
                textcoords="offset points",
            )
    ax.set(xlabel="layers remaining", ylabel="perplexity", yscale="log", title=title)
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
