"""Summaries of a run's records: per-method accuracy with its interval, cost by source, paired comparisons
between methods, pass@k of sampling methods, and the tables of the terminal and of report.md.

The columns mean the same for every method:
- target steps: the share of the solution steps the target wrote (RSD: the draft's proposals the PRM rejected
  and the target rewrote). `sd` has none: each of its steps mixes draft tokens the target accepted with the
  target's own, so it reports tokens only.
- target tokens: the share of the generated tokens the target wrote.
- steps kept: the share of the draft's proposed steps the PRM kept (methods where a PRM judges draft steps).
- tokens kept: the share of the draft's proposed tokens that were kept (RSD: in the steps the PRM kept; `sd`:
  the tokens the target's acceptance rule accepted).
A method that proposes nothing for anyone to judge (target, draft, best-of-n, majority) has no acceptance rate.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from collections.abc import Sequence

from rsd.core import MODEL_ROLES
from rsd.eval.stats import CONFIDENCE, INTERVAL_NAME, compare, pass_at_ks, wilson_interval

# Methods whose draft steps a PRM keeps or rejects: they have a step acceptance rate.
PRM_JUDGED_KINDS = ("rsd", "rsd-best-of-n", "rsd-majority")
SAMPLING_KINDS = ("best-of-n", "majority", "rsd-best-of-n", "rsd-majority")
# `sd`'s steps are each written by both models (tokens the target accepted and its own).
MIXED_STEP_KINDS = ("sd",)
REFERENCE = "target"

COLUMN_NOTES = (
    "target steps / target tokens: the share of the solution steps / generated tokens the target wrote "
    "(sd mixes both models' tokens in every step, so it has tokens only); steps kept: the draft's proposed steps "
    "the PRM kept; tokens kept: the draft's proposed tokens that were kept (sd: accepted by the target's check); "
    "-: not applicable (nothing was proposed for anyone to accept)."
)


def record_totals(records: Sequence[dict]) -> tuple[dict, dict, dict, dict]:
    """Steps, tokens, FLOPs and seconds summed over records."""
    steps = {"kept": 0, "rejected": 0, "target_only": 0, "total": 0}
    tokens = {"draft_kept": 0, "draft_discarded": 0, "target": 0, "prm": 0}
    flops = dict.fromkeys(MODEL_ROLES, 0.0)
    wall = dict.fromkeys(MODEL_ROLES, 0.0)
    for record in records:
        stats = record["stats"]
        steps["kept"] += stats["steps_kept"]
        steps["rejected"] += stats["steps_rejected"]
        steps["target_only"] += stats["steps_target_only"]
        steps["total"] += stats["num_steps"]
        for key in tokens:
            tokens[key] += stats["tokens"][key]
        for role in MODEL_ROLES:
            flops[role] += stats["flops"].get(role, 0.0)
            wall[role] += stats["wall_time_s"].get(role, 0.0)
    return steps, tokens, flops, wall


def share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def steps_by_source(kind: str, steps: dict) -> dict:
    """Who wrote the committed steps: the draft (kept proposals), the target, or both (`sd`)."""
    if kind in MIXED_STEP_KINDS:
        return {"draft": 0, "target": 0, "mixed": steps["total"]}
    return {"draft": steps["kept"], "target": steps["rejected"] + steps["target_only"], "mixed": 0}


def acceptance_rates(kind: str, steps: dict, tokens: dict, speculative: dict | None) -> tuple:
    """(step acceptance, token acceptance), None where nothing was proposed for anyone to accept."""
    if kind in PRM_JUDGED_KINDS:
        proposed_tokens = tokens["draft_kept"] + tokens["draft_discarded"]
        return share(steps["kept"], steps["kept"] + steps["rejected"]), share(tokens["draft_kept"], proposed_tokens)
    if kind in MIXED_STEP_KINDS and speculative:
        return None, speculative["token_acceptance_rate"]
    return None, None


def summarize_method(method: str, records: Sequence[dict], display: str | None = None) -> dict:
    """Accuracy (with its interval) and costs of one method, summed over its records (one per problem)."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    kind = records[0].get("kind", method) if records else method
    steps, tokens, flops, wall = record_totals(records)
    speculation = [r["stats"]["speculation"] for r in records if r["stats"].get("speculation", {}).get("rounds")]
    spec_summary = speculation_summary(speculation) if speculation else None
    target_forwards = sum(r["stats"].get("target_forwards", 0) for r in records)
    step_acceptance, token_acceptance = acceptance_rates(kind, steps, tokens, spec_summary)
    by_source = steps_by_source(kind, steps)
    ci = wilson_interval(correct, n)
    summary = {
        "method": method,
        "display": display or method,
        "kind": kind,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci": None if ci is None else [round(ci[0], 6), round(ci[1], 6)],
        "confidence": CONFIDENCE,
        "interval": INTERVAL_NAME,
        "acceptance_rate": step_acceptance,
        "token_acceptance_rate": token_acceptance,
        "target_step_share": None if kind in MIXED_STEP_KINDS else (share(by_source["target"], steps["total"]) or 0.0),
        "target_token_share": share(tokens["target"], tokens["draft_kept"] + tokens["target"]) or 0.0,
        "steps": steps["total"],
        "steps_by_source": by_source,
        "tokens": tokens,
        "flops": {**flops, "total": sum(flops.values())},
        "wall_time_s": round(sum(wall.values()), 4),
        "wall_time_by_model_s": {r: round(t, 4) for r, t in wall.items()},
        "finish_reasons": finish_reasons(records),
    }
    summary["target_forwards"] = target_forwards
    summary["target_forwards_per_target_token"] = share(target_forwards, tokens["target"])
    if spec_summary:
        summary["speculation"] = spec_summary
    if kind in SAMPLING_KINDS and records:
        summary.update(sampling_summary(records))
    return summary


