"""`trimserve prune depth` and `prune depth-scan` on a tiny model: outputs, and bad input first."""

from __future__ import annotations

import json

import pytest
import torch

import pruning.depth.pipeline as pipeline
import variants.build as build
from tests.tiny_models import save_tiny_variant, tiny_llama
from trimserve.cli import main
from variants.format import BaseModelRef, VariantManifest, read_manifest
from variants.load import load_model
from variants.write import save_variant

CALIB = ["--calib", "c4", "--nsamples", "2", "--seqlen", "32"]


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    return save_tiny_variant(tmp_path / "tiny", tokenizer, layers=4)


@pytest.fixture
def domain_txt(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text("The patient presented with fever, cough and elevated inflammatory markers. " * 40)
    return path


@pytest.mark.parametrize(
    ("method", "extra"),
    [("shortgpt", []), ("angular", []), ("sleb", []), ("streamline", ["--replacement", "ffn", "--epochs", "2"])],
)
def test_depth_writes_a_loadable_variant(tiny_dir, tmp_path, method, extra, capsys):
    out = tmp_path / method
    assert (
        main(["prune", "depth", str(tiny_dir), "--method", method, "--remove", "2", *CALIB, *extra, "--out", str(out)])
        == 0
    )
    manifest = read_manifest(out)
    assert manifest.num_layers == 2 and manifest.method == f"depth/{method}"
    assert len(manifest.stats["removed"]) == (3 if method == "streamline" else 2)
    assert bool(manifest.notes) == (method == "streamline")
    model, _ = load_model(out)
    assert model.config.num_hidden_layers == 2
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, model.config.vocab_size)
    # The same command again reuses the variant instead of recomputing it.
    assert (
        main(["prune", "depth", str(tiny_dir), "--method", method, "--remove", "2", *CALIB, *extra, "--out", str(out)])
        == 0
    )
    assert "already exists" in capsys.readouterr().out


def test_trimllm_records_its_trajectory(tiny_dir, tmp_path, domain_txt):
    out = tmp_path / "trim"
    args = ["--method", "trimllm", "--remove", "2", "--domain", str(domain_txt), "--steps-per-round", "1"]
    args += ["--seqlen", "32", "--final-steps", "1", "--track-wikitext", "1"]
    assert main(["prune", "depth", str(tiny_dir), *args, "--out", str(out)]) == 0
    stats = read_manifest(out).stats
    assert [s["layers"] for s in stats["trajectory"]] == [4, 3, 2, 2]
    assert all(s["tracked_ppl"] > 1 for s in stats["trajectory"])
    assert len(stats["removed"]) == 2 and len(stats["trainable_layers"]) == 1
    assert (out / "trajectory.png").stat().st_size > 1000


