"""`rsd diff`: two methods of one run, or one method in two runs, compared problem by problem.

It prints the paired comparison (`rsd.eval.stats.compare`: both accuracies with their intervals, the difference
with its interval, the problems only one got right, McNemar's exact p) and then, side by side, every problem
where one was right and the other wrong: its id, the gold answer, each side's answer, and the question.
"""

from __future__ import annotations

import argparse
import json
import re

from rsd.core import RSDError
from rsd.eval.report import interval_text, p_text, points_text
from rsd.eval.runfolder import read_records
from rsd.eval.stats import compare, wilson_interval

QUESTION_CHARS = 70


def add_diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="one run folder (two methods), or two (one method each)")
    parser.add_argument(
        "--methods",
        default=None,
        help="A,B: the two methods of one run, or A's method in the first run and B's in the second (one name: "
        "the same method in both runs). Default: rsd,target in one run; in two, the first method both ran",
    )
    parser.add_argument("--all", action="store_true", help="also list problems both got right or wrong but with "
                        "different answers")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="list at most this many problems (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the responses")


def methods_of(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def choose_methods(runs: list[str], spec: str | None, records: list[list[dict]]) -> tuple[str, str]:
    """The method of side A and of side B, checked against what the runs hold."""
    # Commas inside brackets belong to a sweep's labels (rsd[threshold,delta=0.9]).
    names = [m.strip() for m in re.split(r",(?![^\[]*\])", spec) if m.strip()] if spec else []
    if len(runs) == 1:
        if not names:
            names = (
                ["rsd", "target"] if {"rsd", "target"} <= set(methods_of(records[0])) else methods_of(records[0])[:2]
            )
        if len(names) != 2:
            raise RSDError(f"--methods {spec!r}: name two methods of {runs[0]}, e.g. --methods rsd,target.")
    else:
        if not names:
            common = [m for m in methods_of(records[0]) if m in set(methods_of(records[1]))]
            names = common[:1]
        if len(names) == 1:
            names = names * 2
        if len(names) != 2:
            raise RSDError(f"--methods {spec!r}: name one method (the same in both runs) or two (A,B).")
    sides = [(runs[0], records[0]), (runs[-1], records[-1])]
    for (run, recs), name in zip(sides, names, strict=True):
        held = methods_of(recs)
        if name not in held:
            raise RSDError(f"{run} has no records of method {name!r}; it holds {', '.join(held) or 'none'}.")
    return names[0], names[1]


def by_id(records: list[dict], method: str) -> dict[str, dict]:
    return {str(r["id"]): r for r in records if r["method"] == method}


def side_label(run: str, method: str, two_runs: bool) -> str:
    return f"{method} ({run})" if two_runs else method


def disagreements(a: dict[str, dict], b: dict[str, dict], everything: bool) -> list[str]:
    """Problem ids where one side was right and the other wrong (and, with `everything`, where the answers
    differ although both were right or both wrong), in the order of side A's records."""
    ids = []
    for pid, ra in a.items():
        rb = b.get(pid)
        if rb is None:
            continue
        if bool(ra["correct"]) != bool(rb["correct"]) or (everything and ra.get("prediction") != rb.get("prediction")):
            ids.append(pid)
    return ids


def answer_cell(record: dict) -> str:
    mark = "right" if record["correct"] else "wrong"
    prediction = record.get("prediction")
    return f"{'-' if prediction is None else prediction} ({mark})"


def one_line(text: str, limit: int = QUESTION_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_lines(labels: tuple[str, str], comparison, unpaired: tuple[int, int]) -> list[str]:
    c = comparison
    lines = [f"{labels[0]} vs {labels[1]} on {c.n} problems both ran"]
    if any(unpaired):
        lines[0] += f" ({unpaired[0]} only in A, {unpaired[1]} only in B: left out)"
    width = max(len(label) for label in labels)
    for label, correct in ((labels[0], c.a_correct), (labels[1], c.b_correct)):
        accuracy = interval_text(correct / c.n if c.n else 0.0, wilson_interval(correct, c.n))
        lines.append(f"  {label:<{width}}  {accuracy:>21}")
    lines.append(
        f"  difference A - B: {points_text(c.difference, c.ci)} (95% interval, Newcombe); only A right: {c.a_only}, "
        f"only B right: {c.b_only}; McNemar exact p = {p_text(c.p_value)}"
    )
    return lines


def table_lines(ids: list[str], a: dict, b: dict, labels: tuple[str, str]) -> list[str]:
    rows = [["id", "gold", labels[0], labels[1], "question"]]
    rows += [[pid, str(a[pid].get("gold", "")), answer_cell(a[pid]), answer_cell(b[pid]), one_line(a[pid]["question"])]
             for pid in ids]  # fmt: skip
    widths = [min(max(len(r[i]) for r in rows), 40) for i in range(4)]
    return ["  ".join([*(r[i][:40].ljust(widths[i]) for i in range(4)), r[4]]).rstrip() for r in rows]


def side_json(record: dict) -> dict:
    return {k: record.get(k) for k in ("prediction", "correct", "response", "finish_reason")}


def cmd_diff(args: argparse.Namespace) -> int:
    if len(args.runs) > 2:
        raise RSDError(f"rsd diff takes one run folder or two, not {len(args.runs)}.")
    records = [read_records(run) for run in args.runs]
    method_a, method_b = choose_methods(args.runs, args.methods, records)
    a, b = by_id(records[0], method_a), by_id(records[-1], method_b)
    two_runs = len(args.runs) == 2
    labels = (side_label(args.runs[0], method_a, two_runs), side_label(args.runs[-1], method_b, two_runs))
    comparison = compare(labels[0], labels[1], {k: bool(r["correct"]) for k, r in a.items()},
                         {k: bool(r["correct"]) for k, r in b.items()})  # fmt: skip
    ids = disagreements(a, b, args.all)
    listed = ids if args.limit is None else ids[: max(args.limit, 0)]
    unpaired = (len(set(a) - set(b)), len(set(b) - set(a)))
    if args.json:
        rows = [{"id": pid, "gold": a[pid].get("gold"), "question": a[pid]["question"], "a": side_json(a[pid]),
                 "b": side_json(b[pid])} for pid in listed]  # fmt: skip
        payload = {"a": labels[0], "b": labels[1], "comparison": comparison.to_dict(), "unpaired": list(unpaired),
                   "disagreements": rows}  # fmt: skip
        print(json.dumps(payload, ensure_ascii=False))
        return 0
    print("\n".join(summary_lines(labels, comparison, unpaired)))
    what = "answers differ" if args.all else "one is right and the other wrong"
    print(f"\n{len(ids)} problems where {what}" + (f" (first {len(listed)} shown)" if len(listed) < len(ids) else ""))
    if listed:
        print("\n".join(table_lines(listed, a, b, ("A: " + method_a, "B: " + method_b))))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("diff", help="compare two methods or two runs problem by problem (paired test)")
    add_diff_arguments(parser)
    parser.set_defaults(func=cmd_diff)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use the `rsd diff` command")
