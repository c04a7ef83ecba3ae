"""A `vllm serve` process per variant, started and supervised by trimserve, used as an upstream.

trimserve picks a free port, starts the configured command (vLLM usually lives in an environment
of its own) in a process group of its own with the variant's checkpoint, served name, dtype,
maximum model length and GPU memory share, and waits for its `/health`. A supervisor watches the
process: when it dies (or is killed), the variant answers 503 at once, what is left of the
process group is killed (vLLM's engine processes outlive a killed API server), and the command is
started again after a back-off that doubles up to a minute. `close` drains the requests in flight,
then stops the group (SIGTERM, SIGKILL after a grace period). Memory for the A/B: the resident
memory of the whole process tree, and on CUDA its device memory by process (NVML, when the
`nvidia-ml-py` package is installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil

from service.backend import Memory, Observer, Unavailable
from service.backends.upstream import UpstreamBackend, UpstreamConfig

log = logging.getLogger(__name__)

# vLLM's --dtype names for trimserve's.
VLLM_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
VLLM_DTYPES |= {"fp16": "float16", "float16": "float16", "auto": "auto"}
STOP_GRACE_S = 30.0
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class VllmConfig:
    """How to start one variant's vLLM server."""

    model: str  # the checkpoint directory
    command: tuple[str, ...] = ("vllm", "serve")
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 900.0
    log_path: Path | None = None  # the process's output; None: discarded


def parse_command(text: str) -> tuple[str, ...]:
    """A shell-style command line (`.venv-vllm/bin/python -m vllm.entrypoints...`) as its words."""
    words = tuple(shlex.split(text))
    if not words:
        raise ValueError("the vLLM command is empty")
    return words


def check_command(command: tuple[str, ...], name: str) -> None:
    """Raise ValueError naming the variant when the command's program does not exist."""
    program = command[0]
    if shutil.which(program) is None and not (os.path.isfile(program) and os.access(program, os.X_OK)):
        raise ValueError(
            f"variant {name!r}: the vLLM command {program!r} is not installed or not executable "
            "(set --vllm-command / vllm_command, e.g. to the python of vLLM's own environment)"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cuda_bytes_by_process(pids: set[int]) -> dict[str, dict[str, int]]:
    """Device memory the given processes use, by device (NVML; empty without it or a GPU)."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    found: dict[str, dict[str, int]] = {}
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            used = sum(
                p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid in pids
            )
            if used:
                found[f"cuda:{index}"] = {"allocated": used}
    finally:
        pynvml.nvmlShutdown()
    return found


class VllmBackend(UpstreamBackend):
    kind = "vllm"

    def __init__(
        self,
        name: str,
        vllm: VllmConfig,
        upstream: UpstreamConfig,
        observer: Observer | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        upstream = replace(upstream, url=f"http://127.0.0.1:{self.port}/v1", upstream_model=name)
        super().__init__(name, upstream, observer, manifest)
        self.vllm = vllm
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    def command_line(self) -> list[str]:
        v = self.vllm
        line = [*v.command, "--model", v.model, "--host", "127.0.0.1", "--port", str(self.port)]
        line += ["--served-model-name", self.name, "--dtype", VLLM_DTYPES.get(v.dtype, v.dtype)]
        if v.max_model_len is not None:
            line += ["--max-model-len", str(v.max_model_len)]
        if v.gpu_memory_utilization is not None:
            line += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
        return [*line, *v.extra_args]

    async def check(self) -> None:
        check_command(self.vllm.command, self.name)
        if not os.path.isdir(self.vllm.model):
            raise ValueError(f"variant {self.name!r}: {self.vllm.model} is not a checkpoint directory")

    async def start(self) -> None:
        await self.check()
        await self._launch()
        await super().start()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    def _log_tail(self, lines: int = 15) -> str:
        path = self.vllm.log_path
        if path is None or not path.is_file():
            return ""
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    async def _launch(self) -> None:
        """Start the command and wait for its /health; raise naming the variant if it cannot serve."""
        output: Any = asyncio.subprocess.DEVNULL
        if self.vllm.log_path is not None:
            self.vllm.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = self.vllm.log_path.open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command_line(),
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops vLLM's engine processes too
                env={**os.environ, **self.vllm.env},
            )
        except OSError as err:
            raise Unavailable(f"variant {self.name!r}: cannot start {self.vllm.command[0]!r}: {err}") from None
        finally:
            if output is not asyncio.subprocess.DEVNULL:
                output.close()
        log.info("variant %s: started %s (pid %d)", self.name, shlex.join(self.command_line()), self.process.pid)
        deadline = time.monotonic() + self.vllm.startup_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise Unavailable(
                        f"variant {self.name!r}: the vLLM process exited with {self.process.returncode} "
                        f"while starting; its last output:\n{self._log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.api_root}/health")).status_code == 200:
                        return
                await asyncio.sleep(0.5)
        await self._stop_group()
        raise Unavailable(f"variant {self.name!r}: vLLM not healthy after {self.vllm.startup_timeout_s:g} s")

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            code = await self.process.wait()
            if self._stopping:
                return
            self._healthy = False
            log.error("variant %s: the vLLM process exited with %s; restarting in %g s", self.name, code, backoff)
            await self._stop_group()  # its engine processes survive the API server
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            self.restarts += 1
            if self.observer is not None:
                self.observer.restarted()
            try:
                await self._launch()
            except Unavailable as err:
                log.error("%s", err)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self._healthy = True
            log.info("variant %s: vLLM is back (restart %d)", self.name, self.restarts)
            backoff = 1.0

    async def _stop_group(self) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after the grace period."""
        if self.process is None:
            return
        # The child itself is waited on through asyncio only: psutil would reap it, and an event loop
        # that learns of exits from SIGCHLD (uvloop) would then wait for it forever.
        descendants = process_tree(self.process.pid)[1:]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        began = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), STOP_GRACE_S)
        grace = max(STOP_GRACE_S - (time.monotonic() - began), 0.0)
        _, alive = await asyncio.to_thread(psutil.wait_procs, descendants, timeout=grace)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.returncode is None:
            await self.process.wait()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "command": self.command_line(),
            "pid": self.process.pid if self.process else None,
            "restarts": self.restarts,
        }

    def memory(self) -> Memory:
        if self.process is None:
            return Memory()
        tree = process_tree(self.process.pid)
        rss = 0
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                rss += process.memory_info().rss
        return Memory(rss_bytes=rss, device_bytes=cuda_bytes_by_process({p.pid for p in tree}))

    async def close(self, timeout: float) -> None:
        await super().close(timeout)
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self._stop_group()
