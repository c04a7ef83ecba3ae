"""What a data backend hands over: the records of every named source and question set.

Two backends give them: `evaluation.local` (the copies shipped with trimserve, and the sets under
`TRIMSERVE_DATA_DIR`) and `evaluation.hub` (the Hugging Face hub, asked for with `hub:`). Texts and
prompts are built from these records by `evaluation.data` and `evaluation.questions`, the same way
whichever backend answered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

LETTERS = "ABCD"  # option letters of the lettered sets


class DataError(ValueError):
    """A data source is missing, damaged, malformed, or too short for what was asked."""


@dataclass(frozen=True)
class PubMedQARecord:
    """One expert-labelled PubMedQA question (PQA-L)."""

    pmid: str
    question: str
    contexts: tuple[str, ...]  # the abstract's paragraphs, conclusion excluded
    decision: str  # yes | no | maybe


@dataclass(frozen=True)
class ChoiceRecord:
    """One lettered multiple-choice question: options in letter order, `answer` indexes them."""

    question: str
    options: tuple[str, ...]
    answer: int


class Records(Protocol):
    """The records every backend provides."""

    def wikitext2_rows(self, split: str) -> list[str]:
        """WikiText-2 raw rows as the hub's `wikitext-2-raw-v1` has them; split 'test' or 'valid'."""
        ...

    def c4_documents(self) -> list[str]:
        """C4 `en` train documents, in shard order."""
        ...

    def pubmedqa(self, split: str) -> list[PubMedQARecord]:
        """PQA-L by PMID: 'test' the official 500 test ids, 'train' the other 500."""
        ...

    def medqa(self) -> list[ChoiceRecord]:
        """MedQA USMLE 4-option test set."""
        ...

    def medmcqa(self) -> list[ChoiceRecord]:
        """MedMCQA dev set."""
        ...

    def mmlu(self, subjects: list[str] | None) -> dict[str, list[ChoiceRecord]]:
        """MMLU test questions by subject (`college_biology`, ...), subjects sorted; None: all 57."""
        ...


def split_pubmedqa(records: Iterable[PubMedQARecord], test_ids: set[str], split: str) -> list[PubMedQARecord]:
    """The official test split ('test') or the rest ('train'), sorted by PMID."""
    if split not in ("test", "train"):
        raise DataError(f"pubmedqa split must be 'test' or 'train', not {split!r}")
    chosen = [r for r in records if (r.pmid in test_ids) == (split == "test")]
    return sorted(chosen, key=lambda r: r.pmid)


def medqa_choice(record: dict) -> ChoiceRecord:
    """A MedQA row (`question`, `options` {A..D}, `answer_idx`), the shape of both the file and the hub set."""
    options = record["options"]
    keys = sorted(options)
    return ChoiceRecord(record["question"], tuple(options[k] for k in keys), keys.index(record["answer_idx"]))


def check_subjects(requested: list[str] | None, available: Iterable[str]) -> list[str]:
    """The MMLU subjects to read, sorted: all available ones, or the requested ones if all exist."""
    available = sorted(available)
    if not requested:
        return available
    if unknown := sorted(set(requested) - set(available)):
        raise DataError(f"unknown MMLU subject(s) {unknown}; known: {', '.join(available)}")
    return sorted(set(requested))
