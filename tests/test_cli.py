import json
import subprocess
import sys

import pytest

from tests.tiny_models import save_tiny_variant
from trimserve.cli import main


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    return save_tiny_variant(tmp_path / "tiny", tokenizer)


def test_eval_writes_named_metrics(tiny_dir, tmp_path, capsys):
    text = tmp_path / "domain.txt"
    text.write_text("Clinical notes describe the patient's symptoms and treatment. " * 60)
    out = tmp_path / "res.json"
    code = main(["eval", str(tiny_dir), "--ppl", str(text), "--seqlen", "64", "--max-windows", "3", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results) == {"ppl_domain"} and results["ppl_domain"] > 1
    printed = capsys.readouterr().out
    assert "ppl_domain" in printed and "first 3 windows" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ppl", "/nonexistent/file.txt"], "/nonexistent/file.txt: no such file"),
        (["--ppl", "nonsense-source"], "unknown source"),
        ([], "nothing to evaluate"),
        (["--mc", "trivia"], "unknown multiple-choice set"),
        (["--ppl", "wikitext2", "--seqlen", "1"], "--seqlen must be at least 2"),
    ],
)
def test_eval_bad_input_is_a_clear_error(tiny_dir, args, message, capsys):
    assert main(["eval", str(tiny_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--ppl", "wikitext2"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.integration
def test_console_script_evaluates_the_default_model(tmp_path, default_model_dir):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "trimserve", "eval", "smollm2-135m", "--ppl", "wikitext2", "--seqlen", "128"]
    cmd += ["--max-windows", "2", "--mc", "pubmedqa", "--mc-limit", "4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert set(results) == {"ppl_wikitext2", "mc_pubmedqa_acc", "mc_pubmedqa_acc_norm"}
    assert 5 < results["ppl_wikitext2"] < 200
    assert "ppl_wikitext2" in proc.stdout


def test_eval_records_scores_in_the_variant_manifest(tiny_dir, tmp_path):
    from variants.format import read_manifest, verify_variant

    text = tmp_path / "notes.txt"
    text.write_text("Discharge summary: the patient recovered well after surgery. " * 40)
    assert main(["eval", str(tiny_dir), "--ppl", str(text), "--seqlen", "32", "--max-windows", "2"]) == 0
    manifest = verify_variant(tiny_dir)  # weights untouched, hashes still valid
    assert set(manifest.eval) == {"ppl_notes"}
    assert manifest.stats["eval_protocol"] == {"seqlen": 32, "max_windows": 2}
    assert main(["eval", str(tiny_dir), "--ppl", str(text), "--seqlen", "32", "--no-record"]) == 0
    assert read_manifest(tiny_dir).stats["eval_protocol"]["max_windows"] == 2