def finish_reasons(records: Sequence[dict]) -> dict[str, int]:
    """How many problems ended for each reason ("eos", "max_new_tokens", "max_steps", "context", ...)."""
    return dict(sorted(Counter(r["finish_reason"] for r in records if r.get("finish_reason")).items()))


def finish_reason_note(summaries: Sequence[dict]) -> str | None:
    """A footnote for the table where some problems ended other than at EOS (a budget, or a full context)."""
    if all(set(s.get("finish_reasons", {})) <= {"eos"} for s in summaries):
        return None
    parts = [
        f"{s['display']} " + ", ".join(f"{n} {reason}" for reason, n in s["finish_reasons"].items())
        for s in summaries
        if s.get("finish_reasons")
    ]
    return "problems by finish reason: " + "; ".join(parts)


def sampling_summary(records: Sequence[dict]) -> dict:
    """pass@k over the samples each problem drew, and coverage: the share with at least one correct sample."""
    per_problem = [(len(r["samples"]), sum(bool(s["correct"]) for s in r["samples"])) for r in records]
    covered = sum(correct > 0 for _, correct in per_problem)
    ci = wilson_interval(covered, len(per_problem))
    return {
        "samples_per_problem": min(samples for samples, _ in per_problem),
        "pass_at_k": {k: round(v, 6) for k, v in pass_at_ks(per_problem).items()},
        "coverage": {
            "correct": covered,
            "n": len(per_problem),
            "accuracy": covered / len(per_problem),
            "accuracy_ci": None if ci is None else [round(ci[0], 6), round(ci[1], 6)],
        },
    }


def speculation_summary(per_problem: Sequence[dict]) -> dict:
    """Token-level speculation over a method's problems: tokens taken from rejected steps and from the draft's
    proposals, and the draft's token acceptance."""
    total = {key: sum(s[key] for s in per_problem) for key in SPECULATION_COUNTS}
    return {
        **total,
        "token_acceptance_rate": share(total["tokens_from_draft"], total["draft_tokens_proposed"]),
        "proposal_acceptance_rate": share(total["tokens_from_proposal"], total["proposal_tokens"]),
    }


SPECULATION_COUNTS = ("proposal_tokens", "tokens_from_proposal", "draft_tokens_proposed", "tokens_from_draft", "rounds")


def display_name(kind: str, label: str, config: dict | None) -> str:
    """The name a table shows: an N-sample method says its N (and best-of-n its aggregate of step rewards)."""
    if not config or kind not in SAMPLING_KINDS:
        return label
    details = [f"N={config.get('n')}"]
    if kind.endswith("best-of-n"):
        details.append(str(config.get("aggregate")))
    return f"{label} ({', '.join(details)})"


def summarize(records: Sequence[dict], methods: Sequence[str], config: dict | None = None) -> list[dict]:
    """One summary per method, in the order given; FLOPs relative to target-only where it ran."""
    summaries = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        kind = mine[0].get("kind", method) if mine else method
        summaries.append(summarize_method(method, mine, display_name(kind, method, config)))
    reference = next((s for s in summaries if s["method"] == REFERENCE), None)
    for s in summaries:
        ref_flops = reference["flops"]["total"] if reference else 0.0
        s["flops_vs_target"] = s["flops"]["total"] / ref_flops if ref_flops else None
    return summaries


# -- paired comparisons -----------------------------------------------------------------------------------------
def comparison_pairs(summaries: Sequence[dict]) -> list[tuple[str, str]]:
    """Every method against the target, then every RSD method against every other baseline."""
    methods = [s["method"] for s in summaries]
    kinds = {s["method"]: s["kind"] for s in summaries}
    pairs = [(m, REFERENCE) for m in methods if m != REFERENCE] if REFERENCE in methods else []
    for a in methods:
        if kinds[a] not in PRM_JUDGED_KINDS:
            continue
        pairs += [(a, b) for b in methods if b != REFERENCE and kinds[b] not in PRM_JUDGED_KINDS]
    return list(dict.fromkeys(pairs))


def compare_methods(records: Sequence[dict], summaries: Sequence[dict]) -> list[dict]:
    """Paired comparisons on the problems both methods ran (`rsd.eval.stats.compare`)."""
    verdicts: dict[str, dict[str, bool]] = {}
    for r in records:
        verdicts.setdefault(r["method"], {})[str(r["id"])] = bool(r["correct"])
    display = {s["method"]: s["display"] for s in summaries}
    out = []
    for a, b in comparison_pairs(summaries):
        result = compare(a, b, verdicts.get(a, {}), verdicts.get(b, {})).to_dict()
        out.append({**result, "a_display": display[a], "b_display": display[b]})
    return out


