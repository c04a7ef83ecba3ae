"""GET /health (the process is alive) and GET /ready (every variant can take requests now)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ReadyStateDep
from service.errors import APIError
from service.protocol import ErrorResponse

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(state: ReadyStateDep) -> dict[str, object]:
    """200 while every variant's backend is up; 503 naming the ones that are not (an upstream that
    went down, a supervised vLLM process restarting), so an orchestrator can take the pod out."""
    down = [name for name, backend in state.variants.items() if not backend.healthy]
    if down:
        raise APIError(503, f"variants not serving: {', '.join(down)}", None, "backend_down")
    return {"status": "ready", "variants": list(state.variants), "experiments": list(state.experiments)}
