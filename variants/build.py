"""Building a variant: a source model, a recipe and calibration data in; a checkpoint and manifest out.

`build_variant` checks the recipe against the source's config and reads the data before any
model work, loads the source in the recipe's dtype, draws the calibration windows (or reads
TrimLLM's domain text), runs the method from `pruning`, and writes the variant atomically
(`variants.write`). An output directory already holding the same recipe is reused as it is.
`build_from_model` does the same on a model already in memory, which lets a benchmark prune
copies of one loaded model and share one calibration pass between depth methods (`shared`).
`rebuild` makes a variant again from another variant's manifest.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from evaluation.data import calibration_windows, eval_windows, load_texts, tokenize_joined
from evaluation.evaluate import window_nll
from pruning.blocks import LAYOUTS, UnsupportedArchitecture
from pruning.depth.distill import TeacherLogits
from pruning.depth.pipeline import Calibration, prune_depth
from pruning.depth.trimllm import split_domain
from pruning.sparse.pipeline import prune_model
from variants.decilm import llama_config
from variants.format import (
    BaseModelRef,
    CalibrationRef,
    VariantError,
    VariantManifest,
    check_output_dir,
    read_manifest,
    weights_sha256,
    write_manifest,
)
from variants.load import load_model, resolve_model
from variants.noop import NOOP_KEY, NOOP_NOTE
from variants.recipes import RECIPE, DepthRecipe, Recipe, SparseRecipe
from variants.write import save_variant, write_sparse_variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Built:
    manifest: VariantManifest
    reused: bool  # the output directory already held this variant; nothing was built


@dataclass(frozen=True)
class Inputs:
    """What a method reads besides the model: calibration windows, or TrimLLM's domain tokens."""

    calibration: Calibration | None = None
    domain: torch.Tensor | None = None
    teacher: PreTrainedModel | None = None  # TrimLLM's distillation teacher, when not the source itself


def manifest_for(
    source: str, recipe: Recipe, calibration: CalibrationRef | None, name: str, seed: int = 0
) -> VariantManifest:
    """The manifest a build starts from: what it is made from and how (filled in as it runs)."""
    if recipe.calibrated and calibration is None:
        raise ValueError(f"{recipe.method} needs calibration data")
    return VariantManifest(
        name=name,
        base=BaseModelRef(source=str(source), sha256=weights_sha256(resolve_model(source))),
        method=recipe.method,
        settings=recipe.model_dump(mode="json"),
        calibration=calibration if recipe.calibrated else None,
        seed=calibration.seed if recipe.calibrated else seed,
    )


def source_config(source: str) -> PretrainedConfig:
    """The source's config, without loading weights (a DeciLM export reads as Llama)."""
    path = resolve_model(source)
    return llama_config(path) or AutoConfig.from_pretrained(path)


def check_source(source: str, recipe: Recipe) -> None:
    """What can be known from the source's config alone, before anything loads."""
    config = source_config(source)
    if config.model_type not in LAYOUTS:
        raise UnsupportedArchitecture(
            f"architecture {config.model_type!r} is not supported; supported: {sorted(LAYOUTS)}"
        )
    if isinstance(recipe, DepthRecipe):
        recipe.config.check(config.num_hidden_layers)


def build_variant(
    source: str,
    recipe: Recipe,
    calibration: CalibrationRef | None,
    out: str | Path,
    *,
    device: str = "cpu",
    offload: bool = False,
    name: str | None = None,
) -> Built:
    """Prune `source` by `recipe` on `calibration` and write the variant to `out`."""
    out = Path(out)
    manifest = manifest_for(source, recipe, calibration, name or out.name)
    if check_output_dir(out, manifest):
        return Built(read_manifest(out), reused=True)
    check_source(source, recipe)
    texts = load_texts(calibration.source) if recipe.calibrated else None  # bad data fails before the model loads
    model, tokenizer = load_model(source, recipe.dtype, "cpu" if offload else device)
    teacher = load_teacher(recipe.teacher, tokenizer, model, device) if isinstance(recipe, DepthRecipe) else None
    manifest = build_from_model(
        model, tokenizer, manifest, recipe, out, texts=texts, device=device, offload=offload, teacher=teacher
    )
    return Built(manifest, reused=False)