def test_depth_scan_prints_and_saves_scores(tiny_dir, tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["prune", "depth-scan", str(tiny_dir), "--window", "2", "--sleb", "1", *CALIB, "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["block_influence"]) == 4 and len(scores["windows"]["2"]["cosine"]) == 3
    assert len(scores["sleb"]["removal_order"]) == 1
    assert (out / "scores.png").stat().st_size > 1000
    assert "block influence" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "shortgpt", "--remove", "0"], "at least 1"),
        (["--method", "shortgpt", "--remove", "4"], "at least one must remain"),
        (["--method", "streamline", "--remove", "3"], "window of 4"),
        (["--method", "angular", "--remove", "-2"], "at least 1"),
        (["--method", "trimllm", "--remove", "1"], "--domain"),
        (
            [
                "--method",
                "trimllm",
                "--remove",
                "1",
                "--domain",
                "d.txt",
                "--heal",
                "lm",
                "--teacher-finetune-steps",
                "3",
            ],
            "needs a teacher",
        ),
        (
            ["--method", "trimllm", "--remove", "1", "--domain", "d.txt", "--heal", "lm", "--teacher", "t"],
            "--teacher applies",
        ),
        (["--method", "trimllm", "--remove", "1", "--domain", "d.txt", "--lora-rank", "-1"], "lora_rank"),
        (["--method", "sleb", "--remove", "3"], "SLEB keeps"),
    ],
)
def test_bad_input_fails_before_calibration(tiny_dir, tmp_path, monkeypatch, args, message, capsys):
    monkeypatch.setattr(build, "calibration_windows", _no_work)
    assert main(["prune", "depth", str(tiny_dir), *args, *CALIB, "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "v").exists()


def test_domain_too_small_fails_before_training(tiny_dir, tmp_path, monkeypatch, capsys):
    small = tmp_path / "small.txt"
    small.write_text("Too short for a held-out slice.")
    monkeypatch.setattr(pipeline, "trimllm", _no_work)
    args = ["--method", "trimllm", "--remove", "1", "--domain", str(small), "--seqlen", "32"]
    assert main(["prune", "depth", str(tiny_dir), *args, "--out", str(tmp_path / "v")]) == 2
    assert "held-out" in capsys.readouterr().err


def test_scan_window_past_last_layer(tiny_dir, tmp_path, capsys):
    assert main(["prune", "depth-scan", str(tiny_dir), "--window", "4", *CALIB, "--out", str(tmp_path / "s")]) == 2
    assert "window of 4 layers" in capsys.readouterr().err


def _no_work(*_args, **_kwargs):
    raise AssertionError("work started before the input was validated")


def test_export_decilm_writes_what_vllm_loads_and_trimserve_reads(tmp_path, tokenizer, capsys):
    source = tiny_llama(layers=5)
    source.config.intermediate_size = 256  # DeciLM's ffn_mult widths are multiples of 256
    torch.manual_seed(2)  # a model whose most redundant window is not at layer 0 (vLLM needs attention there)
    source = type(source)(source.config).eval()
    save_variant(
        source,
        tokenizer,
        tmp_path / "src",
        VariantManifest(name="src", base=BaseModelRef(source="random"), method="none"),
    )
    out = tmp_path / "ffn"
    args = ["--method", "streamline", "--replacement", "ffn", "--remove", "1", *CALIB, "--export", "decilm"]
    assert main(["prune", "depth", str(tmp_path / "src"), *args, "--out", str(out)]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    noop = [i for i, block in enumerate(config["block_configs"]) if block["attention"]["no_op"]]
    assert config["architectures"] == ["DeciLMForCausalLM"] and noop == config["trimserve_noop_attention"] == [
        read_manifest(out).stats["window_start"]
    ]
    model, _ = load_model(out)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 4
    assert "DeciLM layout" in capsys.readouterr().out


def test_export_decilm_refuses_a_width_it_cannot_express_before_work(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "calibration_windows", _no_work)
    args = ["--method", "shortgpt", "--remove", "1", *CALIB, "--export", "decilm", "--out", str(tmp_path / "v")]
    assert main(["prune", "depth", str(tiny_dir), *args]) == 2
    assert "ffn_mult" in capsys.readouterr().err and not (tmp_path / "v").exists()


def test_trimllm_on_a_users_jsonl_derives_and_prints_its_settings(tiny_dir, tmp_path, capsys):
    notes = tmp_path / "notes.jsonl"
    line = "The patient presented with fever, cough and elevated inflammatory markers."
    notes.write_text("".join(json.dumps({"body": f"{line} Case {i}."}) + "\n" for i in range(40)))
    out = tmp_path / "trim"
    args = ["--method", "trimllm", "--remove", "1", "--domain", f"{notes}:body", "--seqlen", "32", "--heal", "kd"]
    assert main(["prune", "depth", str(tiny_dir), *args, "--out", str(out)]) == 0
    stats = read_manifest(out).stats
    training, teacher = stats["training"], stats["teacher"]
    assert training["heal"] == "kd" and training["heldout_windows"] == 1 and training["lr"] == 2e-4
    assert (
        training["steps_per_round"] >= 1
        and len(stats["losses"]) == training["steps_per_round"] + training["final_steps"]
    )
    assert teacher["source"] == f"{tiny_dir} (unpruned)" and teacher["top_k"] == 64 and 0 < teacher["mass"] <= 1
    printed = capsys.readouterr().out
    assert f"{training['steps_per_round']} steps per drop + {training['final_steps']} after the last" in printed
