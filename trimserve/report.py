"""The A/B report: each variant's quality (its manifest) next to its speed (a `trimserve bench` run).

One markdown table with ratios against the full model, plus two PNG charts: quality against
speed with the Pareto front marked, and the latency distributions of every variant. Given the
server's /metrics, the table adds each variant's memory and, where the server shadowed the
baseline, its online fidelity: the mean NLL of the baseline's live answers under the variant and
its top-1 agreement with them.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open

from variants.format import MANIFEST, read_manifest, weight_files
from variants.store import DEFAULT_MODEL, cache_dir, variants_dir

log = logging.getLogger(__name__)

LATENCIES = {"ttft_s": "time to first token", "tpot_s": "time per output token", "e2e_s": "end-to-end latency"}
# Gauges read from the server's /metrics: family -> report key (summed over devices).
MEMORY_FAMILIES = {
    "trimserve_model_weight_bytes": "weight_bytes",
    "trimserve_model_load_rss_bytes": "load_rss_bytes",
    "trimserve_cuda_memory_peak_bytes": "cuda_peak_bytes",
}
MEMORY_COLUMNS = {"weight_bytes": "weights MB", "load_rss_bytes": "load RSS MB", "cuda_peak_bytes": "CUDA peak MB"}


@dataclass(frozen=True)
class VariantQuality:
    """What a variant is and how it scored, from its manifest (or its config for a plain checkpoint)."""

    method: str = ""
    num_layers: int | None = None
    params_total: int | None = None
    params_nonzero: int | None = None
    eval: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    name: str
    quality: VariantQuality
    speed: dict[str, Any]  # the bench JSON's entry for this variant
    memory: dict[str, float]
    fidelity: dict[str, float] = field(default_factory=dict)  # shadow: nll, top1, items


def load_bench(path: Path) -> dict[str, Any]:
    """Read a `trimserve bench --json` file and check the fields the report needs."""
    try:
        bench = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    variants = bench.get("variants") if isinstance(bench, dict) else None
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{path}: no `variants` in this file; is it `trimserve bench --json` output?")
    for name, entry in variants.items():
        missing = {"requests", "errors", "output_tokens_per_s", *LATENCIES} - set(entry)
        if missing:
            raise ValueError(f"{path}: variant {name!r} lacks {sorted(missing)}")
    return bench


def merge_benches(benches: list[dict[str, Any]]) -> dict[str, Any]:
    """One bench per variant (each measured alone) -> one bench holding all their variants."""
    merged = {**benches[0], "variants": {}}
    for bench in benches:
        repeated = set(bench["variants"]) & set(merged["variants"])
        if repeated:
            raise ValueError(f"variants measured by more than one bench file: {sorted(repeated)}")
        merged["variants"].update(bench["variants"])
    return merged


def checkpoint_quality(directory: Path) -> VariantQuality:
    """A variant's manifest, or for a plain checkpoint its layer count and parameter total."""
    if (directory / MANIFEST).is_file():
        m = read_manifest(directory)
        return VariantQuality(m.method, m.num_layers or None, m.params.total, m.params.nonzero, dict(m.eval))
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    total = 0
    for path in weight_files(directory):
        with safe_open(path, framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return VariantQuality("dense", config.get("num_hidden_layers"), total or None, None, {})


def discover(name: str, baseline: str) -> Path | None:
    """Where a variant named in the bench lives when not given: the variants dir, or the default model."""
    candidates = [variants_dir() / name]
    if name == baseline:
        candidates.append(cache_dir() / "models" / DEFAULT_MODEL)
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def scrape(source: str) -> str:
    """The text of a /metrics URL or of a saved scrape."""
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=10) as response:
                return response.read().decode()
        return Path(source).read_text()
    except OSError as err:  # URLError and HTTPError (e.g. 401 with --api-key) are OSErrors
        raise ValueError(f"cannot read metrics from {source}: {err}") from err


