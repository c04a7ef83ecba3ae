"""`hub:` sources through a fake `datasets` module: the hub's rows map to what the shipped files give.

The real hub is out of reach here, so these tests check the mapping and the errors, not the hub.
"""

import sys
import types

import pytest

from evaluation.data import load_texts
from evaluation.local import LocalRecords
from evaluation.questions import load_mc
from evaluation.records import DataError
from tests.mc_data import MEDMCQA_HUB, MEDQA, MMLU_HUB, write_data_dir
from trimserve.cli import main


def pubmedqa_hub_rows() -> list[dict]:
    """All 1,000 PQA-L questions in the hub's pqa_labeled shape, rebuilt from the shipped copy."""
    local = LocalRecords()
    return [
        {
            "pubid": int(r.pmid),
            "question": r.question,
            "context": {"contexts": list(r.contexts)},
            "final_decision": r.decision,
        }
        for r in local.pubmedqa("train") + local.pubmedqa("test")
    ]


@pytest.fixture
def fake_hub(monkeypatch):
    """Install a fake `datasets` whose load_dataset serves the known sets and records its calls."""
    local = LocalRecords()
    sets = {
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"): [{"text": t} for t in local.wikitext2_rows("test")],
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"): [
            {"text": t} for t in local.wikitext2_rows("valid")
        ],
        ("allenai/c4", None, "train"): [{"text": "first document"}, {"text": "second document"}],
        ("qiaojin/PubMedQA", "pqa_labeled", "train"): pubmedqa_hub_rows(),
        ("GBaker/MedQA-USMLE-4-options", None, "test"): MEDQA,
        ("openlifescienceai/medmcqa", None, "validation"): MEDMCQA_HUB,
        ("cais/mmlu", "all", "test"): MMLU_HUB,
    }
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return sets[(path, name, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_texts_match_the_shipped_sources(fake_hub):
    assert load_texts("hub:wikitext2") == load_texts("wikitext2")
    assert load_texts("hub:wikitext2-valid") == load_texts("wikitext2-valid")
    assert load_texts("hub:pubmedqa-test") == load_texts("pubmedqa-test")
    assert load_texts("hub:pubmedqa-train") == load_texts("pubmedqa-train")
    assert load_texts("hub:c4") == ["first document", "second document"]
    assert ("allenai/c4", None, "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}) in fake_hub


def test_hub_question_sets_match_the_local_ones(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMSERVE_DATA_DIR", str(write_data_dir(tmp_path / "data")))
    assert load_mc("hub:pubmedqa") == load_mc("pubmedqa")
    for name in ("medqa", "medmcqa", "mmlu", "mmlu:virology"):
        assert load_mc(f"hub:{name}") == load_mc(name), name
    assert load_mc("hub:mmlu", limit=1) == load_mc("mmlu", limit=1)
    with pytest.raises(DataError, match="unknown MMLU subject"):
        load_mc("hub:mmlu:astrology")


def test_hub_without_the_extra_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'trimserve\[hub\]'"):
        load_texts("hub:c4")
    assert main(["eval", str(tmp_path / "model"), "--mc", "hub:medqa"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "trimserve: error: `hub:` sources need the optional `datasets` package: pip install 'trimserve[hub]'\n"
    )


def test_hub_without_network_suggests_the_local_copy(tmp_path, monkeypatch, capsys):
    def offline(path, name=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    assert main(["eval", str(tmp_path / "model"), "--ppl", "hub:c4"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "trimserve: error: could not load allenai/c4 from the Hugging Face hub (Couldn't reach 'allenai/c4' on "
        "the Hub (LocalEntryNotFoundError)); without network, drop the `hub:` prefix to use the copy shipped with "
        "trimserve\n"
    )
    with pytest.raises(DataError, match=r"cais/mmlu .*drop the `hub:` prefix to use a copy under TRIMSERVE_DATA_DIR"):
        load_mc("hub:mmlu:anatomy")
