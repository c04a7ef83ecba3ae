"""`trimserve report`: variant manifests and bench runs combined into the A/B report (`trimserve.report`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trimserve.report import (
    build_rows,
    load_bench,
    markdown_table,
    merge_benches,
    read_fidelity,
    read_memory,
    scrape,
    write_report,
)
from variants.store import DEFAULT_MODEL


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects NAME=PATH, got {item!r}")
        pairs[name] = value
    return pairs


def register(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report",
        help="combine variant manifests and a bench run into a markdown table and charts",
        description="Variants not given with --variant are looked up by their bench name in the variants "
        f"directory ($TRIMSERVE_CACHE/variants); the baseline falls back to the cached {DEFAULT_MODEL}.",
    )
    report.add_argument(
        "--bench",
        type=Path,
        action="append",
        required=True,
        help="a `trimserve bench --json` file (repeat to combine per-variant runs)",
    )
    report.add_argument("--variant", action="append", default=[], metavar="NAME=DIR", help="a variant's checkpoint")
    report.add_argument("--eval", action="append", default=[], metavar="NAME=JSON", help="`trimserve eval --json` file")
    report.add_argument(
        "--metrics",
        default=None,
        metavar="URL|FILE",
        help="the server's /metrics: adds memory and, from a server run with --shadow, online fidelity",
    )
    report.add_argument("--baseline", default="full", help="the variant ratios are taken against (default full)")
    report.add_argument("--quality", default=None, help="Pareto chart's quality metric (default ppl_wikitext2)")
    report.add_argument("--out", type=Path, default=Path("out/report"), help="output directory (default out/report)")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    bench = merge_benches([load_bench(path) for path in args.bench])
    dirs = {name: Path(d).expanduser() for name, d in _pairs(args.variant, "--variant").items()}
    for name, directory in dirs.items():
        if not (directory / "config.json").is_file():
            raise ValueError(f"--variant {name}: {directory} is not a model checkpoint (no config.json)")
    evals = {}
    for name, file in _pairs(args.eval, "--eval").items():
        scores = json.loads(Path(file).read_text())
        evals[name] = {k: float(v) for k, v in scores.items() if isinstance(v, int | float)}
    text = scrape(args.metrics) if args.metrics else ""
    rows = build_rows(bench, dirs, evals, read_memory(text), args.baseline, read_fidelity(text, args.baseline))
    path = write_report(rows, bench, args.baseline, args.quality, args.out)
    print(markdown_table(rows, args.baseline))
    print(f"report: {path}")
    return 0
