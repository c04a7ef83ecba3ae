"""Where one engine step's time goes: a per-op profile of a decode step at batch 1, 8 and 16, one
128-token prefill, and one fused step (8 decoding requests plus a 256-token prompt chunk).

The default model through the server's own runner (`service.engine.llama.LlamaRunner`), in-process,
every request at position 128 (after a 128-token prompt). Wall time is the median of `--repeats`
steps; the op table is torch.profiler's self CPU time over the same number of steps, grouped into
what the step does: the linear layers (weights read), attention, norms, rotary and the rest.

    .venv/bin/python bench/step_profile.py --out bench/out/step-profile.json

With `--compile-decode` the runner compiles its decode step for one request (`serve
--compile-decode`): the batch-1 case then runs compiled, the rest as before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from service.engine.llama import LlamaRunner
from service.engine.runner import Chunk
from variants.load import load_model
from variants.store import DEFAULT_MODEL

from common import machine

# torch op name -> what it does in the step
GROUPS = {
    "linear": (
        "mkldnn::_linear_pointwise",
        "trimserve::blocked_linear",
        "aten::linear",
        "aten::addmm",
        "aten::mm",
        "mkl::_mkl_linear",
    ),
    "attention": ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product", "aten::index_put", "aten::_index_put"),
    "norm": ("aten::rms_norm", "aten::_fused_rms_norm", "aten::pow", "aten::mean", "aten::rsqrt"),
    "rotary": ("aten::cos", "aten::sin", "aten::cat", "aten::neg"),
}


def group_of(op: str) -> str:
    return next((g for g, names in GROUPS.items() if op.startswith(names)), "other")


def timed(fn, repeats: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """Median wall ms of `fn`, then its self CPU ms per step by group and the top ops."""
    for _ in range(3):
        fn()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        walls.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    groups: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / repeats
        groups[group_of(event.key)] += ms
        ops.append((event.key, ms))
    ops.sort(key=lambda kv: -kv[1])
    return statistics.median(walls), dict(groups), ops[:8]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench/out/step-profile.json"))
    p.add_argument("--compile-decode", action="store_true", help="compile the decode step of one request")
    args = p.parse_args()
    model, _ = load_model(args.model, dtype=args.dtype)
    runner = LlamaRunner(model, 17, 1024, compiled=args.compile_decode)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (128,), generator=g).tolist() for _ in range(17)]
    for slot in range(16):
        runner.prefill(slot, prompts[slot])
    cases = {
        f"decode, batch {b}": (lambda b=b: runner.decode(torch.ones(b, dtype=torch.long), torch.full((b,), 128)))
        for b in (1, 8, 16)
    }
    cases["prefill, 128 tokens"] = lambda: runner.prefill(16, prompts[16])
    cases["fused: 8 decoding + 256 prompt tokens"] = lambda: runner.step(
        torch.ones(8, dtype=torch.long), torch.full((8,), 128), [Chunk(16, prompts[16] * 2)]
    )
    report = {"machine": machine(), "dtype": args.dtype, "threads": torch.get_num_threads(), "cases": {}}
    report["compiled"] = args.compile_decode
    for name, fn in cases.items():
        wall, groups, ops = timed(fn, args.repeats)
        report["cases"][name] = {"wall_ms": wall, "groups_ms": groups, "top_ops_ms": ops}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    names = ["linear", "attention", "norm", "rotary", "other"]
    compiled = ", batch-1 decode compiled" if args.compile_decode else ""
    print(f"{report['machine']}; {args.dtype}, {report['threads']} threads{compiled}\n")
    print("| step | wall ms | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for name, case in report["cases"].items():
        cells = " | ".join(f"{case['groups_ms'].get(n, 0.0):.1f}" for n in names)
        print(f"| {name} | {case['wall_ms']:.1f} | {cells} |")
    for name, case in report["cases"].items():
        print(f"\n{name}: " + ", ".join(f"{op} {ms:.2f}" for op, ms in case["top_ops_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
