"""Engine micro-benchmark: plain `model.generate` against LLMEngine at concurrency 1 and 8.

No HTTP: the engine is driven in-process, so the numbers isolate the engine's own per-token cost.
Workload as in bench/serving.py: ~128-token prompts (random ids, unique per request), 64 greedy
tokens, EOS ignored. TPOT = (last token time - first token time) / (tokens - 1).

    .venv/bin/python bench/engine.py --dtype bf16 fp32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from service.backend import SamplingParams
from service.engine.compute import run_sync
from service.engine.engine import LLMEngine, make_runner
from service.engine.types import EngineConfig
from variants.load import load_model
from variants.store import DEFAULT_MODEL

from common import generate_speed

log = logging.getLogger("bench.engine")


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(n)]


@torch.inference_mode()
def step_cpu_ms(model, prompt: list[int], repeats: int = 12) -> dict:
    """Median thread CPU time of one decode step: HF forward with a DynamicCache vs the engine runner.

    Runs on one intra-op thread, so the work stays on this thread and `thread_time` sees all of
    it: a measure that other processes on a shared machine disturb far less than wall time.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def median_ms(step, n: int = repeats) -> float:
        step(0)
        times = []
        for i in range(n):
            t = time.thread_time()
            step(i + 1)
            times.append(time.thread_time() - t)
        return 1e3 * statistics.median(times)

    try:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1)
        token = torch.tensor([[5]])
        out = {
            "hf_forward_b1": median_ms(lambda i: model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1))
        }
        runner = make_runner(model, 8, 2 * len(prompt) + repeats)
        for slot in range(8):
            runner.prefill(slot, prompt)
        for b in (1, 8):
            tokens = torch.full((b,), 5)
            out[f"engine_decode_b{b}"] = median_ms(
                lambda i, t=tokens: runner.decode(t, torch.full_like(t, len(prompt) + i))
            )
        out["engine_prefill"] = median_ms(lambda i: runner.prefill(0, prompt), n=3)
        return out
    finally:
        torch.set_num_threads(threads)


async def _one(engine: LLMEngine, prompt: list[int], params: SamplingParams, rid: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = start
    n = 0
    async for _event in engine.generate(prompt, params, rid):
        last = time.perf_counter()
        if n == 0:
            first = last
        n += 1
    return first - start, (last - first) / max(n - 1, 1), n


async def bench_engine(model, tokenizer, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    config = EngineConfig(max_batch_size=max(concurrency, 2))
    engine = LLMEngine("bench", model, tokenizer, config)
    t = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t
    await _one(engine, prompts[0], params, "warm-up")
    pending = list(enumerate(prompts))
    results = []

    async def client() -> None:  # closed loop: send the next request as soon as one finishes
        while pending:
            i, prompt = pending.pop(0)
            results.append(await _one(engine, prompt, params, f"r{i}"))

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t
    await engine.shutdown(5.0)
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "start_s": start_s,
        "ttft_ms": 1e3 * statistics.median(r[0] for r in results),
        "tpot_ms": 1e3 * statistics.median(r[1] for r in results),
        "tokens_per_s": tokens / wall,
        "runner": type(engine.runner).__name__,
    }


def run(model_name: str, dtype: str, prompt_tokens: int, new_tokens: int, requests: int) -> dict:
    # All torch work on the engine's compute thread, as in the server: a second thread's OpenMP team
    # would oversubscribe the cores and slow every step after it.
    model, tokenizer = run_sync("cpu", lambda: load_model(model_name, dtype=dtype))
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = make_prompts(requests * 4, prompt_tokens, vocab, seed=0)
    speed = run_sync(model.device, lambda: generate_speed(model, prompts[: max(requests // 2, 2)], new_tokens))
    plain = {"ttft_ms": 1e3 * speed["ttft_s"], "tpot_ms": 1e3 * speed["tpot_s"]}
    step = run_sync(model.device, lambda: step_cpu_ms(model, prompts[0]))
    c1 = asyncio.run(bench_engine(model, tokenizer, prompts[:requests], new_tokens, 1))
    c8 = asyncio.run(bench_engine(model, tokenizer, prompts, new_tokens, 8))
    return {
        "model": model_name,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "generate": plain,
        "step_cpu_ms_1_thread": step,
        "engine_c1": c1,
        "engine_c8": c8,
        "c1_speedup_vs_generate": plain["tpot_ms"] / c1["tpot_ms"],
        "c8_over_c1_tokens_per_s": c8["tokens_per_s"] / c1["tokens_per_s"],
    }


def table(rows: list[dict]) -> str:
    header = (
        "dtype",
        "threads",
        "engine start s",
        "generate TPOT ms",
        "engine c1 TTFT ms",
        "engine c1 TPOT ms",
        "c1 tok/s",
        "speed-up vs generate",
        "c8 TPOT ms",
        "c8 tok/s",
        "c8 / c1",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        c1, c8 = r["engine_c1"], r["engine_c8"]
        cells = (
            r["dtype"],
            str(r["threads"]),
            f"{c1['start_s']:.1f}",
            f"{r['generate']['tpot_ms']:.1f}",
            f"{c1['ttft_ms']:.0f}",
            f"{c1['tpot_ms']:.1f}",
            f"{c1['tokens_per_s']:.1f}",
            f"{r['c1_speedup_vs_generate']:.2f}x",
            f"{c8['tpot_ms']:.1f}",
            f"{c8['tokens_per_s']:.1f}",
            f"{r['c8_over_c1_tokens_per_s']:.2f}x",
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Thread CPU ms per step on one intra-op thread:",
        "",
        "| dtype | HF forward step b1 | engine decode b1 | engine decode b8 | engine prefill |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["step_cpu_ms_1_thread"]
        lines.append(
            f"| {r['dtype']} | {c['hf_forward_b1']:.1f} | {c['engine_decode_b1']:.1f} | {c['engine_decode_b8']:.1f} "
            f"| {c['engine_prefill']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8, help="requests at concurrency 1 (4x that at 8)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = [run(args.model, d, args.prompt_tokens, args.new_tokens, args.requests) for d in args.dtype]
    print(table(rows))
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
