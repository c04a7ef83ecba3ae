"""The A/B report's charts (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from trimserve.report import Row

PANELS = (("ttft_s", "Time to first token"), ("tpot_s", "Time per output token"), ("e2e_s", "End-to-end latency"))


def plot_pareto(
    points: dict[str, tuple[float, float]],
    front: list[str],
    metric: str,
    lower_is_better: bool,
    baseline: str,
    path: Path,
) -> None:
    """Quality (y) against output tokens/s (x); the Pareto front joined by a line."""
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for name, (speed, quality) in points.items():
        on_front = name in front
        ax.scatter(
            speed,
            quality,
            s=90 if on_front else 50,
            marker="*" if name == baseline else "o",
            color="tab:red" if name == baseline else ("tab:blue" if on_front else "tab:gray"),
            zorder=3,
        )
        label = name
        if name != baseline and baseline in points:
            base_speed, base_quality = points[baseline]
            label += f"\n{speed / base_speed:.2f}x tok/s, {quality / base_quality:.2f}x {metric}"
        rightmost = speed == max(x for x, _ in points.values()) and len(points) > 1
        ax.annotate(
            label,
            (speed, quality),
            textcoords="offset points",
            xytext=(-7, 5) if rightmost else (7, 5),
            ha="right" if rightmost else "left",
            fontsize=8,
        )
    if len(front) > 1:
        xs, ys = zip(*(points[n] for n in front), strict=True)
        ax.step(xs, ys, where="pre", color="tab:blue", linestyle="--", linewidth=1, label="Pareto front", zorder=2)
        ax.legend(loc="best", fontsize=9)
    values = [q for _, q in points.values()]
    if metric.startswith("ppl") and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    better = "lower is better" if lower_is_better else "higher is better"
    ax.set_xlabel("output tokens/s (higher is better)")
    ax.set_ylabel(f"{metric} ({better})")
    ax.set_title(f"Quality against speed ({baseline} = star)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(rows: list[Row], path: Path) -> None:
    """Box plots of each latency's per-request samples, one panel per latency, variants side by side."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 4.2), dpi=120)
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        names = [r.name for r in rows if r.speed.get("samples", {}).get(key)]
        data = [[1000.0 * v for v in r.speed["samples"][key]] for r in rows if r.name in names]
        if data:
            ax.boxplot(data, tick_labels=names, showfliers=False)
            for i, values in enumerate(data, start=1):  # every request, spread sideways so they do not overlap
                offsets = [0.15 * ((j * 0.618) % 1 - 0.5) for j in range(len(values))]
                ax.scatter([i + o for o in offsets], values, s=8, alpha=0.5, color="tab:blue", zorder=3)
            ax.set_ylim(bottom=0)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_ylabel("ms")
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle("Latency per request, by variant")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
