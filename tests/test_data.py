import json
import random

import pytest

from evaluation.data import calibration_windows, eval_windows, jsonl_texts, load_texts
from evaluation.local import LocalRecords
from evaluation.records import DataError


def test_wikitext2_matches_published_layout():
    rows = LocalRecords().wikitext2_rows("test")
    assert len(rows) == 4358  # rows of the hub's wikitext-2-raw-v1 test split
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert load_texts("wikitext2") == ["\n\n".join(rows)]
    assert len(LocalRecords().wikitext2_rows("valid")) == 3760


def test_jsonl_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        jsonl_texts(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        jsonl_texts(empty)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match="no field 'text'.*body"):
        jsonl_texts(wrong)
    assert jsonl_texts(wrong, "body") == ["hello"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="invalid JSON"):
        jsonl_texts(bad)


def test_load_texts_sources(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("some domain text")
    assert load_texts(str(txt)) == ["some domain text"]
    records = tmp_path / "docs.jsonl"
    records.write_text(json.dumps({"body": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    assert load_texts(f"{records}:body") == ["a", "b"]
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    with pytest.raises(DataError, match="whitespace"):
        load_texts(str(blank))
    with pytest.raises(DataError, match="unknown source"):
        load_texts("no-such-source")
    with pytest.raises(DataError, match="unknown hub source 'hub:c5'; known: hub:wikitext2, "):
        load_texts("hub:c5")
    assert len(load_texts("c4")) == 1000
    assert len(load_texts("pubmedqa-test")) == 500 and len(load_texts("pubmedqa-train")) == 500


def wanda_reference_sampler(texts, tokenizer, nsamples, seqlen, seed):
    """The calibration loop of locuslab/wanda lib/data.py, restated."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            ids = tokenizer(texts[i], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        i = random.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[0, i : i + seqlen])
    return out


def test_calibration_windows_match_wanda_sampler(tokenizer):
    texts = load_texts("c4")[:60]
    windows = calibration_windows(texts, tokenizer, nsamples=6, seqlen=256, seed=0)
    reference = wanda_reference_sampler(texts, tokenizer, 6, 256, 0)
    assert windows.shape == (6, 256)
    for got, want in zip(windows, reference, strict=True):
        assert got.tolist() == want.tolist()
    assert not calibration_windows(texts, tokenizer, 6, 256, seed=1).equal(windows)


def test_calibration_falls_back_to_one_stream_and_rejects_short_text(tokenizer):
    texts = [f"short record number {i}." for i in range(200)]
    windows = calibration_windows(texts, tokenizer, nsamples=3, seqlen=32, seed=0)
    assert windows.shape == (3, 32)
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(["far too short"], tokenizer, nsamples=1, seqlen=64, seed=0)


def test_eval_windows_drop_remainder():
    import torch

    ids = torch.arange(10)
    assert eval_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert eval_windows(ids, 3, max_windows=2).shape == (2, 3)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(ids, 11)
