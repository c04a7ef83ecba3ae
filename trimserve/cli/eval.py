"""`trimserve eval MODEL --ppl SOURCE --mc SET`: perplexity and multiple-choice accuracy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.data import NAMED_SOURCES
from evaluation.evaluate import evaluate, load_eval_data
from variants.format import MANIFEST, record_eval
from variants.load import DEVICES, DTYPES, EMBEDDED, load_model


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="fp32", choices=sorted(set(DTYPES)), help="weights dtype (default fp32)")
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="compute device (default cpu)")


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="perplexity and multiple-choice accuracy of a model",
        description="MODEL is a directory, a .gguf file, a hub id, or a built-in alias "
        f"({', '.join(EMBEDDED)}). Named text sources (shipped): {', '.join(NAMED_SOURCES)}; hub:NAME reads the "
        "full set from the Hugging Face hub (pip install 'trimserve[hub]'); or a .txt/.jsonl[:field] path.",
    )
    ev.add_argument("model")
    ev.add_argument("--ppl", action="append", default=[], metavar="SOURCE", help="perplexity source (repeatable)")
    ev.add_argument(
        "--mc", action="append", default=[], metavar="SET", help="pubmedqa|medqa|medmcqa|mmlu[:subj,..], or hub:SET"
    )
    ev.add_argument("--seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    ev.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ev.add_argument(
        "--mc-limit",
        type=int,
        default=None,
        help="score only the first N questions of each set (of each subject for MMLU)",
    )
    ev.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    ev.add_argument("--no-record", action="store_true", help="do not add the results to a variant's trimserve.json")
    add_model_options(ev)
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if not args.ppl and not args.mc:
        raise ValueError("nothing to evaluate: give --ppl SOURCE and/or --mc SET")
    if args.seqlen < 2:
        raise ValueError("--seqlen must be at least 2")
    data = load_eval_data(args.ppl, args.mc, args.mc_limit)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    results = evaluate(model, tokenizer, seqlen=args.seqlen, max_windows=args.max_windows, data=data)
    print(format_table(args.model, results, args.seqlen, args.max_windows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_record and (Path(args.model) / MANIFEST).is_file():
        record_eval(args.model, results, {"seqlen": args.seqlen, "max_windows": args.max_windows})
    return 0


def format_table(model: str, results: dict[str, float], seqlen: int, max_windows: int | None) -> str:
    windows = f"first {max_windows} windows" if max_windows else "all windows"
    rows = [f"| metric | {model} |", "|---|---|"]
    rows += [f"| {key} | {value:.4f} |" for key, value in results.items()]
    return "\n".join(rows) + f"\n(perplexity: seqlen {seqlen}, {windows})"
