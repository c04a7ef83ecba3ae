"""GET /v1/models and GET /v1/variants/{name}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import StateDep
from service.protocol import ErrorResponse, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep) -> ModelList:
    """Loaded variants, then A/B experiments (an experiment's `root` lists its arms)."""
    cards = []
    for name, variant in state.variants.items():
        manifest = variant.loaded.manifest
        parent = manifest.base.source if manifest else None
        created = int(variant.loaded.loaded_at)
        cards.append(ModelCard(id=name, created=created, root=variant.loaded.source, parent=parent))
    for name, experiment in state.experiments.items():
        arms = ",".join(f"{v}:{w}" for v, w in experiment.arms)
        created = min((int(v.loaded.loaded_at) for v in state.variants.values()), default=0)
        cards.append(ModelCard(id=name, created=created, root=f"ab:{arms}"))
    return ModelList(data=cards)


@router.get("/variants/{name}", responses={404: {"model": ErrorResponse}})
async def get_variant(name: str, state: StateDep) -> dict[str, Any]:
    """How a variant was made and how it scored (its manifest), and how it is being served."""
    return state.variant(name).loaded.describe()
