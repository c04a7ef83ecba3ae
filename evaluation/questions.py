"""Multiple-choice question sets, in lm-eval-harness's zero-shot prompt formats.

`pubmedqa` (the official 500-question test set, shipped), `medqa`, `medmcqa` and `mmlu[:subject,...]`
(read from TRIMSERVE_DATA_DIR); each also as `hub:NAME`, from the Hugging Face hub.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.data import records_for
from evaluation.records import LETTERS, ChoiceRecord, DataError, PubMedQARecord

MC_SETS = ("pubmedqa", "medqa", "medmcqa", "mmlu")
PUBMEDQA_LABELS = ("yes", "no", "maybe")


@dataclass(frozen=True)
class MCQuestion:
    prompt: str
    choices: tuple[str, ...]  # continuations, each scored after the prompt
    answer: int


def lettered(record: ChoiceRecord, header: str = "") -> MCQuestion:
    """The question, its options as `A. ...` lines, then `Answer:`; the choices are the letters."""
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(record.options)]
    return MCQuestion(
        prompt=f"{header}{record.question.strip()}\n" + "\n".join(lines) + "\nAnswer:",
        choices=tuple(f" {LETTERS[i]}" for i in range(len(record.options))),
        answer=record.answer,
    )


def pubmedqa_question(record: PubMedQARecord) -> MCQuestion:
    """The abstract, the question, and yes/no/maybe as the choices."""
    return MCQuestion(
        prompt=f"Abstract: {' '.join(record.contexts)}\nQuestion: {record.question}\nAnswer:",
        choices=tuple(f" {label}" for label in PUBMEDQA_LABELS),
        answer=PUBMEDQA_LABELS.index(record.decision),
    )


def mmlu_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def load_mc(name: str, limit: int | None = None) -> list[MCQuestion]:
    """A multiple-choice set by name (`mmlu:anatomy,virology` selects subjects, `hub:` reads the hub).

    `limit` keeps the first N questions of the set, or of each subject for MMLU (a stratified sample).
    """
    set_name, records = records_for(name)
    base, _, subjects = set_name.partition(":")
    if base not in MC_SETS:
        raise DataError(f"unknown multiple-choice set {base!r}; known: {list(MC_SETS)}, each also as hub:NAME")
    if base == "mmlu":
        by_subject = records.mmlu(subjects.split(",") if subjects else None)
        return [lettered(r, mmlu_header(s)) for s, rows in by_subject.items() for r in rows[:limit]]
    if base == "pubmedqa":
        questions = [pubmedqa_question(r) for r in records.pubmedqa("test")]
    else:
        questions = [lettered(r) for r in (records.medqa() if base == "medqa" else records.medmcqa())]
    return questions[:limit] if limit else questions
