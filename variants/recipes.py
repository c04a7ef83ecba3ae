"""Recipes: how a variant is made, as data.

A recipe is the method's own config (a validated dataclass from `pruning`) plus what the build
needs besides it (the dtype the model is pruned in, how much calibration runs at once, what to
write). With the calibration data (`variants.format.CalibrationRef`) it is everything that
determines a variant's weights. The manifest stores it under `settings`, so
`variants.build.rebuild` makes the same variant again from a manifest alone.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from pruning.depth.pipeline import DepthSettings
from pruning.depth.streamline import StreamlineConfig
from pruning.depth.trimllm import TrimLLMConfig
from pruning.sparse.admm import AdmmConfig
from pruning.sparse.alps import AlpsConfig
from pruning.sparse.masks import parse_pattern
from pruning.sparse.owl import OwlConfig
from pruning.sparse.pipeline import SparseConfig
from pruning.sparse.trim import TrimConfig

Dtype = Literal["fp32", "bf16", "fp16"]

# `--method owl` and `--method trim` unless told otherwise: the settings that measured best on the
# default model at 70% (bench/RESULTS.md, Sparsity): OWL's ratios over SparseGPT's update (285.8;
# over Wanda's 674.6), and TRIM's rows over ALPS's reconstruction with OWL's ratios and input
# recalculation (124.9; the same over SparseGPT 231.3). Each can be turned off or changed
# (`--base`, `--no-owl`, `--no-sequential`).
METHOD_DEFAULTS: dict[str, dict[str, object]] = {
    "owl": {"base": "sparsegpt"},
    "trim": {"base": "alps", "owl": True, "sequential": True},
}


class SparseRecipe(BaseModel):
    """Unstructured or N:M sparsity of every linear in the decoder blocks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["sparse"] = "sparse"
    config: SparseConfig
    dtype: Dtype = "fp32"
    batch_size: int = Field(8, ge=1)  # calibration windows per block forward
    compressed: bool = True  # also write the bitmask + values copy

    @property
    def method(self) -> str:
        return self.config.label.split(" ")[0]

    @property
    def calibrated(self) -> bool:
        return self.config.calibrated

    @classmethod
    def from_options(
        cls,
        method: str,
        sparsity: float | None = None,
        pattern: str | None = None,
        base: str | None = None,
        owl_lambda: float | None = None,
        owl_m: float | None = None,
        owl_nsamples: int | None = None,
        trim_tokens: str = "last",
        sequential: bool | None = None,
        owl: bool | None = None,
        alps: dict | None = None,
        admm: dict | None = None,
        **build: object,
    ) -> SparseRecipe:
        """The recipe `trimserve prune sparse` options describe; ValueError on any combination
        that does not exist. `--method owl` is OWL over `base` scores, `trim` TRIM rows over them;
        `alps` and `admm` set their solvers' settings (field names of AlpsConfig, AdmmConfig).
        `base`, `sequential` and `owl` left as None take the method's defaults (METHOD_DEFAULTS)."""
        nm = parse_pattern(pattern)
        if nm and sparsity is not None and abs(sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(f"--pattern {pattern} sets sparsity {nm[0] / nm[1]}; drop --sparsity")
        if method == "trim" and nm:
            raise ValueError("--pattern cannot be combined with --method trim (row-varying sparsity is not N:M)")
        amount = nm[0] / nm[1] if nm else (0.5 if sparsity is None else sparsity)
        if base is not None and method not in METHOD_DEFAULTS:
            raise ValueError(f"--base applies to --method owl and trim, not {method}")
        defaults = METHOD_DEFAULTS.get(method, {})
        owl_options = any(v is not None for v in (owl_lambda, owl_m, owl_nsamples))
        if owl is False and (method == "owl" or owl_options):
            raise ValueError("--no-owl contradicts --method owl and the --owl-* options")
        use_owl = method == "owl" or owl_options or (bool(defaults.get("owl")) if owl is None else owl)
        ratios = OwlConfig(0.08 if owl_lambda is None else owl_lambda, owl_m or 5.0, owl_nsamples) if use_owl else None
        trim = TrimConfig(tokens=trim_tokens) if method == "trim" else None
        scores = (base or str(defaults["base"])) if method in METHOD_DEFAULTS else method
        if sequential is None:
            sequential = bool(defaults.get("sequential", False))
        solvers = {
            "alps": solver_config(AlpsConfig, alps) if scores == "alps" or alps else None,
            "admm": solver_config(AdmmConfig, admm) if scores == "admm" or admm else None,
        }
        config = SparseConfig(scores, amount, nm, ratios, trim, sequential=sequential, **solvers)
        return cls(config=config, **build)


def solver_config(kind: type, options: dict | None) -> object:
    """An AlpsConfig or AdmmConfig from `{field: value}` (strings converted to the field's type)."""
    names = {f.name: f.type for f in fields(kind)}
    unknown = sorted(set(options or {}) - set(names))
    if unknown:
        raise ValueError(f"unknown {kind.__name__} settings {unknown}; known: {sorted(names)}")
    values = {}
    for name, value in (options or {}).items():
        convert = {"int": int, "float": float, "bool": lambda v: str(v).lower() in ("1", "true", "yes")}[names[name]]
        values[name] = convert(value)
    return kind(**values)


class DepthRecipe(BaseModel):
    """Whole layers removed (ShortGPT, angular, SLEB, LLM-Streamline, TrimLLM)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["depth"] = "depth"
    config: DepthSettings
    domain: str | None = None  # TrimLLM's domain text source
    teacher: str | None = None  # TrimLLM's distillation teacher (default: the source model, unpruned)
    track_wikitext: int = Field(0, ge=0)  # TrimLLM: WikiText-2 windows scored after every drop
    dtype: Dtype = "fp32"

    @property
    def method(self) -> str:
        return f"depth/{self.config.method}"

    @property
    def calibrated(self) -> bool:
        """TrimLLM learns from its domain text; every other depth method from calibration windows."""
        return self.config.method != "trimllm"

    def model_post_init(self, context: object) -> None:
        if self.config.method == "trimllm" and not self.domain:
            raise ValueError("trimllm needs a domain text source (--domain)")
        if self.teacher and not (self.config.trimllm and self.config.trimllm.distils):
            raise ValueError("--teacher applies to trimllm with --heal kd or kd+lm")

    @classmethod
    def from_options(
        cls,
        method: str,
        remove: int,
        seed: int = 0,
        seqlen: int = 512,
        streamline: dict | None = None,
        trimllm: dict | None = None,
        **rest: object,
    ) -> DepthRecipe:
        """The recipe `trimserve prune depth` options describe (method configs from their options)."""
        settings = DepthSettings(
            method=method,
            remove=remove,
            seed=seed,
            streamline=StreamlineConfig(remove=remove, seed=seed, **streamline) if method == "streamline" else None,
            trimllm=TrimLLMConfig(remove=remove, seed=seed, seqlen=seqlen, **(trimllm or {}))
            if method == "trimllm"
            else None,
        )
        return cls(config=settings, **rest)


Recipe = Annotated[SparseRecipe | DepthRecipe, Field(discriminator="kind")]
RECIPE = TypeAdapter(Recipe)
