"""Text sources for calibration and evaluation, and multiple-choice sets.

Named sources read the offline copies under the data directory (`TRIMSERVE_DATA_DIR`, else
`../shared/data` when present); any other source is a local `.txt` or `.jsonl` file
(`path.jsonl:field` picks the JSON field, default `text`). WikiText-2 falls back to the hub's
`wikitext-2-raw-v1` through the optional `datasets` package when no local copy exists.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


class DataError(ValueError):
    """A data source is missing, empty, malformed, or too short for what was asked."""


def data_dir() -> Path:
    """`TRIMSERVE_DATA_DIR`, else `../shared/data` (from the working directory) when present."""
    env = os.environ.get("TRIMSERVE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "data"


def _require_file(path: Path, named: bool = True) -> Path:
    if not path.is_file():
        hint = " (set TRIMSERVE_DATA_DIR to the data directory)" if named else ""
        raise DataError(f"{path}: no such file{hint}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return path


# ---------------------------------------------------------------- text sources


def wikitext2_rows(split: str = "test", root: Path | None = None) -> list[str]:
    """Rows exactly as in the hub's wikitext-2-raw-v1 (blank lines become empty rows)."""
    path = (root or data_dir()) / "wikitext-2-raw" / f"wiki.{split}.raw"
    if path.is_file():
        lines = _require_file(path).read_text(encoding="utf-8").split("\n")[:-1]
        return [line + "\n" if line.strip() else "" for line in lines]
    try:
        import datasets  # optional: only for machines that reach the hub
    except ImportError:
        raise DataError(f"{path}: not found, and the `datasets` package is not installed to fetch it") from None
    hub_split = {"valid": "validation"}.get(split, split)
    return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"])


def wikitext2_text(split: str = "test", root: Path | None = None) -> str:
    """The evaluation string of Wanda/SparseGPT: rows joined with blank lines."""
    return "\n\n".join(wikitext2_rows(split, root))


def jsonl_texts(path: Path, field: str = "text", named: bool = False) -> list[str]:
    texts = []
    with open(_require_file(path, named), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
            if field not in record:
                raise DataError(f"{path}:{lineno}: no field {field!r} (fields: {sorted(record)})")
            texts.append(str(record[field]))
    if not texts:
        raise DataError(f"{path}: no records")
    return texts


def pubmedqa_records(split: str, root: Path | None = None) -> list[dict]:
    """PQA-L records; split 'test' is the official 500 ids, 'train' the other 500."""
    base = (root or data_dir()) / "pubmedqa"
    records = json.loads(_require_file(base / "ori_pqal.json").read_text())
    test_ids = set(json.loads(_require_file(base / "test_ground_truth.json").read_text()))
    if split not in ("test", "train"):
        raise DataError(f"pubmedqa split must be 'test' or 'train', not {split!r}")
    keep = (lambda pmid: pmid in test_ids) if split == "test" else (lambda pmid: pmid not in test_ids)
    return [dict(r, PMID=pmid) for pmid, r in sorted(records.items()) if keep(pmid)]


def pubmedqa_contexts(split: str, root: Path | None = None) -> list[str]:
    """One document per question: its abstract paragraphs (the domain text of PubMedQA)."""
    return [" ".join(r["CONTEXTS"]) for r in pubmedqa_records(split, root)]


NAMED_SOURCES = ("wikitext2", "wikitext2-valid", "c4", "pubmedqa-train", "pubmedqa-test")


def load_texts(source: str, root: Path | None = None) -> list[str]:
    """Documents of a named source or a local file (`file.jsonl:field` selects the field)."""
    root = root or data_dir()
    if source == "wikitext2":
        return [wikitext2_text("test", root)]
    if source == "wikitext2-valid":
        return [wikitext2_text("valid", root)]
    if source == "c4":
        return jsonl_texts(root / "c4" / "c4_sample.jsonl", named=True)
    if source.startswith("pubmedqa-"):
        return pubmedqa_contexts(source.removeprefix("pubmedqa-"), root)
    path_part, _, field = source.partition(":") if ".jsonl:" in source else (source, "", "")
    path = Path(path_part).expanduser()
    if path.suffix == ".jsonl":
        return jsonl_texts(path, field or "text")
    if path.suffix == ".txt":
        text = _require_file(path, named=False).read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}: file holds only whitespace")
        return [text]
    if not path.exists():
        raise DataError(f"unknown source {source!r}: not one of {NAMED_SOURCES} and no such file")
    raise DataError(f"{path}: expected a .txt or .jsonl file")


# ---------------------------------------------------------------- token windows


