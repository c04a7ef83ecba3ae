"""Data on this machine: the copies shipped with trimserve, and the larger sets under TRIMSERVE_DATA_DIR.

The shipped files (`evaluation/shipped/`, package data) are xz-compressed. Each is checked against
`SHA256SUMS` whenever it is read, so a damaged or modified copy is refused by name. MedQA,
MedMCQA and MMLU are not shipped: they are read from `$TRIMSERVE_DATA_DIR`, laid out as in the
README. Nothing else on disk is looked at.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import lzma
import os
from pathlib import Path

from evaluation.records import (
    LETTERS,
    ChoiceRecord,
    DataError,
    PubMedQARecord,
    check_subjects,
    medqa_choice,
    split_pubmedqa,
)

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SUMS = "SHA256SUMS"
DATA_DIR_ENV = "TRIMSERVE_DATA_DIR"


def require_file(path: Path, hint: str = "") -> Path:
    """`path` if it is a non-empty file; DataError otherwise (`hint` says how to fix it)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file{hint}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return path


def read_shipped(name: str, root: Path | None = None) -> str:
    """Text of a shipped file (`c4_sample.jsonl`): its `.xz` copy checked against SHA256SUMS, decompressed."""
    root = root or SHIPPED_DIR
    path = root / f"{name}.xz"
    restore = "; restore it (`git checkout -- evaluation/shipped` in a clone, or reinstall trimserve)"
    sums = require_file(root / SUMS, restore).read_text().splitlines()
    expected = {file: digest for digest, file in (line.split(maxsplit=1) for line in sums if line.strip())}
    if path.name not in expected:
        raise DataError(f"{path}: not listed in {root / SUMS}{restore}")
    data = require_file(path, restore).read_bytes()
    if hashlib.sha256(data).hexdigest() != expected[path.name]:
        raise DataError(f"{path}: SHA-256 mismatch, so the shipped copy is damaged or modified{restore}")
    return lzma.decompress(data).decode("utf-8")


def official_pubmedqa_test_ids(root: Path | None = None) -> set[str]:
    """The 500 PMIDs of PubMedQA's official test split (the shipped `test_ground_truth.json`)."""
    return set(json.loads(read_shipped("test_ground_truth.json", root)))


def extra_path(relative: str, needed_by: str) -> Path:
    """`$TRIMSERVE_DATA_DIR/relative`, which the set `needed_by` reads; DataError naming the fix if absent."""
    fix = f"or ask for `hub:{needed_by}` (needs `pip install 'trimserve[hub]'` and network)"
    env = os.environ.get(DATA_DIR_ENV)
    if not env:
        raise DataError(
            f"{needed_by} reads {relative} from {DATA_DIR_ENV}, which is not set: "
            f"set {DATA_DIR_ENV} to a folder holding {relative} (layout in the README), {fix}"
        )
    root = Path(env).expanduser()
    if not root.is_dir():
        raise DataError(f"{DATA_DIR_ENV}={env}: no such directory; point it at the data folder, {fix}")
    path = root / relative
    if not path.exists():
        raise DataError(f"{path}: no such file, and {needed_by} needs it; add it under {DATA_DIR_ENV}, {fix}")
    return path


class LocalRecords:
    """Records from the shipped copies (`shipped`: their folder, default SHIPPED_DIR) and TRIMSERVE_DATA_DIR."""

    def __init__(self, shipped: Path | None = None) -> None:
        self.shipped = shipped

    def wikitext2_rows(self, split: str) -> list[str]:
        # One paragraph per line, blank lines a single space: rows are the non-blank lines plus
        # their newline, and "" for each blank one (as the hub's rows).
        lines = read_shipped(f"wiki.{split}.raw", self.shipped).split("\n")[:-1]
        return [line + "\n" if line.strip() else "" for line in lines]

    def c4_documents(self) -> list[str]:
        return [json.loads(line)["text"] for line in read_shipped("c4_sample.jsonl", self.shipped).splitlines()]

    def pubmedqa(self, split: str) -> list[PubMedQARecord]:
        labelled = json.loads(read_shipped("ori_pqal.json", self.shipped))
        records = (
            PubMedQARecord(pmid, r["QUESTION"], tuple(r["CONTEXTS"]), r["final_decision"])
            for pmid, r in labelled.items()
        )
        return split_pubmedqa(records, official_pubmedqa_test_ids(self.shipped), split)

    def medqa(self) -> list[ChoiceRecord]:
        out = []
        for line in extra_path("medqa_usmle_4opt/test.jsonl", "medqa").read_text().splitlines():
            r = json.loads(line)
            options = r["options"] if isinstance(r["options"], dict) else ast.literal_eval(r["options"])
            out.append(medqa_choice({**r, "options": options}))
        return out

    def medmcqa(self) -> list[ChoiceRecord]:
        out = []
        for line in extra_path("medmcqa/validation.jsonl", "medmcqa").read_text().splitlines():
            r = json.loads(line)
            # Choices come as "A. text"; the prompt letters them again.
            options = tuple(c.removeprefix(f"{LETTERS[i]}. ") for i, c in enumerate(r["choices"]))
            out.append(ChoiceRecord(r["question"], options, int(r["answer"])))
        return out

    def mmlu(self, subjects: list[str] | None) -> dict[str, list[ChoiceRecord]]:
        folder = extra_path("mmlu/test", "mmlu")
        files = {f.name.removesuffix("_test.csv"): f for f in folder.glob("*_test.csv")}
        if not files:
            raise DataError(f"{folder}: no *_test.csv files")
        out = {}
        for subject in check_subjects(subjects, files):
            with open(files[subject], newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            out[subject] = [ChoiceRecord(q, tuple(opts), LETTERS.index(a.strip())) for q, *opts, a in rows]
        return out
