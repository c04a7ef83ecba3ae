"""Server settings: one pydantic-settings object, read from `TRIMSERVE_*` env vars and the CLI.

`create_app(settings)` receives it explicitly; nothing reads the environment at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.types import EngineConfig

# The names the model loader takes (kept torch-free here; a test checks they match the loader's).
DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
DEVICES = ("cpu", "cuda", "auto")


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
    """One model to serve: the name clients use, which backend serves it, and how.

    `backend` is `native` (the in-process engine; the default for a local path, an alias or a hub
    id), `url` (any OpenAI-compatible server; the default when the source is an http(s) URL) or
    `vllm` (a `vllm serve` process trimserve starts and supervises for the checkpoint `source`).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str | None = None  # alias, directory, GGUF file or hub id; for url backends the URL
    backend: Literal["native", "url", "vllm"] | None = None
    dtype: Dtype | None = None  # None: the server's default dtype
    device: Device | None = None
    # url backends
    url: str | None = None  # the upstream's OpenAI API base, e.g. http://host:8000/v1
    upstream_model: str | None = None  # the model name to send upstream (default: its only model)
    api_key_env: str | None = None  # environment variable holding the upstream's API key
    manifest_dir: str | None = None  # a local variant directory describing the upstream's model
    max_inflight: int | None = Field(None, ge=1)  # requests sent upstream at once
    # vllm backends
    vllm_command: str | None = None  # default: the server's vllm_command
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    vllm_args: list[str] = Field(default_factory=list)  # more arguments for `vllm serve`
    vllm_env: dict[str, str] = Field(default_factory=dict)  # more environment for the vLLM process

    @model_validator(mode="after")
    def _backend(self) -> ModelSpec:
        if self.backend is None:
            remote = (self.url or self.source or "").startswith(("http://", "https://"))
            self.backend = "url" if remote else "native"
        if self.backend == "url":
            self.url = self.url or self.source
            if not (self.url or "").startswith(("http://", "https://")):
                raise ValueError(f"model {self.name!r}: a url backend needs an http(s) URL, not {self.url!r}")
        elif not self.source:
            raise ValueError(f"model {self.name!r}: give its source (a checkpoint, variant directory or alias)")
        return self


class Settings(BaseSettings):
    """Everything `trimserve serve` can be told; env vars are `TRIMSERVE_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="TRIMSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[ModelSpec] = Field(default_factory=list)  # empty: the default model and its variants
    config_file: Path | None = None  # TOML or YAML with `models` (and optionally `ab`)
    variants_dir: Path | None = None  # None: variants.store.variants_dir()
    dtype: Dtype = "auto"  # bf16 on CUDA (fp16 without bf16) and on CPUs with AVX512-BF16 or AMX, else fp32
    device: Device = "cpu"
    torch_threads: int | None = Field(None, ge=1)  # None: torch's default (all cores)
    ab: dict[str, dict[str, int]] = Field(default_factory=dict)  # experiment -> {variant: weight}
    # reference -> {"variants": [...], "rate": share}: the variants rate a share of the reference's answers
    shadow: dict[str, dict[str, Any]] = Field(default_factory=dict)
    shadow_seed: int = 0  # seeds the hash that picks which exchanges are replayed
    shadow_queue: int = Field(32, ge=1)  # exchanges waiting per shadow model; more are dropped
    shadow_busy: int = Field(4, ge=0)  # a model with more live requests running (or any waiting) drops them
    api_key: SecretStr | None = None
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_batch_size: int | None = Field(None, ge=1)  # None: sized from memory (kv_cache_gib)
    # per in-process model: the batch's cache, and the kept prefixes in what it leaves; None: 1/4 of free memory
    kv_cache_gib: float | None = Field(None, gt=0)
    # prompt tokens per engine step: more serve more under load; fewer stall running requests less
    prefill_tokens_per_step: int = Field(EngineConfig.prefill_tokens_per_step, ge=1)
    # per in-process model: a cap on the finished requests' caches kept in what the slots leave of the
    # KV budget (kv_cache_gib); None: no cap, 0: none kept
    prefix_cache_mib: float | None = Field(None, ge=0)
    compile_decode: bool = False  # in-process engines compile their decode steps
    max_queue: int = Field(64, ge=0)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens: int = Field(1024, ge=1)
    default_max_tokens: int = Field(16, ge=1)  # completions, as in OpenAI's API
    default_chat_max_tokens: int = Field(256, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    shutdown_timeout_s: float = Field(10.0, ge=0)
    retry_after_s: float = Field(1.0, gt=0)
    vllm_command: str = "vllm serve"  # how `vllm` backends start vLLM (often the python of its own venv)
    vllm_startup_timeout_s: float = Field(900.0, gt=0)
    vllm_args: list[str] = Field(default_factory=list)  # for every vllm backend, before its own vllm_args
    vllm_env: dict[str, str] = Field(default_factory=dict)  # for every vllm backend, under its own vllm_env
    upstream_max_inflight: int = Field(256, ge=1)  # default max_inflight of url and vllm backends
    upstream_wait_s: float = Field(0.0, ge=0)  # how long start-up waits for an upstream not answering yet
    log_dir: Path | None = None  # vLLM processes' output; None: $TRIMSERVE_CACHE/logs

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
            kv_cache_bytes=None if self.kv_cache_gib is None else int(self.kv_cache_gib * 2**30),
            prefill_tokens_per_step=self.prefill_tokens_per_step,
            prefix_cache_bytes=None if self.prefix_cache_mib is None else int(self.prefix_cache_mib * 2**20),
            release_model_weights=True,
            compile_decode=self.compile_decode,
            max_queue=self.max_queue,
            max_prompt_tokens=self.max_prompt_tokens,
            max_tokens=self.max_tokens,
            request_timeout_s=self.request_timeout_s,
        )
