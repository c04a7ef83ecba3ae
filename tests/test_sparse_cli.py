"""`trimserve prune sparse`: a variant with statistics and a bit-exact compressed copy; bad input first."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.tiny_models import save_tiny_variant
from trimserve.cli import main
from variants.compressed import load_compressed_model
from variants.format import read_manifest, verify_variant
from variants.load import load_model

CALIB = ["--calib", "c4", "--nsamples", "4", "--seqlen", "32"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_variant(tmp_path_factory.mktemp("sparse") / "tiny", tokenizer)


def test_trim_variant_with_stats_and_compressed_copy(tiny_dir, tmp_path, capsys):
    out = tmp_path / "trim70"
    args = ["prune", "sparse", str(tiny_dir), "--method", "trim", "--sparsity", "0.7", "--base", "wanda"]
    assert main([*args, "--no-sequential", *CALIB, "--out", str(out)]) == 0
    manifest = verify_variant(out)
    assert manifest.method == "trim+owl+wanda"  # OWL's ratios by default under TRIM
    linears = manifest.stats["linears"]
    assert len(linears) == 14 and all("lr" in v and "row_max" in v for v in linears.values())
    assert sum(manifest.stats["block_sparsity"]) / 2 == pytest.approx(0.7)
    storage = manifest.stats["storage"]
    assert storage["compressed_bytes"] < storage["dense_bytes"]
    dense, _ = load_model(out)
    compressed = load_compressed_model(out)
    for (name, a), b in zip(dense.state_dict().items(), compressed.state_dict().values(), strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name
    # same command again: the variant is reused, nothing rewritten
    assert main([*args, "--no-sequential", *CALIB, "--out", str(out)]) == 0
    assert "already holds this variant" in capsys.readouterr().out


def test_trim_defaults_are_the_best_measured_recipe(tiny_dir, tmp_path, capsys):
    out = tmp_path / "trim-defaults"
    assert (
        main(["prune", "sparse", str(tiny_dir), "--method", "trim", "--sparsity", "0.6", *CALIB, "--out", str(out)])
        == 0
    )
    manifest = verify_variant(out)
    assert manifest.method == "trim+owl+alps+seq"
    assert manifest.settings["config"]["owl"]["lam"] == 0.08 and manifest.settings["config"]["sequential"]
    with pytest.raises(SystemExit):
        main(["prune", "sparse", "--help"])
    assert "measured best" in capsys.readouterr().out


def test_alps_under_trim_rows_records_its_solver(tiny_dir, tmp_path):
    out = tmp_path / "alps"
    args = ["--method", "trim", "--base", "alps", "--sparsity", "0.6", "--alps", "max_iterations=12", "--no-owl"]
    assert main(["prune", "sparse", str(tiny_dir), *args, "--no-sequential", *CALIB, "--out", str(out)]) == 0
    manifest = verify_variant(out)
    assert manifest.method == "trim+alps" and manifest.settings["config"]["alps"]["max_iterations"] == 12
    linears = manifest.stats["linears"]
    assert all("lr" in v and v["iterations"] <= 12 and "error_after_refit" in v for v in linears.values())
    assert all(v["sparsity"] == pytest.approx(0.6, abs=1e-3) for v in linears.values())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "wanda", "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--method", "wanda", "--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
        (["--method", "wanda", "--pattern", "4:4"], "0 < N < M"),
        (["--method", "sparsegpt", "--pattern", "5:4"], "0 < N < M"),
        (["--method", "trim", "--pattern", "2:4"], "cannot be combined with --method trim"),
        (["--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7"], "drop --sparsity"),
        (["--method", "owl", "--owl-lambda", "0.9"], "OWL lambda"),
        (["--method", "owl", "--no-owl"], "--no-owl contradicts"),
        (["--method", "wanda", "--base", "alps"], "--base applies to --method owl and trim"),
        (["--method", "alps", "--alps", "rho0=0"], "ALPS needs rho0 > 0"),
        (["--method", "alps", "--alps", "max_iterations=0"], "max_iterations and check_every must be positive"),
        (["--method", "admm", "--admm", "rho=-1"], "ADMM rho must be positive"),
        (["--method", "admm", "--admm", "iterations=0"], "ADMM iterations must be positive"),
        (["--method", "alps", "--alps", "speed=9"], "unknown AlpsConfig settings ['speed']"),
        (["--method", "wanda", "--admm", "rho=1"], "admm settings given for method 'wanda'"),
    ],
)
def test_bad_input_fails_before_any_work(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(["prune", "sparse", str(tiny_dir), *extra, *CALIB, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unsupported_architecture(tmp_path, tokenizer, capsys):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    out = tmp_path / "out"
    assert main(["prune", "sparse", str(gpt2), "--method", "wanda", *CALIB, "--out", str(out)]) == 2
    assert "not supported" in capsys.readouterr().err
    assert not out.exists()


def test_out_dir_with_a_different_variant_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    assert (
        main(
            ["prune", "sparse", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.5", *CALIB, "--out", str(out)]
        )
        == 0
    )
    before = read_manifest(out)
    assert before.calibration is None  # plain magnitude pruning reads no calibration data
    assert (
        main(["prune", "sparse", str(tiny_dir), "--method", "wanda", "--sparsity", "0.5", *CALIB, "--out", str(out)])
        == 2
    )
    assert "different variant" in capsys.readouterr().err
    assert read_manifest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging leftovers
