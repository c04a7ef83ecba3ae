"""The vLLM supervisor against a small real upstream program run as its child (tests/fake_vllm.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from service.backend import GenerationRequest, SamplingParams, Unavailable
from service.backends.upstream import UpstreamConfig
from service.backends.vllm import VllmBackend, VllmConfig, check_command
from service.metrics import Metrics

FAKE = str(Path(__file__).with_name("fake_vllm.py"))


def backend(tmp_path: Path, metrics: Metrics, *extra: str) -> VllmBackend:
    config = VllmConfig(
        model=str(tmp_path),
        command=(sys.executable, FAKE),
        dtype="bf16",
        max_model_len=512,
        extra_args=extra,
        startup_timeout_s=30,
        log_path=tmp_path / "vllm.log",
    )
    return VllmBackend("v", config, UpstreamConfig(url="", max_tokens=64), metrics.observer("v"))


async def answer(b: VllmBackend, prompt: str = "one two three") -> str:
    request = GenerationRequest("r", SamplingParams(max_tokens=8, temperature=0.0), prompt=prompt)
    return "".join([d.text async for d in b.generate(request)])


def test_command_line_carries_the_variant_settings(tmp_path: Path) -> None:
    line = backend(tmp_path, Metrics(), "--enforce-eager").command_line()
    assert line[:2] == [sys.executable, FAKE]
    assert line[line.index("--served-model-name") + 1] == "v" and line[line.index("--dtype") + 1] == "bfloat16"
    assert line[line.index("--max-model-len") + 1] == "512" and line[-1] == "--enforce-eager"
    assert line[line.index("--model") + 1] == str(tmp_path)


def test_a_missing_command_is_refused_naming_the_variant() -> None:
    with pytest.raises(ValueError, match=r"variant 'depth8'.*'/no/such/vllm' is not installed"):
        check_command(("/no/such/vllm", "serve"), "depth8")


def test_health_wait_restart_after_kill_9_and_clean_stop(tmp_path: Path) -> None:
    metrics = Metrics()
    b = backend(tmp_path, metrics, "--startup-delay", "1.0")

    async def scenario():
        await b.start()
        first = await answer(b)
        tree = [p.pid for p in psutil.Process(b.process.pid).children(recursive=True)]
        assert tree and b.memory().rss_bytes > 0  # the parent and its "engine" child
        os.kill(b.process.pid, signal.SIGKILL)
        for _ in range(100):  # down at once: requests get 503, never a hang
            if not b.healthy:
                break
            await asyncio.sleep(0.02)
        assert not b.healthy
        with pytest.raises(Unavailable):
            await answer(b)
        for _ in range(300):
            if b.healthy and b.restarts == 1:
                break
            await asyncio.sleep(0.05)
        again = await answer(b)
        orphans_gone = not any(psutil.pid_exists(pid) for pid in tree)
        group = b.process.pid
        await b.close(1.0)
        return first, again, orphans_gone, group

    first, again, orphans_gone, group = asyncio.run(scenario())
    assert first == again == " one two three"
    assert orphans_gone  # the killed server's child was stopped with its process group
    assert b.restarts == 1
    assert metrics.registry.get_sample_value("trimserve_backend_restarts_total", {"variant": "v"}) == 1
    assert not [p for p in psutil.process_iter(["pid"]) if _in_group(p, group)]


def _in_group(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group
    except (ProcessLookupError, PermissionError):
        return False


def test_a_process_that_dies_while_starting_is_reported_with_its_output(tmp_path: Path) -> None:
    b = backend(tmp_path, Metrics(), "--port", "not-a-number")  # argparse fails: exit 2 at once
    with pytest.raises(Unavailable, match=r"variant 'v': the vLLM process exited with 2 while starting"):
        asyncio.run(b.start())


def test_stopping_under_uvloop_does_not_wait_forever(tmp_path: Path) -> None:
    """The server runs on uvloop, which learns of a child's exit from SIGCHLD. A gateway hung at
    shutdown when psutil reaped vLLM before uvloop saw it exit (a race this fake rarely loses, so
    the test guards the uvloop path as a whole); the child is now waited on through the loop only."""
    uvloop = pytest.importorskip("uvloop")
    b = backend(tmp_path, Metrics())

    async def scenario():
        await b.start()
        assert await answer(b) == " one two three"
        group = b.process.pid
        await asyncio.wait_for(b.close(1.0), 20)
        return group

    group = uvloop.run(scenario())
    assert b.process.returncode is not None
    assert not [p for p in psutil.process_iter(["pid"]) if _in_group(p, group)]
