"""Server settings: one pydantic-settings object, read from `TRIMSERVE_*` env vars and the CLI.

`create_app(settings)` receives it explicitly; nothing reads the environment at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pruning.models import DEVICES, DTYPES
from service.engine.types import EngineConfig


def _known_dtype(value: str) -> str:
    if value != "auto" and value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; choose auto or one of {sorted(DTYPES)}")
    return value


def _known_device(value: str) -> str:
    if value not in DEVICES:
        raise ValueError(f"unknown device {value!r}; choose one of {DEVICES}")
    return value


Dtype = Annotated[str, AfterValidator(_known_dtype)]
Device = Annotated[str, AfterValidator(_known_device)]


class ModelSpec(BaseModel):
    """One model to serve: the name clients use, where its weights are, how to load them."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str  # alias, directory, GGUF file or hub id (see pruning.models.resolve_model)
    dtype: Dtype | None = None  # None: the server's default dtype
    device: Device | None = None


class Settings(BaseSettings):
    """Everything `trimserve serve` can be told; env vars are `TRIMSERVE_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="TRIMSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[ModelSpec] = Field(default_factory=list)  # empty: the default model and its variants
    config_file: Path | None = None  # TOML or YAML with `models` (and optionally `ab`)
    variants_dir: Path | None = None  # None: pruning.models.variants_dir()
    dtype: Dtype = "auto"  # bf16 on CUDA (fp16 without bf16 support), fp32 on CPU
    device: Device = "cpu"
    torch_threads: int | None = Field(None, ge=1)  # None: torch's default (all cores)
    ab: dict[str, dict[str, int]] = Field(default_factory=dict)  # experiment -> {variant: weight}
    api_key: SecretStr | None = None
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_batch_size: int = Field(8, ge=1)
    max_queue: int = Field(64, ge=0)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens: int = Field(1024, ge=1)
    default_max_tokens: int = Field(16, ge=1)  # completions, as in OpenAI's API
    default_chat_max_tokens: int = Field(256, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    shutdown_timeout_s: float = Field(10.0, ge=0)
    retry_after_s: float = Field(1.0, gt=0)

    @field_validator("ab")
    @classmethod
    def _positive_weights(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for name, arms in value.items():
            if not arms or any(w < 0 for w in arms.values()) or sum(arms.values()) <= 0:
                raise ValueError(f"experiment {name!r}: weights must be >= 0 with a positive sum")
        return value

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            max_prompt_tokens=self.max_prompt_tokens,
            max_tokens=self.max_tokens,
            request_timeout_s=self.request_timeout_s,
        )
