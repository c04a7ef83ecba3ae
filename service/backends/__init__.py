"""Backends, one per variant (see `service.backend`); `make_backend` builds the one a spec names.

Torch is imported only when a native backend is made, so a server whose variants all live on
upstream servers (a pure gateway) never loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.backend import Backend, Observer
from service.settings import ModelSpec, Settings
from variants.store import cache_dir


def local_manifest(directory: str | None) -> dict[str, Any] | None:
    """The manifest of a variant directory, as JSON, if the directory holds one."""
    if directory is None:
        return None
    from service.registry import read_manifest_json

    return read_manifest_json(Path(directory).expanduser())


def log_dir(settings: Settings) -> Path:
    return settings.log_dir or cache_dir() / "logs"


def make_backend(spec: ModelSpec, settings: Settings, observer: Observer | None = None) -> Backend:
    """The backend for one model spec, with the server's limits."""
    if spec.backend == "native":
        from functools import partial

        from service.backends.native import NativeBackend
        from variants.load import load_variant

        device = spec.device or settings.device
        load = partial(load_variant, spec.name, spec.source, spec.dtype or settings.dtype)
        return NativeBackend(spec.name, spec.source, device, load, settings.engine_config(), observer)

    from service.backends.upstream import UpstreamBackend, UpstreamConfig, api_key_from_env

    upstream = UpstreamConfig(
        url=spec.url or "",
        upstream_model=spec.upstream_model,
        api_key=api_key_from_env(spec.api_key_env),
        max_inflight=spec.max_inflight or settings.upstream_max_inflight,
        max_queue=settings.max_queue,
        max_tokens=settings.max_tokens,
        request_timeout_s=settings.request_timeout_s,
        wait_s=settings.upstream_wait_s,
    )
    if spec.backend == "url":
        return UpstreamBackend(spec.name, upstream, observer, local_manifest(spec.manifest_dir))

    from service.backends.vllm import VllmBackend, VllmConfig, parse_command

    vllm = VllmConfig(
        model=str(Path(spec.source).expanduser()),
        command=parse_command(spec.vllm_command or settings.vllm_command),
        dtype=spec.dtype or settings.dtype,
        max_model_len=spec.max_model_len,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        extra_args=(*settings.vllm_args, *spec.vllm_args),
        env=settings.vllm_env | spec.vllm_env,
        startup_timeout_s=settings.vllm_startup_timeout_s,
        log_path=log_dir(settings) / f"vllm-{spec.name}.log",
    )
    manifest = local_manifest(spec.manifest_dir or spec.source)
    return VllmBackend(spec.name, vllm, upstream, observer, manifest)
