"""Building variants: recipes as data, one build path, reuse, and a rebuild from the manifest alone."""

from __future__ import annotations

import pytest

from pruning.depth.pipeline import DepthSettings
from pruning.sparse.pipeline import SparseConfig
from tests.tiny_models import save_tiny_variant
from variants.build import build_variant, rebuild
from variants.format import CalibrationRef, VariantError, read_manifest, sha256_file
from variants.recipes import RECIPE, DepthRecipe, SparseRecipe

CALIB = CalibrationRef(source="c4", nsamples=4, seqlen=32, seed=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    return str(save_tiny_variant(tmp_path_factory.mktemp("src") / "tiny", tokenizer, layers=4))


def test_recipes_round_trip_through_json() -> None:
    sparse = SparseRecipe.from_options("trim", 0.6, "", "wanda", owl_lambda=0.05, sequential=True, dtype="bf16")
    depth = DepthRecipe.from_options("streamline", 2, streamline={"replacement": "ffn", "epochs": 2})
    for recipe in (sparse, depth):
        assert RECIPE.validate_python(recipe.model_dump(mode="json")) == recipe
    assert sparse.method == "trim+owl+wanda+seq" and sparse.config.trim is not None and sparse.config.owl.lam == 0.05
    assert depth.config.streamline.replacement == "ffn" and depth.method == "depth/streamline"


def test_owl_and_trim_default_to_the_best_measured_settings() -> None:
    """bench/RESULTS.md, Sparsity: OWL over SparseGPT's update; TRIM over ALPS's, with OWL and input recalculation."""
    assert SparseRecipe.from_options("trim", 0.7).method == "trim+owl+alps+seq"
    assert SparseRecipe.from_options("owl", 0.7).method == "owl+sparsegpt"
    assert SparseRecipe.from_options("wanda", 0.7).method == "wanda"  # the plain methods stay plain
    plain_trim = SparseRecipe.from_options("trim", 0.7, base="wanda", sequential=False, owl=False)
    assert plain_trim.method == "trim+wanda" and plain_trim.config.owl is None
    assert SparseRecipe.from_options("sparsegpt", 0.7, owl=True).method == "owl+sparsegpt"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SparseRecipe.from_options("owl", 0.7, owl=False), "--no-owl contradicts"),
        (lambda: SparseRecipe.from_options("trim", 0.7, owl=False, owl_lambda=0.1), "--no-owl contradicts"),
        (lambda: SparseRecipe.from_options("trim", pattern="2:4"), "cannot be combined"),
        (lambda: SparseRecipe.from_options("wanda", 1.2), "sparsity must be in"),
        (lambda: SparseRecipe.from_options("wanda", 0.4, pattern="2:4"), "drop --sparsity"),
        (lambda: DepthRecipe.from_options("trimllm", 2), "--domain"),
        (lambda: DepthRecipe(config=DepthSettings("shortgpt", 0)), "at least 1"),
        (lambda: RECIPE.validate_python({"kind": "sparse", "config": {"method": "wanda"}, "extra": 1}), "extra"),
    ],
)
def test_impossible_recipes_are_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "recipe",
    [
        SparseRecipe(config=SparseConfig("wanda", 0.5), compressed=True),
        DepthRecipe(config=DepthSettings("shortgpt", 2)),
    ],
    ids=["wanda", "shortgpt"],
)
def test_build_reuse_and_rebuild_give_the_same_weights(source, tmp_path, recipe) -> None:
    built = build_variant(source, recipe, CALIB, tmp_path / "v")
    assert not built.reused and built.manifest.settings == recipe.model_dump(mode="json")
    assert built.manifest.calibration == CALIB and built.manifest.base.sha256
    again = build_variant(source, recipe, CALIB, tmp_path / "v")
    assert again.reused and again.manifest == read_manifest(tmp_path / "v")
    rebuilt = rebuild(tmp_path / "v", tmp_path / "again")
    assert not rebuilt.reused
    assert sha256_file(tmp_path / "again" / "model.safetensors") == sha256_file(tmp_path / "v" / "model.safetensors")
    with pytest.raises(VariantError, match="different variant"):
        other = recipe.model_copy(update={"dtype": "bf16"})
        build_variant(source, other, CALIB, tmp_path / "v")


def test_a_manifest_from_an_older_version_cannot_be_rebuilt(source, tmp_path) -> None:
    with pytest.raises(VariantError, match="not a recipe this version reads"):
        rebuild(source, tmp_path / "x")  # the tiny source's manifest records method "none", no recipe
