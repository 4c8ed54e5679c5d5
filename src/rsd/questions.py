"""Questions for `rsd generate --questions`: a text file with one question per line, or JSONL with a `question`
field (for questions that span lines), from a path or `-` for standard input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rsd.core import RSDError

QUESTION_FIELDS = ("question", "problem")


def read_questions(source: str) -> list[str]:
    """The non-blank questions of `source`; JSONL when its first non-blank line is a JSON object."""
    name = "standard input" if source == "-" else source
    text = sys.stdin.read() if source == "-" else read_text(source)
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise RSDError(f"{name} holds no questions; write one per line, or one JSON object per line.")
    if lines[0][1].lstrip().startswith("{"):
        return [question_of(line, number, name) for number, line in lines]
    return [line.strip() for _, line in lines]


def read_text(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise RSDError(f"--questions {path}: no such file; give a text or JSONL file, or - for standard input.")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RSDError(f"--questions {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None


def question_of(line: str, number: int, name: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RSDError(f"{name} line {number}: not valid JSON ({exc.msg}); write one JSON object per line.") from None
    if not isinstance(row, dict):
        raise RSDError(f"{name} line {number}: a JSON {type(row).__name__}, not an object with a 'question' field.")
    field = next((f for f in QUESTION_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
    if field is None:
        raise RSDError(f"{name} line {number}: no text in a 'question' field (fields: {', '.join(sorted(row))}).")
    return row[field]
