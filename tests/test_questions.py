"""Multiple-choice sets: the shipped PubMedQA, and MedQA, MedMCQA, MMLU from TRIMSERVE_DATA_DIR."""

import pytest

from evaluation.questions import MCQuestion, load_mc
from evaluation.records import DataError
from tests.mc_data import write_data_dir


def test_pubmedqa_is_the_official_test_set():
    pubmedqa = load_mc("pubmedqa")
    assert len(pubmedqa) == 500
    assert [sum(q.answer == k for q in pubmedqa) for k in range(3)] == [276, 169, 55]
    assert pubmedqa[0].prompt.startswith("Abstract: ") and pubmedqa[0].prompt.endswith("\nAnswer:")
    assert pubmedqa[0].choices == (" yes", " no", " maybe")
    assert len(load_mc("pubmedqa", limit=7)) == 7


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMSERVE_DATA_DIR", str(write_data_dir(tmp_path / "data")))


def test_lettered_sets_from_the_data_dir(data_dir):
    letters = (" A", " B", " C", " D")
    medqa = load_mc("medqa")
    assert medqa[0] == MCQuestion(
        "Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin D\nC. Vitamin C\nD. Vitamin K\nAnswer:",
        letters,
        2,
    )
    assert medqa[1].prompt.splitlines()[1:3] == ["A. Pancreas", "B. Liver"] and medqa[1].answer == 0
    medmcqa = load_mc("medmcqa")
    assert medmcqa[0].prompt == "Normal adult heart rate?\nA. 20\nB. 70\nC. 150\nD. 200\nAnswer:"
    assert [q.answer for q in medmcqa] == [1, 3]
    mmlu = load_mc("mmlu")
    assert [q.answer for q in mmlu] == [0, 1, 0] and mmlu[0].choices == letters
    assert mmlu[0].prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert "about virology" in load_mc("mmlu:virology")[0].prompt
    assert len(load_mc("mmlu", limit=1)) == 2  # the limit applies per subject
    assert len(load_mc("medmcqa", limit=1)) == 1


def test_unknown_sets_and_subjects(data_dir):
    with pytest.raises(DataError, match="unknown multiple-choice set 'trivia'"):
        load_mc("trivia")
    with pytest.raises(DataError, match=r"unknown MMLU subject\(s\) \['astrology'\]; known: anatomy, virology"):
        load_mc("mmlu:anatomy,astrology")
