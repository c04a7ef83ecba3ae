"""Long differential run of the engine on the default model (the test suite runs a small one).

Seeded random schedules (`service.engine.traffic`): prompts across the KV-cache growth steps up
to the context limit, mixed output lengths, greedy and extreme sampled requests, staggered
arrivals and cancellations. Every greedy answer is compared with the same request decoded alone
on the same engine afterwards; an answer that differs still counts as correct when each of its
tokens was the greedy choice up to a rounding tie (teacher-forced through the model, within
`common.TIE_LOGITS`), as batched bf16 matrix products round differently from batch-1 ones. Also
reported: errors, hung requests and the running/waiting counts after each schedule.

    .venv/bin/python bench/engine_traffic.py --dtype bf16 --seeds 0 1 2 --requests 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from service.engine.engine import LLMEngine
from service.engine.traffic import Outcome, PlannedRequest, drive, expected_length, random_schedule
from service.engine.types import EngineConfig
from variants.load import load_model
from variants.store import DEFAULT_MODEL

from common import TIE_LOGITS, machine, token_margin

log = logging.getLogger("bench.engine_traffic")


def alone_request(o: Outcome, max_seq: int) -> PlannedRequest:
    """The same greedy request, sent alone and read as far as the original was."""
    n = len(o.tokens) if o.cancelled else expected_length(o.planned, max_seq)
    return replace(
        o.planned,
        request_id=f"{o.planned.request_id}-alone",
        params=replace(o.planned.params, max_tokens=n),
        arrive_after_s=0.0,
        cancel_after=None,
    )


async def run_schedule(engine: LLMEngine, schedule: list[PlannedRequest]) -> dict:
    started = time.perf_counter()
    outcomes = await drive(engine, schedule, timeout_s=1800)
    seconds = time.perf_counter() - started
    for _ in range(500):  # slots of cancelled requests free at the worker's next step
        if engine.num_running == 0 and engine.num_waiting == 0:
            break
        await asyncio.sleep(0.01)
    gauges = {"running": engine.num_running, "waiting": engine.num_waiting}
    references = {}
    for o in outcomes:
        if o.planned.greedy and o.tokens and o.error is None:
            alone = (await drive(engine, [alone_request(o, engine.runner.max_seq)], timeout_s=600))[0]
            references[o.planned.request_id] = alone.tokens
    return {"outcomes": outcomes, "references": references, "gauges": gauges, "seconds": seconds}


def judge(model, run: dict, max_seq: int) -> dict:
    """Counts for one schedule: exact, greedy up to ties, wrong, errors, hung, short."""
    counts = {"requests": 0, "greedy": 0, "exact": 0, "ties": 0, "wrong": 0, "errors": 0, "hung": 0, "short": 0}
    largest_tie = 0.0
    for o in run["outcomes"]:
        counts["requests"] += 1
        if o.error == "hung":
            counts["hung"] += 1
            continue
        if o.error is not None:
            counts["errors"] += 1
            continue
        if not o.cancelled and len(o.tokens) != expected_length(o.planned, max_seq):
            counts["short"] += 1
        if not (o.planned.greedy and o.tokens):
            continue
        counts["greedy"] += 1
        if o.tokens == run["references"][o.planned.request_id]:
            counts["exact"] += 1
            continue
        margin = token_margin(model, o.planned.prompt, o.tokens)
        if margin <= TIE_LOGITS:
            counts["ties"] += 1
            largest_tie = max(largest_tie, margin)
        else:
            counts["wrong"] += 1
    return {**counts, "largest_tie_margin": largest_tie, "gauges_after": run["gauges"], "seconds": run["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--requests", type=int, default=96, help="requests per schedule")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--spread", type=float, default=20.0, help="seconds over which requests arrive")
    parser.add_argument("--out", type=Path, default=Path("bench/out/engine-traffic"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=args.dtype)
    config = EngineConfig(
        max_batch_size=args.batch,
        max_queue=args.requests,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        request_timeout_s=1800,
    )

    async def all_seeds() -> dict[int, dict]:
        engine = LLMEngine("traffic", model, tokenizer, config)
        await engine.start()
        runs = {}
        for seed in args.seeds:
            log.info("schedule %d: %d requests", seed, args.requests)
            schedule = random_schedule(
                seed, args.requests, engine.vocab_size, args.max_prompt_tokens, args.max_tokens, spread_s=args.spread
            )
            runs[seed] = await run_schedule(engine, schedule)
        await engine.shutdown(1.0)
        return runs, engine.runner.max_seq

    runs, max_seq = asyncio.run(all_seeds())
    results = {seed: judge(model, run, max_seq) for seed, run in runs.items()}
    report = {"machine": machine(), "command": " ".join(sys.argv), "dtype": args.dtype, "seeds": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_traffic.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = ("requests", "greedy", "exact", "ties", "wrong", "errors", "hung", "short")
    print("| seed | " + " | ".join(keys) + " | largest tie | running/waiting after | s |")
    print("|---" * (len(keys) + 4) + "|")
    for seed, r in results.items():
        gauges = f"{r['gauges_after']['running']}/{r['gauges_after']['waiting']}"
        cells = " | ".join(str(r[k]) for k in keys)
        print(f"| {seed} | {cells} | {r['largest_tie_margin']:.3f} | {gauges} | {r['seconds']:.0f} |")
    bad = sum(r["wrong"] + r["errors"] + r["hung"] + r["short"] for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
