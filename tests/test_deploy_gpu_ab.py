"""bench/gpu_ab.sh on CPU: its dry run prints commands the real CLI accepts, with CUDA and bf16 settings."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import tiny_llama
from trimserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    tmp = tmp_path_factory.mktemp("gpu_ab")
    tiny_llama(layers=6, vocab_size=256).save_pretrained(tmp / "model")
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "MODEL": str(tmp / "model"),
        "BIN": str(Path(sys.executable).parent),
        "OUT": str(tmp / "out"),
        "TRIMSERVE_CACHE": str(tmp / "cache"),
    }
    result = subprocess.run(["bash", "bench/gpu_ab.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model " + str(tmp / "model") + " (6 layers) on cuda/bf16" in result.stdout
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def by_command(commands: list[list[str]], *words: str) -> list[list[str]]:
    return [c[1:] for c in commands if c[1 : 1 + len(words)] == list(words)]


def test_every_command_parses_with_the_cli(commands: list[list[str]]) -> None:
    parser = build_parser()
    assert len(commands) == 2 + 3 + 1 + 2 * 4  # prune x2, eval x3, serve, (bench x3 + report) per workload
    for argv in commands:
        assert Path(argv[0]).name == "trimserve"
        parser.parse_args(argv[1:])  # SystemExit on an unknown flag fails the test


def test_gpu_settings_reach_every_step(commands: list[list[str]]) -> None:
    parser = build_parser()
    (serve,) = by_command(commands, "serve")
    args = parser.parse_args(serve)
    assert (args.device, args.dtype) == ("cuda", "bf16")
    assert args.compile_decode  # the engine's decode steps as CUDA graphs
    assert [m.split("=")[0] for m in args.model] == ["full", "depth2", "sparse50"]  # a quarter of 6 layers
    for argv in by_command(commands, "eval") + by_command(commands, "prune"):
        assert parser.parse_args(argv).device == "cuda"
    assert all(parser.parse_args(a).dtype == "bf16" for a in by_command(commands, "eval"))


def test_workloads_bench_each_variant_alone_and_report_them(commands: list[list[str]]) -> None:
    parser = build_parser()
    benches = [parser.parse_args(a) for a in by_command(commands, "bench")]
    assert [(b.concurrency, b.requests, b.model) for b in benches[:3]] == [
        (1, 16, ["full"]),
        (1, 16, ["depth2"]),
        (1, 16, ["sparse50"]),
    ]
    assert {(b.concurrency, b.requests) for b in benches[3:]} == {(8, 32)}
    assert {(b.prompt_tokens, b.output_tokens) for b in benches} == {(128, 64)}
    for report in map(parser.parse_args, by_command(commands, "report")):
        assert len(report.bench) == 3 and {e.split("=")[0] for e in report.eval} == {"full", "depth2", "sparse50"}
