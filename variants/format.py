"""The variant format: a standard transformers checkpoint plus `trimserve.json`.

A variant directory holds `config.json`, `model.safetensors` (or shards), tokenizer files,
`generation_config.json`, and the manifest below. Loading verifies every weight file's
sha256 against the manifest, so a tampered or truncated checkpoint (or a weight file the
manifest does not list, a pickle included) is refused. Only safetensors is ever written or
read. Directories are written atomically and world-readable. This module imports no torch:
the server reads manifests with it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "trimserve.json"
FORMAT_VERSION = 1
# Variants are read by other users (a server container's uid, a shared volume): world-readable.
FILE_MODE, DIR_MODE = 0o644, 0o755


class VariantError(RuntimeError):
    """A variant directory is missing, inconsistent, or fails verification."""


class BaseModelRef(BaseModel):
    source: str  # alias, path or hub id the variant was made from
    sha256: str | None = None  # of the base weights, when they are on disk


class CalibrationRef(BaseModel):
    source: str
    nsamples: int
    seqlen: int
    seed: int


class ParamCounts(BaseModel):
    total: int
    nonzero: int


class VariantManifest(BaseModel):
    """How a variant was made and how it scored."""

    format_version: int = FORMAT_VERSION
    name: str
    base: BaseModelRef
    method: str
    settings: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationRef | None = None
    seed: int = 0
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = ""
    num_layers: int = 0
    params: ParamCounts = ParamCounts(total=0, nonzero=0)
    layer_sparsity: dict[str, float] = Field(default_factory=dict)
    eval: dict[str, float] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)  # method-specific (step sizes, trajectories)
    notes: list[str] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict)  # weight file -> sha256

    def recipe(self) -> dict[str, Any]:
        """What determines the weights: equal recipes give the same variant."""
        return {
            "base": self.base.model_dump(),
            "method": self.method,
            "settings": self.settings,
            "calibration": self.calibration.model_dump() if self.calibration else None,
            "seed": self.seed,
        }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


# Files a loader could take weights from: a variant lists every one it holds, in its manifest.
WEIGHT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".gguf", ".npz", ".npy"}
)


def weight_like_files(directory: Path) -> list[Path]:
    """Every file beside the config that holds, or could hold, weights (pickles included)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_sha256(source: str | Path) -> str | None:
    """sha256 of a checkpoint's weights (one file: its hash; shards: hash of their hashes)."""
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    files = weight_files(path) if path.is_dir() else []
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("trimserve", "torch", "transformers", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def read_manifest(directory: str | Path) -> VariantManifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise VariantError(f"{directory}: no {MANIFEST}, so this is not a trimserve variant")
    try:
        return VariantManifest.model_validate_json(path.read_text())
    except ValueError as err:
        raise VariantError(f"{path}: invalid manifest: {err}") from err


def verify_variant(directory: str | Path) -> VariantManifest:
    """Check every weight file against the manifest's sha256; raise VariantError on mismatch."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    on_disk = {f.name for f in weight_like_files(directory)}
    if not manifest.files:
        raise VariantError(f"{directory}: manifest lists no weight files")
    if extra := on_disk - set(manifest.files):
        raise VariantError(f"{directory}: weight files not in the manifest: {sorted(extra)}")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise VariantError(f"{directory}: weight file {name} is missing")
        if sha256_file(path) != expected:
            raise VariantError(f"{directory}: {name} does not match its sha256 (tampered or truncated)")
    return manifest


def check_output_dir(out_dir: str | Path, manifest: VariantManifest) -> bool:
    """Before any work: True if out_dir already holds this exact variant (reuse it).

    Raises VariantError if it holds a different variant or unrelated files.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise VariantError(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return False
    if not (out_dir / MANIFEST).is_file():
        raise VariantError(f"{out_dir}: not empty and not a trimserve variant; choose another --out")
    existing = read_manifest(out_dir)
    if existing.recipe() != manifest.recipe():
        raise VariantError(
            f"{out_dir}: already holds a different variant ({existing.name}, method {existing.method}); "
            "choose another --out or delete it"
        )
    return True


def make_readable(directory: Path) -> None:
    """Every file under `directory` FILE_MODE and every folder DIR_MODE, whatever wrote them
    (mkdtemp and some writers create them private)."""
    directory.chmod(DIR_MODE)
    for path in directory.rglob("*"):
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """A fresh directory beside `target`, renamed onto it when the block succeeds and removed if
    it fails, so an interrupted write never leaves a partial `target`. What lands is world-readable."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        make_readable(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: str | Path, manifest: VariantManifest) -> None:
    """(Re)write the manifest, e.g. after evaluation adds scores; weights are untouched."""
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.chmod(FILE_MODE)
    tmp.replace(path)


def record_eval(directory: str | Path, results: dict[str, float], protocol: dict[str, Any]) -> None:
    """Add scores to a variant's manifest, so `/v1/variants/{name}` and the A/B report show them."""
    manifest = read_manifest(directory)
    manifest.eval.update(results)
    manifest.stats["eval_protocol"] = protocol
    write_manifest(directory, manifest)
