"""GET /v1/models, GET /v1/models/{id} and GET /v1/variants/{name}.

Nothing here shows the host's file system: a variant loaded from a directory is known by the
directory's name, and absolute paths inside a manifest are cut to their last component.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from fastapi import APIRouter

from service.deps import StateDep
from service.errors import model_not_found
from service.protocol import ErrorResponse, ModelCard, ModelList
from service.state import ServerState

router = APIRouter(prefix="/v1", tags=["models"])


def public_source(source: str) -> str:
    """A model source as clients may see it: an alias or hub id as is, a file path by its last part."""
    if source.startswith(("/", "~", ".")):
        return PurePath(source).name or source
    return source


def without_paths(value: Any) -> Any:
    """`value` (JSON-like) with every absolute or home-relative path string cut to its last part."""
    if isinstance(value, str):
        return PurePath(value).name if value.startswith(("/", "~")) else value
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    return value


def _cards(state: ServerState) -> list[ModelCard]:
    cards, created = [], []
    for name, backend in state.variants.items():
        info = backend.describe()
        manifest = info.get("manifest") or {}
        parent = public_source(manifest["base"]["source"]) if manifest else None
        root = public_source(info["source"]) if info.get("source") else None
        created.append(int(info.get("created", 0)))
        cards.append(ModelCard(id=name, created=created[-1], root=root, parent=parent))
    for name, experiment in state.experiments.items():
        arms = ",".join(f"{v}:{w}" for v, w in experiment.arms)
        cards.append(ModelCard(id=name, created=min(created, default=0), root=f"ab:{arms}"))
    return cards


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep) -> ModelList:
    """Loaded variants, then A/B experiments (an experiment's `root` lists its arms)."""
    return ModelList(data=_cards(state))


@router.get("/models/{model_id}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, state: StateDep) -> ModelCard:
    """One variant or experiment, as listed by GET /v1/models (the `openai` client's `models.retrieve`)."""
    for card in _cards(state):
        if card.id == model_id:
            return card
    raise model_not_found(model_id, state.names())


@router.get("/variants/{name}", responses={404: {"model": ErrorResponse}})
async def get_variant(name: str, state: StateDep) -> dict[str, Any]:
    """How a variant was made and how it scored (its manifest), and how it is being served."""
    return without_paths(state.variant(name).describe())
