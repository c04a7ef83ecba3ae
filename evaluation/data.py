"""Text sources for calibration and evaluation, and the token windows cut from them.

A source is one of NAMED_SOURCES, read from the copies shipped with trimserve; the same name with
the `hub:` prefix, the full set from the Hugging Face hub (`evaluation.hub`); or a local file:
`.txt`, or `.jsonl` with one document per line (`path.jsonl:field` picks the field, default `text`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from evaluation.hub import HubRecords
from evaluation.local import LocalRecords, require_file
from evaluation.records import DataError, Records

NAMED_SOURCES = ("wikitext2", "wikitext2-valid", "c4", "pubmedqa-train", "pubmedqa-test")
HUB_PREFIX = "hub:"


def records_for(name: str) -> tuple[str, Records]:
    """The name without `hub:`, and the backend that reads it: the hub with the prefix, else this machine."""
    if name.startswith(HUB_PREFIX):
        return name.removeprefix(HUB_PREFIX), HubRecords()
    return name, LocalRecords()


# ---------------------------------------------------------------- text sources


def load_texts(source: str) -> list[str]:
    """Documents of a named source (`c4`, `hub:c4`, ...) or a local file (`file.jsonl:field` selects the field)."""
    name, records = records_for(source)
    if name in ("wikitext2", "wikitext2-valid"):
        # The evaluation string of Wanda/SparseGPT: the rows joined with blank lines.
        return ["\n\n".join(records.wikitext2_rows("valid" if name.endswith("-valid") else "test"))]
    if name == "c4":
        return records.c4_documents()
    if name in ("pubmedqa-train", "pubmedqa-test"):
        # One document per question: its abstract paragraphs (the domain text of PubMedQA).
        return [" ".join(r.contexts) for r in records.pubmedqa(name.removeprefix("pubmedqa-"))]
    if source.startswith(HUB_PREFIX):
        raise DataError(f"unknown hub source {source!r}; known: {', '.join(HUB_PREFIX + n for n in NAMED_SOURCES)}")
    return file_texts(source)


def file_texts(source: str) -> list[str]:
    """Documents of a local `.txt` file (one document) or `.jsonl[:field]` file (one per line)."""
    path_part, _, field = source.partition(":") if ".jsonl:" in source else (source, "", "")
    path = Path(path_part).expanduser()
    if path.suffix == ".jsonl":
        return jsonl_texts(path, field or "text")
    if path.suffix == ".txt":
        text = require_file(path).read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}: file holds only whitespace")
        return [text]
    if not path.exists():
        raise DataError(f"unknown source {source!r}: not one of {NAMED_SOURCES} (or hub:NAME) and no such file")
    raise DataError(f"{path}: expected a .txt or .jsonl file")


def jsonl_texts(path: Path, field: str = "text") -> list[str]:
    """The `field` of every record of a JSON-lines file."""
    texts = []
    with open(require_file(path), encoding="utf-8") as f:
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
