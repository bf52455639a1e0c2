"""Local evaluation tasks in JSONL: multiple choice (ARC-style) and generation (GSM8K-style).

* MC line: ``{"id", "question", "choices": [str, ...], "answer": int}``; prompt
  ``"Question: {question}\\nAnswer:"``, continuation ``" {choice}"``. ``acc`` picks the
  highest log-likelihood, ``acc_norm`` the highest log-likelihood per character (as lm-eval).
* Generation line: ``{"id", "question", "answer": "... #### 42"}``; greedy decoding until a
  blank line or ``"Question:"`` (at most ``max_gen_toks`` tokens); the prediction is the last
  number in the output, compared exactly with the number after ``####``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from coordinator.central.evaluation.lm import EvalError, PerspectiveLM

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a JSONL task file, each checked for the ``required`` keys.

    Raises:
        EvalError: unreadable file, bad JSON or a missing key (with the line number).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"cannot read task file {path}: {exc.strerror}") from exc
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise EvalError(f"{path}:{n}: not valid JSON ({exc})") from exc
        missing = [k for k in required if k not in row]
        if missing:
            raise EvalError(f"{path}:{n}: missing keys {missing}; required {list(required)}")
        rows.append(row)
    if not rows:
        raise EvalError(f"task file {path} has no items")
    return rows


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def run_multiple_choice(lm: PerspectiveLM, path: str | Path) -> dict[str, Any]:
    """Accuracy (and length-normalised accuracy) of an MC task file."""
    rows = read_jsonl(path, ("question", "choices", "answer"))
    correct = correct_norm = 0
    for row in rows:
        choices = row["choices"]
        if not (isinstance(choices, list) and 0 <= int(row["answer"]) < len(choices)):
            raise EvalError(f"{path}: item {row.get('id')} has an answer outside its choices")
        reqs = [(_prompt(row["question"]), " " + str(c)) for c in choices]
        lls = [ll for ll, _ in lm.loglikelihood(reqs)]
        norm = [ll / max(len(str(c)), 1) for ll, c in zip(lls, choices, strict=True)]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == int(row["answer"]))
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == int(row["answer"]))
    n = len(rows)
    return {
        "task": Path(path).stem,
        "kind": "multiple_choice",
        "n": n,
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "chance": _chance(rows),
    }


def _chance(rows: list[dict[str, Any]]) -> float:
    return sum(1 / len(r["choices"]) for r in rows) / len(rows)


def extract_number(text: str) -> str | None:
    """Last number in ``text`` with thousands separators removed, or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def run_generation(lm: PerspectiveLM, path: str | Path, max_gen_toks: int = 32) -> dict[str, Any]:
    """Exact-match accuracy of a GSM8K-style task file."""
    rows = read_jsonl(path, ("question", "answer"))
    reqs = [
        (_prompt(r["question"]), {"until": ["\n\n", "Question:"], "max_gen_toks": max_gen_toks})
        for r in rows
    ]
    outputs = lm.generate_until(reqs)
    hits = 0
    samples = []
    for row, text in zip(rows, outputs, strict=True):
        gold = str(row["answer"]).split("####")[-1].strip().replace(",", "")
        pred = extract_number(text)
        hits += int(pred == gold)
        if len(samples) < 3:
            samples.append({"id": row.get("id"), "output": text, "pred": pred, "gold": gold})
    return {
        "task": Path(path).stem,
        "kind": "generation",
        "n": len(rows),
        "exact_match": hits / len(rows),
        "samples": samples,
    }
