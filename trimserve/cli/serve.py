"""`trimserve serve`: the OpenAI-compatible server (in-process engines, upstream servers, or both)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

# CLI flag -> Settings field; flags left unset fall back to TRIMSERVE_* env vars, then defaults.
SERVE_FLAGS = {
    "host": "host",
    "port": "port",
    "config": "config_file",
    "variants_dir": "variants_dir",
    "dtype": "dtype",
    "device": "device",
    "api_key": "api_key",
    "max_batch_size": "max_batch_size",
    "kv_cache_gib": "kv_cache_gib",
    "prefill_tokens_per_step": "prefill_tokens_per_step",
    "prefix_cache_mib": "prefix_cache_mib",
    "compile_decode": "compile_decode",
    "max_queue": "max_queue",
    "max_prompt_tokens": "max_prompt_tokens",
    "max_tokens": "max_tokens",
    "request_timeout": "request_timeout_s",
    "shutdown_timeout": "shutdown_timeout_s",
    "max_body_bytes": "max_body_bytes",
    "threads": "torch_threads",
    "vllm_command": "vllm_command",
    "vllm_startup_timeout": "vllm_startup_timeout_s",
}


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API",
        description="With no --model/--config: the default model as `full` plus its variants in the variants dir.",
    )
    serve.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="a model to serve (repeat): NAME=PATH (in-process engine), NAME=http://host:port/v1 (any "
        "OpenAI-compatible server) or NAME=vllm:PATH (a vllm serve process trimserve supervises)",
    )
    serve.add_argument("--config", type=Path, help="TOML or YAML listing models (name, source, dtype, device) and ab")
    serve.add_argument("--ab", action="append", default=[], metavar="EXP=VAR:W,VAR:W", help="an A/B experiment")
    serve.add_argument(
        "--shadow",
        action="append",
        default=[],
        metavar="REF=VAR,VAR@RATE",
        help="the variants rate a share RATE of REF's answers on live traffic (e.g. full=depth4,sparse40@0.1)",
    )
    serve.add_argument("--variants-dir", type=Path, help="where default variants are found")
    serve.add_argument(
        "--dtype", help="default dtype: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16, fp16"
    )
    serve.add_argument("--device", help="default device (cpu, cuda, auto)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--api-key", help="require this bearer token (also TRIMSERVE_API_KEY)")
    serve.add_argument("--max-batch-size", type=int, help="requests decoded together (default: sized from memory)")
    serve.add_argument(
        "--kv-cache-gib",
        type=float,
        help="cache memory per in-process model: sizes the batch; kept prefixes use what it leaves (default: 1/4 free)",
    )
    serve.add_argument(
        "--prefill-tokens-per-step",
        type=int,
        help="prompt tokens prefilled per engine step (default 1024); longer prompts are chunked",
    )
    serve.add_argument(
        "--prefix-cache-mib",
        type=float,
        help="cap on the memory per in-process model for finished requests' caches, which prompts that "
        "start the same way reuse instead of prefilling (default: what the batch's cache leaves of "
        "--kv-cache-gib; 0: off)",
    )
    serve.add_argument(
        "--compile-decode",
        action="store_true",
        default=None,
        help="compile each in-process model's decode steps: faster per token, minutes of compiling at "
        "start-up and more memory (needs a C++ compiler on CPU)",
    )
    serve.add_argument("--max-queue", type=int)
    serve.add_argument("--max-prompt-tokens", type=int)
    serve.add_argument("--max-tokens", type=int)
    serve.add_argument("--request-timeout", type=float, help="seconds")
    serve.add_argument("--shutdown-timeout", type=float, help="seconds to finish in-flight requests at exit")
    serve.add_argument("--max-body-bytes", type=int)
    serve.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    serve.add_argument("--vllm-command", help="how vllm backends start vLLM (default `vllm serve`)")
    serve.add_argument("--vllm-startup-timeout", type=float, help="seconds a vLLM process may take to start")
    serve.add_argument(
        "--vllm-env", action="append", default=[], metavar="KEY=VALUE", help="environment for every vLLM process"
    )
    serve.add_argument(
        "--vllm-arg", action="append", default=[], metavar="ARG", help="an argument for every vLLM process (repeat)"
    )
    serve.set_defaults(func=cmd_serve)


def serve_settings(args: argparse.Namespace):
    from service.ab import parse_ab
    from service.registry import parse_model_arg
    from service.settings import Settings
    from service.shadow import parse_shadow

    overrides: dict[str, Any] = {
        field: getattr(args, flag) for flag, field in SERVE_FLAGS.items() if getattr(args, flag) is not None
    }
    if args.model:
        overrides["models"] = [parse_model_arg(text) for text in args.model]
    if args.ab:
        overrides["ab"] = {e.name: dict(e.arms) for e in map(parse_ab, args.ab)}
    if args.shadow:
        specs = [parse_shadow(text) for text in args.shadow]
        overrides["shadow"] = {sp.reference: {"variants": list(sp.variants), "rate": sp.rate} for sp in specs}
    if args.vllm_env:
        pairs = [text.partition("=") for text in args.vllm_env]
        if any(not sep or not key for key, sep, _ in pairs):
            raise ValueError(f"--vllm-env takes KEY=VALUE, not {args.vllm_env}")
        overrides["vllm_env"] = {key: value for key, _, value in pairs}
    if args.vllm_arg:
        overrides["vllm_args"] = list(args.vllm_arg)
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service import http_server
    from service.ab import experiments_from
    from service.app import create_app, drain, preflight
    from service.backends import make_backend
    from service.registry import serve_plan

    try:
        settings = serve_settings(args)
    except ValidationError as err:
        raise ValueError(str(err)) from None
    plan = serve_plan(settings)  # fail fast on a bad config, before loading anything
    experiments_from(plan.ab, {s.name for s in plan.models})
    asyncio.run(preflight([make_backend(spec, settings) for spec in plan.models]))
    if settings.torch_threads is not None:
        import torch

        # A host shared with other CPU-heavy processes may do better with fewer intra-op threads.
        torch.set_num_threads(settings.torch_threads)
    app = create_app(settings)
    server = http_server.Server(
        http_server.config(app, settings.host, settings.port), drain=lambda: drain(app.state.trimserve)
    )
    server.run()
    return 0