def load_teacher(
    source: str | None, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel, device: str
) -> PreTrainedModel | None:
    """A distillation teacher other than the student's own source; it must share the student's
    tokenizer and vocabulary, since the student learns the teacher's distribution token by token."""
    if source is None:
        return None
    teacher, teacher_tokenizer = load_model(source, "fp32", device)
    ours, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours != theirs or teacher.config.vocab_size != student.config.vocab_size:
        differ = sum(1 for token, i in theirs.items() if ours.get(token) != i)
        raise ValueError(
            f"teacher {source}'s tokenizer differs from the student's ({len(theirs)} tokens against "
            f"{len(ours)}, {differ} of them with another id; vocab size {teacher.config.vocab_size} "
            f"against {student.config.vocab_size}): distillation needs the same tokenizer"
        )
    return teacher


def build_from_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    manifest: VariantManifest,
    recipe: Recipe,
    out: str | Path,
    *,
    texts: list[str] | None = None,
    shared: Calibration | None = None,
    device: str = "cpu",
    offload: bool = False,
    teacher: PreTrainedModel | TeacherLogits | None = None,
) -> VariantManifest:
    """Prune `model` in place by `recipe` and write it as the variant `manifest` describes
    (`teacher`: a distilling TrimLLM's teacher model or its cached logits; default the model itself)."""
    inputs = prepare_inputs(tokenizer, manifest.calibration, recipe, texts, shared)
    if isinstance(recipe, SparseRecipe):
        windows = inputs.calibration.windows if inputs.calibration else None
        report = prune_model(model, windows, recipe.config, device, offload, recipe.batch_size)
        model.to("cpu")
        lrs = [info["lr"] for info in report.layers.values() if "lr" in info]
        manifest.stats = {
            "block_sparsity": report.block_sparsity,
            "owl_outlier_ratios": report.outlier_ratios,
            "linears": report.layers,
            "trim_lr_counts": {str(lr): lrs.count(lr) for lr in sorted(set(lrs))} if lrs else None,
            "prune_seconds": report.seconds,
        }
        return write_sparse_variant(model, tokenizer, out, manifest, compressed=recipe.compressed)
    outcome = prune_depth(
        model,
        recipe.config,
        calibration=inputs.calibration,
        domain=inputs.domain,
        tracker=wikitext_tracker(tokenizer, recipe),
        teacher=teacher,
    )
    manifest.stats = {"removed": outcome.removed, **outcome.stats}
    if "teacher" in manifest.stats and "source" not in manifest.stats["teacher"]:
        manifest.stats["teacher"]["source"] = recipe.teacher or f"{manifest.base.source} (unpruned)"
    manifest = save_variant(model, tokenizer, out, manifest)
    if getattr(model.config, NOOP_KEY, None):
        manifest.notes.append(NOOP_NOTE.format(layers=getattr(model.config, NOOP_KEY)))
        write_manifest(out, manifest)
    return manifest


def prepare_inputs(
    tokenizer: PreTrainedTokenizerBase,
    calibration: CalibrationRef | None,
    recipe: Recipe,
    texts: list[str] | None = None,
    shared: Calibration | None = None,
) -> Inputs:
    """The windows (or shared states) a recipe calibrates on, or TrimLLM's domain token stream."""
    if isinstance(recipe, DepthRecipe) and not recipe.calibrated:
        stream = tokenize_joined(load_texts(recipe.domain), tokenizer)
        split_domain(stream, recipe.config.trimllm)  # too little text: fail before any work
        return Inputs(domain=stream)
    if not recipe.calibrated:
        return Inputs()
    if shared is not None:
        return Inputs(calibration=shared)
    c = calibration
    windows = calibration_windows(texts or load_texts(c.source), tokenizer, c.nsamples, c.seqlen, c.seed)
    return Inputs(calibration=Calibration(windows))


def wikitext_tracker(tokenizer: PreTrainedTokenizerBase, recipe: Recipe):
    """TrimLLM's WikiText-2 perplexity on the first `track_wikitext` windows after every drop."""
    if not isinstance(recipe, DepthRecipe) or not recipe.track_wikitext:
        return None
    seqlen = recipe.config.trimllm.seqlen
    windows = eval_windows(tokenize_joined(load_texts("wikitext2"), tokenizer), seqlen, recipe.track_wikitext)
    return lambda model: math.exp(window_nll(model, windows, desc="wikitext2"))


def rebuild(variant: str | Path, out: str | Path, *, device: str = "cpu") -> Built:
    """The variant another variant's manifest describes, built again into `out`."""
    manifest = read_manifest(variant)
    try:
        recipe = RECIPE.validate_python(manifest.settings)
    except ValueError as err:
        raise VariantError(f"{variant}: the manifest's settings are not a recipe this version reads: {err}") from None
    return build_variant(manifest.base.source, recipe, manifest.calibration, out, device=device, name=manifest.name)
