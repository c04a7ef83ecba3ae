"""GET /metrics: Prometheus exposition, with memory gauges refreshed at scrape time."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import StateDep
from service.memory import refresh_memory

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    refresh_memory(state.metrics, [(v.name, v.loaded.device) for v in state.variants.values()])
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
