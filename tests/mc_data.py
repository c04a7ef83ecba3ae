"""A few multiple-choice questions written both as TRIMSERVE_DATA_DIR files and as hub rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# MedQA: the file and the hub set (GBaker/MedQA-USMLE-4-options) share this shape.
MEDQA = [
    {
        "question": "Which vitamin deficiency causes scurvy?",
        "options": {"A": "Vitamin A", "B": "Vitamin D", "C": "Vitamin C", "D": "Vitamin K"},
        "answer_idx": "C",
    },
    {
        "question": "Which organ makes insulin?",
        "options": {"B": "Liver", "A": "Pancreas", "D": "Spleen", "C": "Kidney"},  # keys out of order
        "answer_idx": "A",
    },
]
# MedMCQA and MMLU as the hub has them (openlifescienceai/medmcqa, cais/mmlu).
MEDMCQA_HUB = [
    {"question": "Normal adult heart rate?", "opa": "20", "opb": "70", "opc": "150", "opd": "200", "cop": 1},
    {"question": "Bone of the thigh?", "opa": "Tibia", "opb": "Ulna", "opc": "Radius", "opd": "Femur", "cop": 3},
]
MMLU_HUB = [
    {"question": "Main artery?", "subject": "anatomy", "choices": ["Aorta", "Vena", "Carotid", "Iliac"], "answer": 0},
    {"question": "Smallest bone?", "subject": "anatomy", "choices": ["Femur", "Stapes", "Ulna", "Rib"], "answer": 1},
    {"question": "A virus needs?", "subject": "virology", "choices": ["Host", "Sun", "Salt", "Iron"], "answer": 0},
]


def write_data_dir(root: Path) -> Path:
    """The same questions in the TRIMSERVE_DATA_DIR layout (MedQA jsonl, MedMCQA jsonl, MMLU csv)."""
    (root / "medqa_usmle_4opt").mkdir(parents=True)
    (root / "medqa_usmle_4opt" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MEDQA))
    (root / "medmcqa").mkdir()
    lines = []
    for r in MEDMCQA_HUB:
        choices = [f"{letter}. {r['op' + letter.lower()]}" for letter in "ABCD"]
        lines.append(json.dumps({"question": r["question"], "choices": choices, "answer": r["cop"]}) + "\n")
    (root / "medmcqa" / "validation.jsonl").write_text("".join(lines))
    (root / "mmlu" / "test").mkdir(parents=True)
    for subject in sorted({r["subject"] for r in MMLU_HUB}):
        with open(root / "mmlu" / "test" / f"{subject}_test.csv", "w", newline="", encoding="utf-8") as f:
            for r in (r for r in MMLU_HUB if r["subject"] == subject):
                csv.writer(f).writerow([r["question"], *r["choices"], "ABCD"[r["answer"]]])
    return root
