"""Summaries of a run's records: per-method accuracy and cost, a markdown table and the accuracy/compute plot."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rsd.core import MODEL_ROLES


def summarize_method(method: str, records: Sequence[dict]) -> dict:
    """Accuracy and costs of one method, summed over its records (one per problem)."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    totals = {
        "steps_kept": 0,
        "steps_rejected": 0,
        "num_steps": 0,
        "target_steps": 0,
    }
    tokens = {"draft_kept": 0, "draft_discarded": 0, "target": 0, "prm": 0}
    flops = dict.fromkeys(MODEL_ROLES, 0.0)
    wall = dict.fromkeys(MODEL_ROLES, 0.0)
    for record in records:
        stats = record["stats"]
        totals["steps_kept"] += stats["steps_kept"]
        totals["steps_rejected"] += stats["steps_rejected"]
        totals["num_steps"] += stats["num_steps"]
        totals["target_steps"] += stats["steps_rejected"] + stats["steps_target_only"]
        for key in tokens:
            tokens[key] += stats["tokens"][key]
        for role in MODEL_ROLES:
            flops[role] += stats["flops"].get(role, 0.0)
            wall[role] += stats["wall_time_s"].get(role, 0.0)
    proposed = totals["steps_kept"] + totals["steps_rejected"]
    speculative = [r["speculative"] for r in records if "speculative" in r]
    generated = tokens["draft_kept"] + tokens["target"]
    return {
        "method": method,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "acceptance_rate": totals["steps_kept"] / proposed if proposed else None,
        "target_step_share": totals["target_steps"] / totals["num_steps"] if totals["num_steps"] else 0.0,
        "target_token_share": tokens["target"] / generated if generated else 0.0,
        "steps": totals["num_steps"],
        "tokens": tokens,
        "flops": {**flops, "total": sum(flops.values())},
        "wall_time_s": round(sum(wall.values()), 4),
        "wall_time_by_model_s": {r: round(t, 4) for r, t in wall.items()},
        "finish_reasons": finish_reasons(records),
        **({"speculative": speculative_summary(speculative)} if speculative else {}),
    }


def finish_reasons(records: Sequence[dict]) -> dict[str, int]:
    """How many problems ended for each reason ("eos", "max_new_tokens", "max_steps", "context", ...)."""
    return dict(sorted(Counter(r["finish_reason"] for r in records if r.get("finish_reason")).items()))


def finish_reason_note(summaries: Sequence[dict]) -> str | None:
    """A footnote for the table where some problems ended other than at EOS (a budget, or a full context)."""
    if all(set(s.get("finish_reasons", {})) <= {"eos"} for s in summaries):
        return None
    parts = [
        f"{s['method']} " + ", ".join(f"{n} {reason}" for reason, n in s["finish_reasons"].items())
        for s in summaries
        if s.get("finish_reasons")
    ]
    return "problems by finish reason: " + "; ".join(parts)


def speculative_summary(per_problem: Sequence[dict]) -> dict:
    proposed = sum(s["draft_tokens_proposed"] for s in per_problem)
    accepted = sum(s["draft_tokens_accepted"] for s in per_problem)
    return {
        "rounds": sum(s["rounds"] for s in per_problem),
        "draft_tokens_proposed": proposed,
        "draft_tokens_accepted": accepted,
        "token_acceptance_rate": accepted / proposed if proposed else None,
    }


