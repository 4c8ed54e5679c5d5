"""`rsd grade`: grade the responses of a JSONL file against its gold answers.

    rsd grade FILE.jsonl --gold-field answer --response-field code [--score-field pred_score]
              [--reference-field score] [--output OUT.jsonl] [--json] [--workers N] [--timeout S]
              [--multiple-choice]

A response field holds one response or a list of them; fields may be dotted paths ("gt.answer"). Prints the
accuracy over all responses, the majority-vote accuracy over each row's list and, with --score-field (one
score per response: a number or a list whose last element is the number), the best-of-N accuracy. --output
writes every row again with `verdicts` (one per response), `extracted` (the answers read from them),
`majority_correct` and, with scores, `best_of_n_correct`. --reference-field names another grader's verdicts
(one boolean per response) and prints how often ours agree, and where not.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rsd.core import RSDError
from rsd.eval.checks import check_output_file
from rsd.eval.datasets import BadRow, as_text, get_field, iter_jsonl
from rsd.eval.files import atomic_output
from rsd.eval.grading import (
    DEFAULT_TIMEOUT,
    DEFAULT_WORKERS,
    GradingPool,
    best_of_n,
    extract,
    grade_answers,
    majority_votes,
)

MAX_SHOWN = 20  # disagreements listed in the text summary


def add_grade_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="JSONL file, one row per problem")
    parser.add_argument("--gold-field", required=True, help="field of the gold answer (dotted path for nesting)")
    parser.add_argument("--response-field", required=True, help="field of the response, or of a list of them")
    parser.add_argument("--score-field", help="field of one score per response, for best-of-N")
    parser.add_argument(
        "--reference-field", help="field of another grader's verdict per response; prints the agreement with it"
    )
    parser.add_argument("--output", type=Path, help="write the rows with their verdicts to this JSONL file")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="grading worker processes")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per comparison")
    parser.add_argument("--multiple-choice", action="store_true", help="grade letters (A-E) instead of math answers")


@dataclass
class _Row:
    line: int
    data: dict
    gold: str
    responses: list[str]
    scores: list[object] | None
    reference: list[bool] | None


def _field(row: dict, path: str, line: int, source: Path, flag: str) -> object:
    try:
        return get_field(row, path)
    except BadRow as exc:
        raise RSDError(f"{source} line {line}: {exc}; pass the right {flag} or fix the row.") from exc


def _read_rows(args: argparse.Namespace) -> list[_Row]:
    source: Path = args.file
    if not source.is_file():
        raise RSDError(f"{source} not found; pass the path of a JSONL file of responses.")
    rows = []
    for line, data, reason in iter_jsonl(source):
        if data is None:
            raise RSDError(f"{source} line {line}: {reason}; fix or delete that line.")
        try:
            gold = as_text(_field(data, args.gold_field, line, source, "--gold-field"))
        except BadRow as exc:
            raise RSDError(f"{source} line {line}: gold answer {args.gold_field!r}: {exc}.") from exc
        value = _field(data, args.response_field, line, source, "--response-field")
        responses = _responses(value, line, source)
        scores = None
        if args.score_field:
            score_value = _field(data, args.score_field, line, source, "--score-field")
            scores = _scores(score_value, responses, isinstance(value, str), line, source)
        reference = None
        if args.reference_field:
            reference_value = _field(data, args.reference_field, line, source, "--reference-field")
            reference = _reference(reference_value, responses, isinstance(value, str), line, source)
        rows.append(_Row(line, data, gold, responses, scores, reference))
    if not rows:
        raise RSDError(f"{source} has no rows; give a JSONL file with one JSON object per line.")
    return rows


def _responses(value: object, line: int, source: Path) -> list[str]:
    responses = [value] if isinstance(value, str) else value
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise RSDError(
            f"{source} line {line}: the response field holds {type(value).__name__}, not text or a list of texts; "
            f"pass the right --response-field."
        )
    return responses


def _scores(value: object, responses: list[str], single: bool, line: int, source: Path) -> list[object]:
    if single:  # one response: the whole value is its score (a number, or a list ending in the number)
        return [value]
    if not isinstance(value, list) or len(value) != len(responses):
        count = len(value) if isinstance(value, list) else 1
        raise RSDError(
            f"{source} line {line}: {count} score(s) for {len(responses)} responses; --score-field must hold "
            f"one score per response."
        )
    return value


def _reference(value: object, responses: list[str], single: bool, line: int, source: Path) -> list[bool]:
    verdicts = [value] if single else value
    if not isinstance(verdicts, list) or len(verdicts) != len(responses):
        raise RSDError(
            f"{source} line {line}: --reference-field must hold one verdict per response ({len(responses)})."
        )
    if not all(isinstance(v, bool) or v in (0, 1) for v in verdicts):
        raise RSDError(f"{source} line {line}: --reference-field verdicts must be true/false or 1/0.")
    return [bool(v) for v in verdicts]


@dataclass
class GradeSummary:
    accuracy: float | None  # mean over all responses
    majority_accuracy: float | None  # mean over rows of the majority answer's verdict
    best_of_n_accuracy: float | None  # mean over rows of the best-scored response's verdict
    n: int  # rows
    n_responses: int
    timed_out: int  # comparisons that ran out of time (counted wrong)
    agreement: float | None = None  # share of responses where our verdict equals --reference-field's
    disagreements: list[tuple[int, int]] = field(default_factory=list)  # (line, response index)

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "majority_accuracy": self.majority_accuracy,
            "best_of_n_accuracy": self.best_of_n_accuracy,
            "n": self.n,
            "n_responses": self.n_responses,
            "timed_out": self.timed_out,
            "agreement": self.agreement,
            "disagreements": [list(d) for d in self.disagreements],
        }


def grade_rows(rows: list[_Row], args: argparse.Namespace) -> GradeSummary:
    """Grade every response, vote, pick best-of-N; adds the results to each row's data."""
    golds = [row.gold for row in rows for _ in row.responses]
    responses = [r for row in rows for r in row.responses]
    with GradingPool(workers=args.workers, timeout=args.timeout) as pool:
        flat = grade_answers(golds, responses, multiple_choice=args.multiple_choice, pool=pool)
        timed_out = len(pool.timed_out)
        votes = majority_votes([row.responses for row in rows], multiple_choice=args.multiple_choice, pool=pool)
        timed_out += len(pool.timed_out)
    majority, best, disagreements, start = [], [], [], 0
    for row, vote in zip(rows, votes, strict=True):
        verdicts = flat[start : start + len(row.responses)]
        start += len(row.responses)
        row.data["verdicts"] = verdicts
        row.data["extracted"] = [extract(r, args.multiple_choice) for r in row.responses]
        row.data["majority_correct"] = verdicts[vote.index] if vote.index >= 0 else False
        majority.append(row.data["majority_correct"])
        if row.reference is not None:
            disagreements += [
                (row.line, k) for k, (a, b) in enumerate(zip(verdicts, row.reference, strict=True)) if a != b
            ]
        if row.scores is not None:
            pick = best_of_n(row.scores)
            row.data["best_of_n_correct"] = verdicts[pick] if pick >= 0 else False
            best.append(row.data["best_of_n_correct"])
    return GradeSummary(
        accuracy=sum(flat) / len(flat) if flat else None,
        majority_accuracy=sum(majority) / len(majority),
        best_of_n_accuracy=sum(best) / len(best) if rows[0].scores is not None else None,
        n=len(rows),
        n_responses=len(flat),
        timed_out=timed_out,
        agreement=1 - len(disagreements) / len(flat) if rows[0].reference is not None and flat else None,
        disagreements=disagreements,
    )


