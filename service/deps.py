"""Typed dependencies: routes reach server state only through these aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import APIError
from service.metrics import Metrics
from service.settings import Settings
from service.state import ServerState


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.trimserve
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def get_ready_state(state: StateDep) -> ServerState:
    """The state, once every model is loaded and while the server is not shutting down (else 503)."""
    if not state.ready:
        raise APIError(503, "the server is not ready: models are loading or it is shutting down", None, "not_ready")
    return state


ReadyStateDep = Annotated[ServerState, Depends(get_ready_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