# -- formatting -------------------------------------------------------------------------------------------------
def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def interval_text(value: float, ci: Sequence[float] | None) -> str:
    """`98.5% [95.7, 99.5]`: a share with its interval, in percent."""
    if ci is None:
        return f"{value:.1%}"
    return f"{value:.1%} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def points_text(difference: float, ci: Sequence[float] | None) -> str:
    """`-1.5 pts [-4.3, +0.9]`: a difference of accuracies in percentage points, with its interval."""
    text = f"{100 * difference:+.1f} pts"
    return text if ci is None else f"{text} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def method_cells(s: dict) -> list[str]:
    ratio = "-" if s["flops_vs_target"] is None else f"{s['flops_vs_target']:.2f}"
    return [
        s["display"],
        str(s["n"]),
        interval_text(s["accuracy"], s["accuracy_ci"]),
        percent(s["target_step_share"]),
        percent(s["target_token_share"]),
        percent(s["acceptance_rate"]),
        percent(s["token_acceptance_rate"]),
        ratio,
        f"{s['wall_time_s']:.1f}",
    ]


METHOD_HEADER = [
    "method",
    "n",
    f"accuracy [{CONFIDENCE:.0%} CI]",
    "target steps",
    "target tokens",
    "steps kept",
    "tokens kept",
    "FLOPs vs target",
    "wall s",
]
COMPARISON_HEADER = ["A - B", "n", f"difference [{CONFIDENCE:.0%} CI]", "A only right", "B only right", "p"]


def comparison_cells(c: dict) -> list[str]:
    return [
        f"{c['a_display']} - {c['b_display']}",
        str(c["n"]),
        points_text(c["difference"], c["ci"]),
        str(c["a_only"]),
        str(c["b_only"]),
        p_text(c["p_value"]),
    ]


def sampling_rows(summaries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    sampled = [s for s in summaries if "pass_at_k" in s]
    ks = sorted({int(k) for s in sampled for k in s["pass_at_k"]})
    header = ["method", "n", *(f"pass@{k}" for k in ks), f"coverage [{CONFIDENCE:.0%} CI]"]
    rows = []
    for s in sampled:
        passes = [percent(s["pass_at_k"].get(str(k))) for k in ks]
        coverage = interval_text(s["coverage"]["accuracy"], s["coverage"]["accuracy_ci"])
        rows.append([s["display"], str(s["n"]), *passes, coverage])
    return header, rows


def aligned(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(map(escape, header)) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


COMPARISON_TITLE = (
    "paired on the same problems: difference of accuracies (A - B) with its {confidence:.0%} interval (Newcombe), "
    "the problems only A / only B got right, and McNemar's exact p"
)


def text_table(summaries: Sequence[dict], comparisons: Sequence[dict] = ()) -> str:
    """The tables for a terminal: methods, paired comparisons, and pass@k of sampling methods."""
    parts = [aligned(METHOD_HEADER, [method_cells(s) for s in summaries])]
    if footnote := finish_reason_note(summaries):
        parts.append(textwrap.fill(footnote, width=118))
    if comparisons:
        parts.append(textwrap.fill(COMPARISON_TITLE.format(confidence=CONFIDENCE), width=118))
        parts.append(aligned(COMPARISON_HEADER, [comparison_cells(c) for c in comparisons]))
    header, rows = sampling_rows(summaries)
    if rows:
        parts.append("sampling methods: pass@k over each problem's samples; coverage = at least one correct")
        parts.append(aligned(header, rows))
    parts.append(textwrap.fill(COLUMN_NOTES, width=118))
    return "\n\n".join(parts)


def config_value(value: object) -> str:
    """A configuration value as JSON, so a delimiter of blank lines reads "\\n\\n" rather than as blank lines."""
    return json.dumps(value, ensure_ascii=False, default=str)


def report_markdown(title: str, summaries: Sequence[dict], config: dict, comparisons: Sequence[dict] = ()) -> str:
    lines = [f"# {title}", "", markdown(METHOD_HEADER, [method_cells(s) for s in summaries]), COLUMN_NOTES, ""]
    if footnote := finish_reason_note(summaries):
        lines += [footnote, ""]
    if comparisons:
        lines += ["## Paired comparisons", "", COMPARISON_TITLE.format(confidence=CONFIDENCE) + ".", ""]
        lines += [markdown(COMPARISON_HEADER, [comparison_cells(c) for c in comparisons])]
    header, rows = sampling_rows(summaries)
    if rows:
        lines += ["## Sampling methods", "", "pass@k over each problem's samples; coverage: at least one correct.", ""]
        lines += [markdown(header, rows)]
    lines += ["## Configuration", "", "```"]
    lines += [f"{k}: {config_value(v)}" for k, v in sorted(config.items())]
    lines += ["```", ""]
    return "\n".join(lines)
