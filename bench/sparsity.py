"""Sparsity benchmark: WikiText-2 perplexity of every method at several sparsities, side by side.

Calibration: C4 sample, `--nsamples` windows of `--seqlen` tokens (seed 0). Evaluation:
WikiText-2 test, windows of 2048 tokens, the first `--eval-windows` of them (or all with
--full-test). Finished rows are cached in the JSON output, so an interrupted run resumes.

    .venv/bin/python bench/sparsity.py \\
        --methods dense wanda --sparsities 0.5 --out bench/out/sparsity.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from evaluation.data import calibration_windows, eval_windows, load_texts, tokenize_joined
from evaluation.evaluate import window_nll
from pruning.sparse.owl import OwlConfig
from pruning.sparse.pipeline import SparseConfig, owl_outlier_ratios, prune_model
from pruning.sparse.trim import TrimConfig
from variants.load import load_model
from variants.store import DEFAULT_MODEL

log = logging.getLogger("bench.sparsity")

OWL = OwlConfig(lam=0.08, m=5)
VARIANTS: dict[str, dict] = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "owl+wanda": {"method": "wanda", "owl": OWL},
    "trim+wanda": {"method": "wanda", "trim": TrimConfig()},
    "trim+owl+wanda": {"method": "wanda", "owl": OWL, "trim": TrimConfig()},
    # improvement candidates
    "trim[all]+owl+wanda": {"method": "wanda", "owl": OWL, "trim": TrimConfig(tokens="all")},
    "owl+sparsegpt": {"method": "sparsegpt", "owl": OWL},
    "trim+owl+sparsegpt": {"method": "sparsegpt", "owl": OWL, "trim": TrimConfig()},
    "trim[all]+owl+sparsegpt": {"method": "sparsegpt", "owl": OWL, "trim": TrimConfig(tokens="all")},
    "owl+wanda+seq": {"method": "wanda", "owl": OWL, "sequential": True},
    "trim+owl+wanda+seq": {"method": "wanda", "owl": OWL, "trim": TrimConfig(), "sequential": True},
    "owl+sparsegpt+seq": {"method": "sparsegpt", "owl": OWL, "sequential": True},
    "trim+owl+sparsegpt+seq": {"method": "sparsegpt", "owl": OWL, "trim": TrimConfig(), "sequential": True},
    # ALPS and ADMM weight reconstructions, alone and under OWL layer ratios and TRIM rows
    "alps": {"method": "alps"},
    "admm": {"method": "admm"},
    "owl+alps": {"method": "alps", "owl": OWL},
    "owl+admm": {"method": "admm", "owl": OWL},
    "trim+alps": {"method": "alps", "trim": TrimConfig()},
    "trim+admm": {"method": "admm", "trim": TrimConfig()},
    "trim+owl+alps": {"method": "alps", "owl": OWL, "trim": TrimConfig()},
    "trim+owl+admm": {"method": "admm", "owl": OWL, "trim": TrimConfig()},
    "owl+alps+seq": {"method": "alps", "owl": OWL, "sequential": True},
    "owl+admm+seq": {"method": "admm", "owl": OWL, "sequential": True},
    "trim+owl+alps+seq": {"method": "alps", "owl": OWL, "trim": TrimConfig(), "sequential": True},
    "trim+owl+admm+seq": {"method": "admm", "owl": OWL, "trim": TrimConfig(), "sequential": True},
}
FULL_TEST = [("dense", "0"), ("wanda", "0.5"), ("trim+owl+alps+seq", "0.7")] + [
    (m, s) for m in ("trim+owl+wanda", "trim+owl+wanda+seq") for s in ("0.7", "0.8")
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", nargs="+", default=["dense", *VARIANTS], help=f"dense, {', '.join(VARIANTS)}")
    p.add_argument("--sparsities", nargs="+", default=["0.5", "0.6", "0.7", "0.8", "2:4"])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument(
        "--full-test",
        action="store_true",
        help=f"only the full-test-set rows among {FULL_TEST} (filtered by --methods and --sparsities)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/out/sparsity.json"))
    p.add_argument("--report", action="store_true", help="print the tables of finished rows and exit")
    args = p.parse_args(argv)
    unknown = set(args.methods) - {"dense", *VARIANTS}
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: dense, {', '.join(VARIANTS)}")
    return args


def make_config(variant: str, sparsity: str) -> SparseConfig | None:
    """None when the combination does not exist (N:M with OWL or TRIM)."""
    spec = dict(VARIANTS[variant])
    if ":" in sparsity:
        if "owl" in spec or "trim" in spec:
            return None
        n, m = (int(x) for x in sparsity.split(":"))
        return SparseConfig(sparsity=n / m, pattern=(n, m), **spec)
    return SparseConfig(sparsity=float(sparsity), **spec)


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.full_test:
        return [(m, s) for m, s in FULL_TEST if m in args.methods and (m == "dense" or s in args.sparsities)]
    rows = [("dense", "0")] if "dense" in args.methods else []
    return rows + [(m, s) for m in args.methods if m != "dense" for s in args.sparsities if make_config(m, s)]


def row_key(method: str, sparsity: str, args: argparse.Namespace) -> str:
    windows = "full" if args.full_test else f"w{args.eval_windows}"
    calib = "" if method == "dense" else f" n{args.nsamples}x{args.seqlen}" + (f" seed{args.seed}" if args.seed else "")
    return f"{method} {sparsity}{calib} {windows}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    if args.report:
        print(table(results) + "\n\n" + pivot(results))
        return 0
    todo = [(m, s) for m, s in plan(args) if row_key(m, s, args) not in results["rows"]]
    log.info("%d rows to run: %s", len(todo), todo)
    if not todo:
        print(table(results))
        return 0
    model, tokenizer = load_model(args.model, "fp32", "cpu")
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    wiki = eval_windows(tokenize_joined(load_texts("wikitext2"), tokenizer), args.eval_seqlen)
    wiki = wiki if args.full_test else wiki[: args.eval_windows]
    calib = calibration_windows(load_texts("c4"), tokenizer, args.nsamples, args.seqlen, args.seed)
    lods = results.setdefault("owl_lod", {})  # dense OWL pass, cached across runs: key -> {lod, seconds}
    for method, sparsity in todo:
        model.load_state_dict(dense_state)
        row = {"method": method, "sparsity": sparsity, "nsamples": args.nsamples, "seqlen": args.seqlen}
        if method != "dense":
            cfg = make_config(method, sparsity)
            start = time.perf_counter()
            lod_key = f"n{args.nsamples}x{args.seqlen} seed{args.seed} m{OWL.m}"
            reused = bool(cfg.owl) and lod_key in lods
            if cfg.owl and not reused:
                lod = owl_outlier_ratios(model, calib, cfg.owl, batch_size=args.batch_size)
                lods[lod_key] = {"lod": lod, "seconds": time.perf_counter() - start}
            lod = lods[lod_key]["lod"] if cfg.owl else None
            report = prune_model(model, calib if cfg.calibrated else None, cfg, batch_size=args.batch_size, lod=lod)
            # The dense OWL pass runs once and is reused; its time counts in every OWL row.
            row["owl_pass_s"] = lods[lod_key]["seconds"] if cfg.owl else 0.0
            row["prune_s"] = time.perf_counter() - start + (row["owl_pass_s"] if reused else 0.0)
            row["settings"] = cfg.settings()
            zeros = [v["sparsity"] for v in report.layers.values()]
            row["mean_linear_sparsity"] = sum(zeros) / len(zeros)
            lrs = [v["lr"] for v in report.layers.values() if "lr" in v]
            if lrs:
                row["trim_lrs"] = {str(lr): lrs.count(lr) for lr in sorted(set(lrs))}
        start = time.perf_counter()
        row["ppl"] = math.exp(window_nll(model, wiki, desc=f"ppl {method} {sparsity}"))
        row["eval_s"] = time.perf_counter() - start
        row["eval_windows"], row["eval_seqlen"] = len(wiki), args.eval_seqlen
        row["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        row["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        results["rows"][row_key(method, sparsity, args)] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.out)
        log.info(
            "%s: ppl %.2f (prune %.0f s, eval %.0f s)",
            row_key(method, sparsity, args),
            row["ppl"],
            row.get("prune_s", 0),
            row["eval_s"],
        )
    print(table(results))
    return 0


def pivot(results: dict, windows: str = "w16", nsamples: str = "n128x512") -> str:
    """Method x sparsity perplexity grid of the benchmark matrix; cells not run say so."""
    columns = ["0.5", "0.6", "0.7", "0.8", "2:4"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    dense = results["rows"].get(f"dense 0 {windows}")
    lines.append("| dense | " + " | ".join([f"{dense['ppl']:.1f}" if dense else "not run"] * len(columns)) + " |")
    for method in VARIANTS:
        cells = []
        for sparsity in columns:
            row = results["rows"].get(f"{method} {sparsity} {nsamples} {windows}")
            cells.append("-" if make_config(method, sparsity) is None else f"{row['ppl']:.1f}" if row else "not run")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = [
        "| method | sparsity | calibration | eval windows | WikiText-2 ppl | prune s | eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"].values():
        calib = "-" if row["method"] in ("dense", "magnitude") else f"{row['nsamples']}x{row['seqlen']} C4"
        lines.append(
            f"| {row['method']} | {row['sparsity']} | {calib} | {row['eval_windows']} x {row['eval_seqlen']} "
            f"| {row['ppl']:.2f} "
            f"| {row.get('prune_s', 0):.0f} | {row['eval_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