def tokenize_joined(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All documents as one token stream (joined with blank lines), shape (n_tokens,)."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise DataError("source tokenises to zero tokens")
    return ids


def calibration_windows(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """Random `seqlen`-token windows from random documents longer than `seqlen` (Wanda/SparseGPT).

    Returns (nsamples, seqlen) token ids. When no single document is long enough (a single
    text file, short records), windows are drawn from all documents joined into one stream.
    """
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples and seqlen must be positive (got {nsamples}, {seqlen})")
    rng = random.Random(seed)
    docs: list[torch.Tensor | None] = [None] * len(texts)  # tokenised lazily, as drawn
    lengths = [len(t) for t in texts]
    # A document needs more than seqlen tokens; a token is at most ~ a few dozen characters,
    # but surely no fewer than one: documents with <= seqlen characters can never qualify.
    candidates = [i for i, n in enumerate(lengths) if n > seqlen]
    windows = []
    if candidates and _any_long_enough(texts, candidates, tokenizer, seqlen, docs):
        for _ in range(nsamples):
            while True:
                i = rng.randint(0, len(texts) - 1)
                if docs[i] is None:
                    docs[i] = tokenizer(texts[i], return_tensors="pt").input_ids[0]
                if docs[i].numel() > seqlen:
                    break
            start = rng.randint(0, docs[i].numel() - seqlen - 1)
            windows.append(docs[i][start : start + seqlen])
        return torch.stack(windows)
    stream = tokenize_joined(texts, tokenizer)
    if stream.numel() <= seqlen:
        raise DataError(f"text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    for _ in range(nsamples):
        start = rng.randint(0, stream.numel() - seqlen - 1)
        windows.append(stream[start : start + seqlen])
    return torch.stack(windows)


def _any_long_enough(texts, candidates, tokenizer, seqlen, docs) -> bool:
    for i in candidates:
        if docs[i] is None:
            docs[i] = tokenizer(texts[i], return_tensors="pt").input_ids[0]
        if docs[i].numel() > seqlen:
            return True
    return False


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping `seqlen` windows of a token stream, remainder dropped: (n, seqlen)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


# ---------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class MCQuestion:
    prompt: str
    choices: tuple[str, ...]  # continuations, each scored after the prompt
    answer: int


LETTERS = "ABCD"


def _lettered(question: str, options: list[str], header: str = "") -> str:
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return f"{header}{question.strip()}\n" + "\n".join(lines) + "\nAnswer:"


def _letter_choices(n: int) -> tuple[str, ...]:
    return tuple(f" {LETTERS[i]}" for i in range(n))


def pubmedqa_questions(root: Path) -> list[MCQuestion]:
    """The official 500-question test set, lm-eval-harness prompt."""
    labels = ("yes", "no", "maybe")
    return [
        MCQuestion(
            prompt=f"Abstract: {' '.join(r['CONTEXTS'])}\nQuestion: {r['QUESTION']}\nAnswer:",
            choices=tuple(f" {label}" for label in labels),
            answer=labels.index(r["final_decision"]),
        )
        for r in pubmedqa_records("test", root)
    ]


def medqa_questions(root: Path) -> list[MCQuestion]:
    out = []
    for line in _require_file(root / "medqa_usmle_4opt" / "test.jsonl").read_text().splitlines():
        r = json.loads(line)
        options = r["options"] if isinstance(r["options"], dict) else ast.literal_eval(r["options"])
        keys = sorted(options)
        out.append(
            MCQuestion(
                prompt=_lettered(r["question"], [options[k] for k in keys]),
                choices=_letter_choices(len(keys)),
                answer=keys.index(r["answer_idx"]),
            )
        )
    return out


def medmcqa_questions(root: Path) -> list[MCQuestion]:
    out = []
    for line in _require_file(root / "medmcqa" / "validation.jsonl").read_text().splitlines():
        r = json.loads(line)
        options = [c.split(". ", 1)[1] if c[:3] == f"{LETTERS[i]}. " else c for i, c in enumerate(r["choices"])]
        out.append(
            MCQuestion(prompt=_lettered(r["question"], options), choices=_letter_choices(4), answer=int(r["answer"]))
        )
    return out


def mmlu_questions(root: Path, subjects: list[str] | None = None, per_subject: int | None = None) -> list[MCQuestion]:
    """Zero-shot MMLU test questions in the harness's lettered format (optionally N per subject)."""
    folder = root / "mmlu" / "test"
    files = sorted(folder.glob("*_test.csv"))
    if not files:
        raise DataError(f"{folder}: no *_test.csv files")
    if subjects:
        files = [f for f in files if f.name.removesuffix("_test.csv") in subjects]
        if not files:
            raise DataError(f"no MMLU subject among {subjects}")
    out = []
    for f in files:
        subject = f.name.removesuffix("_test.csv").replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        with open(f, newline="", encoding="utf-8") as fh:
            for row in list(csv.reader(fh))[:per_subject]:
                question, *options, answer = row
                out.append(
                    MCQuestion(
                        prompt=_lettered(question, options, header),
                        choices=_letter_choices(len(options)),
                        answer=LETTERS.index(answer.strip()),
                    )
                )
    return out


MC_SETS = {
    "pubmedqa": pubmedqa_questions,
    "medqa": medqa_questions,
    "medmcqa": medmcqa_questions,
    "mmlu": mmlu_questions,
}


def load_mc(name: str, root: Path | None = None, limit: int | None = None) -> list[MCQuestion]:
    """A multiple-choice set by name (`mmlu:anatomy,virology` selects subjects).

    `limit` keeps the first N questions of the set, or of each subject for MMLU (a stratified sample).
    """
    base, _, subjects = name.partition(":")
    if base not in MC_SETS:
        raise DataError(f"unknown multiple-choice set {base!r}; known: {sorted(MC_SETS)}")
    root = root or data_dir()
    if base == "mmlu":
        return mmlu_questions(root, subjects.split(",") if subjects else None, limit)
    questions = MC_SETS[base](root)
    return questions[:limit] if limit else questions