def summarize(records: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    """One summary per method, in the order given; FLOPs relative to target-only where it ran."""
    summaries = [summarize_method(m, [r for r in records if r["method"] == m]) for m in methods]
    reference = next((s for s in summaries if s["method"] == "target"), None)
    for s in summaries:
        ref_flops = reference["flops"]["total"] if reference else 0.0
        s["flops_vs_target"] = s["flops"]["total"] / ref_flops if ref_flops else None
    return summaries


def markdown_table(summaries: Sequence[dict]) -> str:
    head = "| method | n | accuracy | target steps | target tokens | FLOPs vs target | wall time (s) |\n"
    head += "|---|---:|---:|---:|---:|---:|---:|\n"
    rows = []
    for s in summaries:
        ratio = "n/a" if s["flops_vs_target"] is None else f"{s['flops_vs_target']:.2f}"
        rows.append(
            f"| {s['method']} | {s['n']} | {s['accuracy']:.1%} | {s['target_step_share']:.1%} | "
            f"{s['target_token_share']:.1%} | {ratio} | {s['wall_time_s']:.1f} |"
        )
    return head + "\n".join(rows) + "\n"


def text_table(summaries: Sequence[dict]) -> str:
    """The same table for a terminal."""
    lines = [f"{'method':<28}{'n':>6}{'accuracy':>10}{'tgt steps':>11}{'tgt tokens':>12}{'FLOPs/tgt':>11}{'wall s':>9}"]
    for s in summaries:
        ratio = "n/a" if s["flops_vs_target"] is None else f"{s['flops_vs_target']:.2f}"
        lines.append(
            f"{s['method']:<28}{s['n']:>6}{s['accuracy']:>10.1%}{s['target_step_share']:>11.1%}"
            f"{s['target_token_share']:>12.1%}{ratio:>11}{s['wall_time_s']:>9.1f}"
        )
    return "\n".join(lines)


def report_markdown(title: str, summaries: Sequence[dict], config: dict) -> str:
    footnote = finish_reason_note(summaries)
    lines = [f"# {title}", "", markdown_table(summaries), *([footnote, ""] if footnote else [])]
    lines += ["## Configuration", "", "```"]
    lines += [f"{k}: {v}" for k, v in sorted(config.items())]
    lines += ["```", ""]
    return "\n".join(lines)


def plot_tradeoff(summaries: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy against FLOPs (relative to target-only) and against the target's step share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "flops_vs_target", "FLOPs relative to target-only"),
        (axes[1], "target_step_share", "share of steps written by the target"),
    ):
        sweep = [s for s in summaries if s["method"] not in ("target", "draft") and s.get(key) is not None]
        if sweep:
            ax.plot([s[key] for s in sweep], [s["accuracy"] for s in sweep], "o-", color="tab:blue", label="RSD")
            points = [(s[key], s["accuracy"]) for s in summaries if s.get(key) is not None]
            for (x, y), text in legible_labels(sweep, key, points):
                ax.annotate(text, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        for name, marker, color in (("target", "*", "tab:red"), ("draft", "s", "tab:green")):
            ref = next((s for s in summaries if s["method"] == name and s.get(key) is not None), None)
            if ref:
                ax.plot([ref[key]], [ref["accuracy"]], marker, color=color, markersize=11, label=f"{name}-only")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def short_labels(summaries: Sequence[dict]) -> list[str]:
    """Each point's label without the parts every point shares ("threshold,delta=0.7" -> "delta=0.7")."""
    names = [s.get("label") or s["method"].removeprefix("rsd[").removesuffix("]") for s in summaries]
    parts = [name.split(",") for name in names]
    shared = set.intersection(*(set(p) for p in parts)) if len(parts) > 1 else set()
    return [",".join(part for part in p if part not in shared) or ",".join(p) for p in parts]


def legible_labels(
    sweep: Sequence[dict], key: str, points: Sequence[tuple[float, float]], spacing: float = 0.06
) -> list[tuple[tuple[float, float], str]]:
    """The labels to draw: a point closer than `spacing` (a share of the axes' span) to one already labelled
    keeps its marker but not its text, so a dense sweep stays readable."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    drawn: list[tuple[float, float]] = []
    chosen = []
    for s, text in sorted(zip(sweep, short_labels(sweep), strict=True), key=lambda pair: pair[0][key]):
        x, y = s[key], s["accuracy"]
        if all(math.hypot((x - a) / span_x, (y - b) / span_y) >= spacing for a, b in drawn):
            drawn.append((x, y))
            chosen.append(((x, y), text))
    return chosen
