"""GET /health (the process is alive) and GET /ready (every model loaded, not shutting down)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ReadyStateDep
from service.protocol import ErrorResponse

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(state: ReadyStateDep) -> dict[str, object]:
    return {"status": "ready", "variants": list(state.variants), "experiments": list(state.experiments)}
