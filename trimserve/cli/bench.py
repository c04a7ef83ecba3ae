"""`trimserve bench URL`: load-test a running server (streamed completions), see `trimserve.loadgen`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="load-test a running server (streamed completions or chat)")
    bench.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    bench.add_argument("--model", action="append", default=[], help="variant or experiment to target (repeat)")
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="several --model: measure them one at a time in this many interleaved rounds (default 3); "
        "0 mixes them in one run",
    )
    bench.add_argument("--concurrency", type=int, default=1)
    bench.add_argument("--rate", type=float, help="arrival rate in requests/s (Poisson) instead of a closed loop")
    bench.add_argument("--requests", type=int, default=16)
    bench.add_argument("--duration", type=float, help="seconds to keep sending (instead of --requests)")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="length of the made-up prompts")
    bench.add_argument(
        "--prompts",
        type=Path,
        help="real prompts instead, cycled: a text file (one per line) or JSON lines with a `prompt` field",
    )
    bench.add_argument("--chat", action="store_true", help="send each prompt as a user message to /v1/chat/completions")
    bench.add_argument("--output-tokens", type=int, default=64)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    bench.add_argument("--api-key")
    bench.add_argument("--timeout", type=float, default=300.0)
    bench.add_argument(
        "--retries", type=int, default=0, help="retry a 429 this many times after its Retry-After (default 0)"
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", type=Path, help="write the results JSON here")
    bench.add_argument("--markdown", type=Path, help="write the markdown table here")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from trimserve.loadgen import LoadConfig, markdown, read_prompts, run_bench

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    config = LoadConfig(
        url=args.url.rstrip("/"),
        models=tuple(args.model) or ("full",),
        concurrency=args.concurrency,
        rate=args.rate,
        requests=args.requests,
        duration_s=args.duration,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        api_key=args.api_key,
        timeout_s=args.timeout,
        retries=args.retries,
        seed=args.seed,
        rounds=args.rounds,
        prompts=read_prompts(args.prompts) if args.prompts else (),
        chat=args.chat,
    )
    summary, _ = run_bench(config)
    table = markdown(summary)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    return 1 if any(v["errors"] for v in summary["variants"].values()) else 0
