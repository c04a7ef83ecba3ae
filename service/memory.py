"""Memory readings for the metrics: process RSS, and CUDA allocator figures per device."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable

import torch

from service.metrics import Metrics

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


def refresh_memory(metrics: Metrics, variants: Iterable[tuple[str, torch.device]]) -> None:
    """Set the memory gauges for each (variant, device); called at scrape time."""
    rss = process_rss_bytes()
    for name, device in variants:
        metrics.rss_bytes.labels(variant=name).set(rss)
        if device.type != "cuda" or not torch.cuda.is_available():
            continue
        index = device.index if device.index is not None else torch.cuda.current_device()
        label = f"cuda:{index}"
        metrics.cuda_allocated.labels(variant=name, device=label).set(torch.cuda.memory_allocated(index))
        metrics.cuda_reserved.labels(variant=name, device=label).set(torch.cuda.memory_reserved(index))
        metrics.cuda_peak.labels(variant=name, device=label).set(torch.cuda.max_memory_allocated(index))