def read_memory(text: str) -> dict[str, dict[str, float]]:
    """Per-variant memory gauges from a /metrics page: {variant: {key: bytes}}."""
    memory: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        key = MEMORY_FAMILIES.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            per_variant = memory.setdefault(sample.labels.get("variant", ""), {})
            per_variant[key] = per_variant.get(key, 0.0) + sample.value
    return memory


def read_fidelity(text: str, reference: str) -> dict[str, dict[str, float]]:
    """Shadow figures on `reference`'s answers from a /metrics page: {variant: {nll, top1, items}}
    (means over the scored answers; the reference's own row is its NLL of its own answers)."""
    sums: dict[str, dict[str, float]] = {}
    wanted = {
        "trimserve_shadow_nll_sum": "nll",
        "trimserve_shadow_nll_count": "items",
        "trimserve_shadow_top1_agreement_sum": "top1",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("reference") == reference:
                sums.setdefault(sample.labels["variant"], {})[wanted[sample.name]] = sample.value
    return {
        name: {"nll": s["nll"] / s["items"], "top1": s["top1"] / s["items"], "items": s["items"]}
        for name, s in sums.items()
        if s.get("items")
    }


def build_rows(
    bench: dict[str, Any],
    dirs: dict[str, Path],
    evals: dict[str, dict[str, float]],
    memory: dict[str, dict[str, float]],
    baseline: str,
    fidelity: dict[str, dict[str, float]] | None = None,
) -> list[Row]:
    """One row per benchmarked variant, the baseline first."""
    names = sorted(bench["variants"], key=lambda n: (n != baseline, n))
    if baseline not in names:
        raise ValueError(f"the bench has no variant {baseline!r} to compare against; it has {names}")
    unknown = (set(dirs) | set(evals)) - set(names)
    if unknown:
        raise ValueError(f"given for variants the bench did not measure: {sorted(unknown)}")
    rows = []
    for name in names:
        directory = dirs.get(name) or discover(name, baseline)
        if directory is None:
            log.warning("no checkpoint found for %s: give --variant %s=DIR for its quality", name, name)
            quality = VariantQuality()
        else:
            quality = checkpoint_quality(directory)
        if name in evals:
            quality = VariantQuality(**{**quality.__dict__, "eval": {**quality.eval, **evals[name]}})
        rows.append(Row(name, quality, bench["variants"][name], memory.get(name, {}), (fidelity or {}).get(name, {})))
    return rows


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0 or not math.isfinite(value) or not math.isfinite(base):
        return None
    return value / base


def lower_is_better(metric: str) -> bool:
    return not metric.startswith(("mc_", "acc")) and "acc" not in metric


def pareto_front(points: dict[str, tuple[float, float]], lower_quality_is_better: bool = True) -> list[str]:
    """Names not dominated in (speed: higher is better, quality): sorted by speed."""
    sign = 1.0 if lower_quality_is_better else -1.0

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        (sa, qa), (sb, qb) = a, (b[0], b[1])
        return sa >= sb and sign * qa <= sign * qb and (sa > sb or sign * qa < sign * qb)

    front = [n for n, p in points.items() if not any(dominates(o, p) for m, o in points.items() if m != n)]
    return sorted(front, key=lambda n: points[n][0])


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _ms(entry: dict[str, Any], metric: str, stat: str) -> float | None:
    value = entry.get(metric, {}).get(stat)
    return None if value is None else 1000.0 * value


def markdown_table(rows: list[Row], baseline: str) -> str:
    """The comparison table; `/full` columns divide each variant's figure by the baseline's."""
    base = rows[0]
    metrics = sorted({k for r in rows for k in r.quality.eval})
    header = ["variant", "method", "layers", "non-zero params", "/full"]
    for metric in metrics:
        header += [metric, "/full"]
    header += ["TTFT p50 ms", "TPOT p50 ms", "/full", "e2e p90 ms", "out tok/s", "/full", "errors"]
    memory_keys = [key for key in MEMORY_FAMILIES.values() if any(r.memory.get(key) for r in rows)]
    for key in memory_keys:
        header += [MEMORY_COLUMNS[key], "/full"]
    shadowed = any(r.fidelity for r in rows)
    if shadowed:
        header += ["shadow NLL", "/full", "top-1 agree", "shadowed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        q, s = r.quality, r.speed
        params = q.params_nonzero if q.params_nonzero is not None else q.params_total
        base_params = base.quality.params_nonzero or base.quality.params_total
        cells = [r.name, q.method or "–", _cell(q.num_layers, "d"), "–" if params is None else f"{params / 1e6:.1f}M"]
        cells.append(_cell(ratio(params, base_params), ".2f"))
        for metric in metrics:
            cells += [
                _cell(q.eval.get(metric), ".3g"),
                _cell(ratio(q.eval.get(metric), base.quality.eval.get(metric)), ".2f"),
            ]
        tpot = _ms(s, "tpot_s", "p50")
        cells += [
            _cell(_ms(s, "ttft_s", "p50"), ".1f"),
            _cell(tpot, ".1f"),
            _cell(ratio(tpot, _ms(base.speed, "tpot_s", "p50")), ".2f"),
            _cell(_ms(s, "e2e_s", "p90"), ".0f"),
            _cell(s["output_tokens_per_s"], ".1f"),
            _cell(ratio(s["output_tokens_per_s"], base.speed["output_tokens_per_s"]), ".2f"),
            f"{s['errors']}/{s['requests']}",
        ]
        for key in memory_keys:
            value = r.memory.get(key)
            cells += [_cell(value and value / 1e6, ".0f"), _cell(ratio(value, base.memory.get(key)), ".2f")]
        if shadowed:
            f = r.fidelity
            cells += [
                _cell(f.get("nll"), ".3f"),
                _cell(ratio(f.get("nll"), base.fidelity.get("nll")), ".2f"),
                _cell(f.get("top1"), ".3f"),
                _cell(f.get("items"), ".0f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"Ratios (/full) divide each variant's figure by `{baseline}`'s: below 1 is smaller, faster or lower."
    if shadowed:
        note += (
            f" Shadow columns: `{baseline}`'s live answers rated by each variant (mean token NLL, share of"
            f" tokens that are the variant's top choice); `{baseline}`'s own row is its NLL of its own answers."
        )
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_report(rows: list[Row], bench: dict[str, Any], baseline: str, quality: str | None, out: Path) -> Path:
    """Write report.md, pareto.png and latency.png under `out`; return the markdown path."""
    from trimserve.report_charts import plot_latency, plot_pareto

    out.mkdir(parents=True, exist_ok=True)
    metric = quality or next((m for m in ("ppl_wikitext2",) if any(m in r.quality.eval for r in rows)), None)
    metric = metric or next(iter(sorted({k for r in rows for k in r.quality.eval})), None)
    shown = {k: v for k, v in bench.get("settings", {}).items() if k not in ("url", "models") and v is not None}
    settings = ", ".join(f"{k}={v}" for k, v in shown.items())
    method = bench.get("method") or "each variant measured in its own run, one after another"
    parts = [
        f"# A/B report: {', '.join(r.name for r in rows)}",
        "",
        f"Bench: {bench.get('url', '?')} at {bench.get('started', '?')}; {settings or 'settings not recorded'}.",
        "",
        f"How it measured: {method}.",
        "",
        markdown_table(rows, baseline),
        "![Latency distributions](latency.png)",
    ]
    plot_latency(rows, out / "latency.png")
    if metric is None:
        log.warning("no quality metric in any manifest or --eval file: no Pareto chart")
    else:
        points = {
            r.name: (r.speed["output_tokens_per_s"], r.quality.eval[metric]) for r in rows if metric in r.quality.eval
        }
        front = pareto_front(points, lower_is_better(metric))
        plot_pareto(points, front, metric, lower_is_better(metric), baseline, out / "pareto.png")
        parts += ["", f"![{metric} against output tokens/s](pareto.png)", "", f"Pareto front: {', '.join(front)}."]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
