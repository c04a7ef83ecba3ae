"""The FastAPI application: `create_app(settings)` builds it; the lifespan starts one backend per variant."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.ab import experiments_from
from service.api import chat, completions, health, models
from service.api import metrics as metrics_api
from service.backend import Backend
from service.backends import make_backend
from service.errors import install_handlers
from service.metrics import Metrics
from service.middleware import BearerAuth, BodyLimit
from service.registry import Plan, serve_plan, shadow_specs
from service.settings import Settings
from service.shadow import Shadow
from service.state import ServerState

log = logging.getLogger(__name__)


def backends_from(settings: Settings, metrics: Metrics) -> tuple[list[Backend], Plan]:
    """One backend per model the settings name, and the plan (experiments, shadows) over them."""
    plan = serve_plan(settings)
    return [make_backend(spec, settings, metrics.observer(spec.name)) for spec in plan.models], plan


def record_backend(backend: Backend, metrics: Metrics) -> None:
    """Export what a started backend knows of its model: size, load time and load memory."""
    info, name = backend.describe(), backend.name
    params = info.get("params") or {}
    for kind in ("total", "nonzero"):
        if params.get(kind) is not None:
            metrics.parameters.labels(variant=name, kind=kind).set(params[kind])
    for key, gauge in (
        ("weight_bytes", metrics.weight_bytes),
        ("load_seconds", metrics.load_seconds),
        ("load_rss_bytes", metrics.load_rss_bytes),
    ):
        if info.get(key) is not None:
            gauge.labels(variant=name).set(info[key])
    metrics.backend_up.labels(variant=name).set(1 if backend.healthy else 0)


async def preflight(backends: list[Backend]) -> None:
    """The cheap checks of every backend (an upstream reachable and speaking the OpenAI API, a vLLM
    command installed), so a bad configuration fails before anything loads."""
    await asyncio.gather(*(b.check() for b in backends))


async def drain(state: ServerState) -> None:
    """Stop taking requests (/ready 503), give in-flight ones up to SHUTDOWN_TIMEOUT_S, then end the rest."""
    if state.ready:
        log.info("shutting down: finishing in-flight requests (up to %g s)", state.settings.shutdown_timeout_s)
    state.ready = False
    timeout = state.settings.shutdown_timeout_s
    if state.shadow is not None:
        await state.shadow.close()
    await asyncio.gather(*(backend.close(timeout) for backend in state.variants.values()))


def create_app(settings: Settings, *, backends: list[Backend] | None = None, metrics: Metrics | None = None) -> FastAPI:
    """Build the app. `backends` replaces the ones the settings name (tests)."""
    state = ServerState(settings=settings, metrics=metrics or Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if backends is None:
            made, plan = backends_from(settings, state.metrics)
        else:
            made, plan = backends, Plan([], dict(settings.ab), shadow_specs(settings.shadow, "settings"))
        state.experiments = experiments_from(plan.ab, {b.name for b in made})
        try:
            for backend in made:
                state.variants[backend.name] = backend

            async def start(backend: Backend) -> None:
                try:
                    await backend.start()
                except Exception as err:
                    log.error("variant %r cannot start: %s", backend.name, err)
                    raise
                record_backend(backend, state.metrics)

            await asyncio.gather(*(start(b) for b in made))
            if plan.shadow:
                state.shadow = Shadow(
                    plan.shadow,
                    state.variants,
                    state.metrics,
                    settings.shadow_seed,
                    settings.shadow_queue,
                    settings.shadow_busy,
                )
                state.shadow.start()
            state.ready = True
            log.info("ready: variants %s, experiments %s", list(state.variants), list(state.experiments))
            yield
        finally:
            await drain(state)  # a no-op wait when the server drained already (service.http_server)

    app = FastAPI(
        title="trimserve",
        summary="OpenAI-compatible serving of a model and its pruned variants, with A/B routing",
        lifespan=lifespan,
    )
    app.state.trimserve = state
    for module in (completions, chat, models, health, metrics_api):
        app.include_router(module.router)
    install_handlers(app, settings.retry_after_s)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(BearerAuth, api_key=settings.api_key.get_secret_value())
    return app
