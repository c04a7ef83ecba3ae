"""Shared fixtures: tiny random models built from a config, and the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedModel

from tests.tiny_models import TINY_MODELS
from variants.load import fetch_embedded
from variants.store import DEFAULT_MODEL


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """Each tiny architecture in turn (Llama, OPT, Qwen2)."""
    return TINY_MODELS[request.param]()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model as a safetensors checkpoint (converted once, then cached)."""
    return fetch_embedded(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path):
    return AutoTokenizer.from_pretrained(default_model_dir)
