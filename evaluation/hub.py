"""The full sets from the Hugging Face hub, through the optional `datasets` package.

Only asked for explicitly, with the `hub:` prefix (`--calib hub:c4`, `--ppl hub:wikitext2`,
`--mc hub:mmlu:anatomy`); install the extra with `pip install 'trimserve[hub]'`. Each loader maps
the hub's rows to the records the shipped files give (`evaluation.records`), so texts and prompts
are built the same way; PubMedQA is split by the official test ids of the shipped copy. The mapping
is tested against a fake `datasets` module (tests/test_hub.py); it has not been run against the
real hub.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evaluation.local import official_pubmedqa_test_ids
from evaluation.records import (
    ChoiceRecord,
    DataError,
    PubMedQARecord,
    check_subjects,
    medqa_choice,
    split_pubmedqa,
)

INSTALL = "pip install 'trimserve[hub]'"
# What each source falls back on without network (its name without `hub:`).
SHIPPED = "the copy shipped with trimserve"
DATA_DIR = "a copy under TRIMSERVE_DATA_DIR"


class HubRecords:
    """Records from the hub (`shipped`: folder of the shipped copies, for PubMedQA's official test ids)."""

    def __init__(self, shipped: Path | None = None) -> None:
        self.shipped = shipped

    def wikitext2_rows(self, split: str) -> list[str]:
        hub_split = {"valid": "validation"}.get(split, split)
        return [r["text"] for r in load("Salesforce/wikitext", SHIPPED, "wikitext-2-raw-v1", split=hub_split)]

    def c4_documents(self) -> list[str]:
        # The whole shard Wanda and SparseGPT draw calibration windows from (the shipped sample is its start).
        shard = {"train": "en/c4-train.00000-of-01024.json.gz"}
        return [r["text"] for r in load("allenai/c4", SHIPPED, data_files=shard, split="train")]

    def pubmedqa(self, split: str) -> list[PubMedQARecord]:
        rows = load("qiaojin/PubMedQA", SHIPPED, "pqa_labeled", split="train")
        records = (
            PubMedQARecord(str(r["pubid"]), r["question"], tuple(r["context"]["contexts"]), r["final_decision"])
            for r in rows
        )
        return split_pubmedqa(records, official_pubmedqa_test_ids(self.shipped), split)

    def medqa(self) -> list[ChoiceRecord]:
        return [medqa_choice(r) for r in load("GBaker/MedQA-USMLE-4-options", DATA_DIR, split="test")]

    def medmcqa(self) -> list[ChoiceRecord]:
        rows = load("openlifescienceai/medmcqa", DATA_DIR, split="validation")
        return [ChoiceRecord(r["question"], (r["opa"], r["opb"], r["opc"], r["opd"]), int(r["cop"])) for r in rows]

    def mmlu(self, subjects: list[str] | None) -> dict[str, list[ChoiceRecord]]:
        by_subject: dict[str, list[ChoiceRecord]] = {}
        for r in load("cais/mmlu", DATA_DIR, "all", split="test"):
            record = ChoiceRecord(r["question"], tuple(r["choices"]), int(r["answer"]))
            by_subject.setdefault(r["subject"], []).append(record)
        return {subject: by_subject[subject] for subject in check_subjects(subjects, by_subject)}


def load(path: str, fallback: str, name: str | None = None, **kwargs: Any) -> Iterable[dict]:
    """`datasets.load_dataset(path, name, **kwargs)`; failures become one-line DataErrors naming the fix."""
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise DataError(f"`hub:` sources need the optional `datasets` package: {INSTALL}") from None
    try:
        return datasets.load_dataset(path, name, **kwargs)
    except (OSError, ValueError) as err:  # no network (ConnectionError), no such set or config, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"could not load {path} from the Hugging Face hub ({reason}); "
            f"without network, drop the `hub:` prefix to use {fallback}"
        ) from err
