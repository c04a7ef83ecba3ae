"""Server settings: one pydantic-settings object, read from `TRIMSERVE_*` env vars and the CLI.

`create_app(settings)` receives it explicitly; nothing reads the environment at import.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pruning.models import DEVICES, DTYPES
from service.engine.types import EngineConfig


class ModelSpec(BaseModel):
    """One model to serve: the name clients use, where its weights are, how to load them."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str  # alias, directory, GGUF file or hub id (see pruning.models.resolve_model)
    dtype: str | None = None  # None: the server's default dtype
    device: str | None = None

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; choose one of {sorted(DTYPES)}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None and value not in DEVICES:
            raise ValueError(f"unknown device {value!r}; choose one of {DEVICES}")
        return value


class Settings(BaseSettings):
    """Everything `trimserve serve` can be told; env vars are `TRIMSERVE_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="TRIMSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[ModelSpec] = Field(default_factory=list)  # empty: the default model and its variants
    config_file: Path | None = None  # TOML or YAML with `models` (and optionally `ab`)
    variants_dir: Path | None = None  # None: pruning.models.variants_dir()
    dtype: str = "fp32"
    device: str = "cpu"
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

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; choose one of {sorted(DTYPES)}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in DEVICES:
            raise ValueError(f"unknown device {value!r}; choose one of {DEVICES}")
        return value

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
