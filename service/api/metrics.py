"""GET /metrics: Prometheus exposition, with each backend's memory and health read at scrape time."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import StateDep
from service.metrics import Metrics
from service.state import ServerState

router = APIRouter(tags=["metrics"])


def refresh(state: ServerState, metrics: Metrics) -> None:
    """Set the memory and health gauges of every variant from its backend."""
    for name, backend in state.variants.items():
        memory = backend.memory()
        if memory.rss_bytes is not None:
            metrics.rss_bytes.labels(variant=name).set(memory.rss_bytes)
        if memory.kv_cache_bytes is not None:
            metrics.kv_cache_bytes.labels(variant=name).set(memory.kv_cache_bytes)
        for device, figures in memory.device_bytes.items():
            for key, gauge in (
                ("allocated", metrics.cuda_allocated),
                ("reserved", metrics.cuda_reserved),
                ("peak", metrics.cuda_peak),
            ):
                if key in figures:
                    gauge.labels(variant=name, device=device).set(figures[key])
        metrics.backend_up.labels(variant=name).set(1 if backend.healthy else 0)


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    refresh(state, state.metrics)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
