"""The FastAPI application: `create_app(settings)` builds it; the lifespan loads models and engines."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.ab import experiments_from
from service.api import chat, completions, health, models
from service.api import metrics as metrics_api
from service.engine.compute import run_async
from service.engine.types import EngineConfig
from service.errors import install_handlers
from service.metrics import Metrics
from service.middleware import BearerAuth, BodyLimit
from service.registry import LoadedModel, load_all, model_specs, record_load
from service.settings import Settings
from service.state import ManagedEngine, ServerState, Variant

log = logging.getLogger(__name__)

EngineFactory = Callable[[LoadedModel, EngineConfig, Metrics], ManagedEngine]


def llm_engine(loaded: LoadedModel, config: EngineConfig, metrics: Metrics) -> ManagedEngine:
    from service.engine.engine import LLMEngine

    return LLMEngine(loaded.name, loaded.model, loaded.tokenizer, config, metrics)


async def drain(state: ServerState) -> None:
    """Stop taking requests (/ready 503), give in-flight ones up to SHUTDOWN_TIMEOUT_S, then end the rest."""
    if state.ready:
        log.info("shutting down: finishing in-flight requests (up to %g s)", state.settings.shutdown_timeout_s)
    state.ready = False
    timeout = state.settings.shutdown_timeout_s
    await asyncio.gather(*(v.engine.shutdown(timeout) for v in state.variants.values()))


def create_app(
    settings: Settings,
    *,
    loaded: list[LoadedModel] | None = None,
    engine_factory: EngineFactory = llm_engine,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the app. `loaded` skips loading from settings (tests); `engine_factory` picks the engine."""
    state = ServerState(settings=settings, metrics=metrics or Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        specs, ab = model_specs(settings) if loaded is None else ([], dict(settings.ab))
        models_ = loaded if loaded is not None else await run_async("cpu", lambda: load_all(specs))
        state.experiments = experiments_from(ab, {m.name for m in models_})
        try:
            for model in models_:
                record_load(model, state.metrics)
                engine = engine_factory(model, settings.engine_config(), state.metrics)
                state.variants[model.name] = Variant(model.name, engine, model)
                await engine.start()
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