def _write_output(rows: list[_Row], path: Path) -> None:
    """In one step (temporary file, fsync, rename): a kill leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.data, ensure_ascii=False) + "\n")


def _print_summary(summary: GradeSummary, args: argparse.Namespace) -> None:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    print(f"accuracy            {pct(summary.accuracy)}  ({summary.n_responses} responses)")
    print(f"majority accuracy   {pct(summary.majority_accuracy)}  ({summary.n} rows)")
    if args.score_field:
        print(f"best-of-N accuracy  {pct(summary.best_of_n_accuracy)}  (by {args.score_field})")
    if summary.agreement is not None:
        shown = " ".join(f"{line}:{k}" for line, k in summary.disagreements[:MAX_SHOWN])
        more = " ..." if len(summary.disagreements) > MAX_SHOWN else ""
        print(f"agreement           {pct(summary.agreement)}  with {args.reference_field}")
        if summary.disagreements:
            print(f"disagreements       {len(summary.disagreements)} (line:response) {shown}{more}")
    if summary.timed_out:
        print(f"{summary.timed_out} comparisons ran out of time (--timeout {args.timeout:g}) and count as wrong")
    if args.output:
        print(f"wrote {args.output}")


def run_grade(args: argparse.Namespace) -> int:
    if args.output:
        check_output_file(args.output, "--output")  # now, not after the grading
    rows = _read_rows(args)
    summary = grade_rows(rows, args)
    if args.output:
        _write_output(rows, args.output)
    if args.json:
        json.dump(summary.to_dict(), sys.stdout)
        print()
    else:
        _print_summary(summary, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m rsd.eval.grade_cmd`, for use without the `rsd` entry point."""
    parser = argparse.ArgumentParser(prog="rsd grade", description=__doc__.split("\n\n")[0])
    add_grade_arguments(parser)
    try:
        return run_grade(parser.parse_args(argv))
    except RSDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
