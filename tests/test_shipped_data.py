"""The data shipped in evaluation/shipped/: complete, the original bytes, checked at load, and TRIMSERVE_DATA_DIR."""

import hashlib
import lzma
import re
import shutil
from pathlib import Path

import pytest

from evaluation import local
from evaluation.data import load_texts
from evaluation.local import SHIPPED_DIR, LocalRecords, read_shipped
from evaluation.questions import load_mc
from evaluation.records import DataError
from trimserve.cli import main

ROOT = Path(__file__).resolve().parent.parent


def sums(path: Path) -> dict[str, str]:
    return {name: digest for digest, name in (line.split() for line in path.read_text().splitlines())}


def test_every_shipped_file_is_listed_and_decompresses_to_the_original():
    listed = sums(SHIPPED_DIR / "SHA256SUMS")
    assert set(listed) == {p.name for p in SHIPPED_DIR.glob("*.xz")}
    original = sums(SHIPPED_DIR / "SHA256SUMS.original")
    assert set(original) == {name.removesuffix(".xz") for name in listed}
    for name, digest in original.items():
        assert hashlib.sha256(lzma.decompress((SHIPPED_DIR / f"{name}.xz").read_bytes())).hexdigest() == digest
    readme = (SHIPPED_DIR / "README.md").read_text()
    assert all(name in readme for name in listed) and "LICENSE.pubmedqa" in readme


def test_shipped_sources_have_the_documented_sizes():
    records = LocalRecords()
    assert len(records.wikitext2_rows("test")) == 4358 and len(records.wikitext2_rows("valid")) == 3760
    assert len(load_texts("c4")) == 1000
    test, train = records.pubmedqa("test"), records.pubmedqa("train")
    assert len(test) == len(train) == 500 and not {r.pmid for r in test} & {r.pmid for r in train}
    assert [sum(r.decision == d for r in test) for d in ("yes", "no", "maybe")] == [276, 169, 55]


@pytest.fixture
def tampered(tmp_path: Path) -> Path:
    """A copy of the shipped folder whose C4 sample has one byte changed."""
    copy = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, copy)
    path = copy / "c4_sample.jsonl.xz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return copy


def test_a_tampered_or_missing_shipped_file_is_refused(tampered):
    with pytest.raises(DataError, match=r"c4_sample\.jsonl\.xz: SHA-256 mismatch.*git checkout -- evaluation/shipped"):
        LocalRecords(tampered).c4_documents()
    assert len(LocalRecords(tampered).wikitext2_rows("valid")) == 3760  # the others still load
    (tampered / "wiki.test.raw.xz").unlink()
    with pytest.raises(DataError, match=r"wiki\.test\.raw\.xz: no such file; restore it"):
        read_shipped("wiki.test.raw", tampered)


def cli_error(argv: list[str], capsys) -> str:
    """The one line `trimserve` prints on stderr for a user error."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trimserve: error: "), err
    return err


def test_a_tampered_shipped_file_is_one_cli_error(tampered, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(local, "SHIPPED_DIR", tampered)
    err = cli_error(["eval", str(tmp_path / "model"), "--ppl", "c4"], capsys)
    assert f"{tampered / 'c4_sample.jsonl.xz'}: SHA-256 mismatch" in err and "reinstall trimserve" in err


def test_extra_sets_need_trimserve_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRIMSERVE_DATA_DIR", raising=False)
    with pytest.raises(
        DataError, match=r"medqa reads medqa_usmle_4opt/test.jsonl from TRIMSERVE_DATA_DIR, which is not"
    ):
        load_mc("medqa")
    err = cli_error(["eval", str(tmp_path / "model"), "--mc", "mmlu"], capsys)
    assert "set TRIMSERVE_DATA_DIR" in err and "hub:mmlu" in err and "pip install 'trimserve[hub]'" in err
    monkeypatch.setenv("TRIMSERVE_DATA_DIR", str(tmp_path / "nowhere"))
    err = cli_error(["eval", str(tmp_path / "model"), "--mc", "medmcqa"], capsys)
    assert f"TRIMSERVE_DATA_DIR={tmp_path / 'nowhere'}: no such directory" in err
    monkeypatch.setenv("TRIMSERVE_DATA_DIR", str(tmp_path))
    err = cli_error(["eval", str(tmp_path / "model"), "--mc", "medmcqa"], capsys)
    assert f"{tmp_path / 'medmcqa' / 'validation.jsonl'}: no such file, and medmcqa needs it" in err
    assert len(load_texts("c4")) == 1000  # shipped sources never read TRIMSERVE_DATA_DIR


def test_no_code_outside_bench_looks_for_a_shared_folder():
    """Nothing reads data from beside the checkout: no `../shared`, `shared/data` or "shared" path part."""
    pattern = re.compile(r"""(\.\./|/)shared\b|\bshared/|["']shared["']""")
    skip = {".venv", ".git", ".pytest_cache", ".ruff_cache", "bench", "out", "shipped", "__pycache__", "build"}
    suffixes = {".py", ".sh", ".toml", ".yml", ".yaml", ".cfg", ".ini", ".json"}
    files = [ROOT / "Makefile", ROOT / "Dockerfile", ROOT / ".ci" / "run"]

    def ours(p: Path) -> bool:  # not a virtual environment (.venv, .venv-vllm) or cache
        parts = p.relative_to(ROOT).parts
        return not skip & set(parts) and not parts[0].startswith(".venv")

    files += [p for p in ROOT.rglob("*") if p.suffix in suffixes and p.is_file() and ours(p)]
    this = Path(__file__).resolve()
    offenders = [str(p.relative_to(ROOT)) for p in files if p != this and pattern.search(p.read_text())]
    assert not offenders
