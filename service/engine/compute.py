"""One thread per device runs all of the server's torch work: loading, warm-up and every engine step.

Why one thread: PyTorch's CPU kernels run on OpenMP (libgomp), which keeps a team of worker
threads per calling thread. As soon as the process holds more OpenMP threads than cores (two
Python threads each running torch ops on a 2-core host is enough), libgomp stops spinning between
parallel regions and puts its workers to sleep, and every small op pays a futex wake-up: a batch-1
decode step of the default model took 32 ms on two intra-op threads from a second Python thread
against 22 ms when one thread did all the torch work. Funnelling everything through one thread
per device also serializes engines that share a device, which they need anyway: two variants
decoding at once on a CPU would oversubscribe its cores.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_EXECUTORS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def compute_executor(device: torch.device | str) -> ThreadPoolExecutor:
    """The single-thread executor for `device` (created on first use, kept for the process)."""
    key = str(torch.device(device))
    with _LOCK:
        if key not in _EXECUTORS:
            _EXECUTORS[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-{key}")
        return _EXECUTORS[key]


def run_sync(device: torch.device | str, fn: Callable[[], T]) -> T:
    """Run `fn` on the device's compute thread and wait for it (from any other thread)."""
    return compute_executor(device).submit(fn).result()


async def run_async(device: torch.device | str, fn: Callable[[], T]) -> T:
    """Await `fn` on the device's compute thread without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(compute_executor(device), fn)
