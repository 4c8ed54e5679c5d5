"""How fast could any schedule of RSD's model calls be, given what each call costs on the card?

`gpu_speed.py` measures RSD against the bound target-only / (draft + PRM + 0.3 x target). That bound charges the
target 30% of its time because it rewrites 30% of the steps. On one GPU at batches 16 and 64 a decode forward
reads all the weights whatever the rows, so a target call costs about the same for 5 rows as for 64; and RSD's
steps depend on each other (a row's next draft step starts from the step the target rewrote). This script takes
the per-call costs a `gpu_speed.py` run measured and replays RSD's calls under several schedules, with the same
random rejections (each draft step rejected with probability 1 - keep_share, independently):

- lockstep-rounds: what `StepwiseDecoder` does: every round, one draft call for all unfinished rows, one PRM call,
  one target call for the rejected rows;
- defer-target(q): the target waits until at least a share q of the unfinished rows is rejected (or nothing else
  can run), so that its calls carry more rows; rows waiting for it skip draft rounds;
- overlap(s): each model its own worker that takes every row waiting for it as one call as soon as it is free,
  draft and target running at the same time on the GPU, each slowed by s while the other runs (s = 1: perfect
  overlap, which one GPU cannot do);
- continuous(s, PRM waits for q): batching at the token, as vLLM and SGLang serve: each model decodes one token
  per forward for every row in its phase, and a row joins or leaves between any two forwards, so it never waits
  for another row's step to end. The PRM scores, on the draft's card between two draft forwards, the rows whose
  draft step ended, once they are at least a share q of the rows drafting or waiting (q = 0: at once; q = 1: when
  no row is left drafting). s as in overlap; s = 1 is the target on a card of its own (the two-GPU layout).

A call's time grows linearly with its rows, along the line through the two points measured for the target: alone
on all rows (`target_only`) and on the rejected share of them (`target_rewrite_rows`). The draft and the PRM were
timed on all rows; their row-independent share is taken to be the target's, or with `--own-shares` each their
own, from their times alone on one row (the report's batch-1 result). Prefills after a rejection are left out
(free), so every makespan here is a lower bound on what that schedule would measure.

    python benchmarks/schedule_bound.py benchmarks/results/h200-16915a8-gpu-speed.json
    python benchmarks/schedule_bound.py benchmarks/results/h200-16915a8-gpu-speed.json --own-shares
    python benchmarks/schedule_bound.py benchmarks/results/h200-16915a8-gpu-speed.json --prm-scale 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DRAWS = 200  # random rejection patterns per batch size
DEFER_SHARES = (0.25, 0.5)
OVERLAP_SLOWDOWNS = (1.0, 1.3)
CONTINUOUS_PRM_SHARES = (0.0, 1.0)  # continuous(s): the share of the draft's rows the PRM waits for
STEP_TOKENS = 64  # gpu_speed.py's step cap, where its JSON does not say


@dataclass(frozen=True)
class CallCosts:
    """Seconds of one step's call (all its tokens) on the whole batch, and the share of it that does not depend on
    the rows (the weights read once per token); the rest grows in proportion to the rows."""

    draft_full: float
    prm_full: float
    target_full: float
    fixed_share: float
    batch: int
    step_tokens: int = STEP_TOKENS  # tokens per step: a call is that many decode forwards
    # The draft's and the PRM's own row-independent shares (`--own-shares`); None: the target's.
    draft_fixed: float | None = None
    prm_fixed: float | None = None

    def scale(self, full: float, rows: int, share: float | None = None) -> float:
        fixed = self.fixed_share if share is None else share
        return full * (fixed + (1.0 - fixed) * rows / self.batch)

    def draft(self, rows: int) -> float:
        return self.scale(self.draft_full, rows, self.draft_fixed)

    def prm(self, rows: int) -> float:
        return self.scale(self.prm_full, rows, self.prm_fixed)

    def target(self, rows: int) -> float:
        return self.scale(self.target_full, rows)


def fixed_share(full: float, few: float, batch: int, few_rows: int) -> float:
    """The row-independent share of `full`, from a straight line through (few_rows, few) and (batch, full)."""
    if few_rows >= batch:
        return 1.0
    per_row = (full - few) / (batch - few_rows)
    return min(1.0, max(0.0, (full - per_row * batch) / full))


Rejections = list[list[bool]]  # [row][step]: whether that draft step is rejected


def draw_rejections(batch: int, steps: int, reject: float, seed: int) -> Rejections:
    rng = random.Random(seed)
    return [[rng.random() < reject for _ in range(steps)] for _ in range(batch)]


def lockstep_rounds(costs: CallCosts, rejected: Rejections) -> float:
    batch, steps = len(rejected), len(rejected[0])
    seconds = 0.0
    for step in range(steps):
        seconds += costs.draft(batch) + costs.prm(batch)
        rewrites = sum(row[step] for row in rejected)
        if rewrites:
            seconds += costs.target(rewrites)
    return seconds


def defer_target(costs: CallCosts, rejected: Rejections, share: float) -> float:
    batch, steps = len(rejected), len(rejected[0])
    done = [0] * batch  # steps finished per row
    waiting: list[int] = []
    seconds = 0.0
    while any(d < steps for d in done):
        ready = [r for r in range(batch) if done[r] < steps and r not in waiting]
        if ready:
            seconds += costs.draft(len(ready)) + costs.prm(len(ready))
            for r in ready:
                if rejected[r][done[r]]:
                    waiting.append(r)
                else:
                    done[r] += 1
        unfinished = sum(d < steps for d in done)
        still_ready = unfinished - len(waiting)
        if waiting and (len(waiting) >= share * unfinished or still_ready == 0):
            seconds += costs.target(len(waiting))
            for r in waiting:
                done[r] += 1
            waiting = []
    return seconds


def overlap(costs: CallCosts, rejected: Rejections, slowdown: float) -> float:
    """Event simulation: a free worker takes every row waiting for it; a call started while the other model is
    busy runs `slowdown` times slower."""
    batch, steps = len(rejected), len(rejected[0])
    done = [0] * batch
    queues: dict[str, set[int]] = {"draft": set(range(batch)), "target": set()}
    busy: dict[str, tuple[float, set[int]] | None] = {"draft": None, "target": None}
    now = 0.0
    while True:
        for model, other in (("draft", "target"), ("target", "draft")):
            if busy[model] is None and queues[model]:
                rows, queues[model] = queues[model], set()
                cost = costs.draft(len(rows)) + costs.prm(len(rows)) if model == "draft" else costs.target(len(rows))
                busy[model] = (now + cost * (slowdown if busy[other] else 1.0), rows)
        running = [(entry[0], model) for model, entry in busy.items() if entry is not None]
        if not running:
            return now
        now, model = min(running)
        _, rows = busy[model]  # type: ignore[misc]
        busy[model] = None
        for r in rows:
            if model == "draft" and rejected[r][done[r]]:
                queues["target"].add(r)
                continue
            done[r] += 1
            if done[r] < steps:
                queues["draft"].add(r)


def continuous(costs: CallCosts, rejected: Rejections, slowdown: float, prm_share: float = 0.0) -> float:
    """Event simulation at the token: each card runs one forward at a time over the rows in its phase then (a
    draft or target forward costs its call's time on those rows over `step_tokens`; a PRM call its call's time); a
    forward started while the other card is busy runs `slowdown` times slower. The draft's card scores the rows
    waiting for the PRM once they are at least `prm_share` of the rows drafting or waiting (or nothing else is
    left to draft): a PRM call costs much the same for 3 rows as for 30, so scoring each row as soon as its step
    ends makes many near-empty calls. Rows in a phase advance together, so each is filed under the forward count
    at which its step ends."""
    batch, steps, tokens = len(rejected), len(rejected[0]), costs.step_tokens
    done = [0] * batch
    forwards = {"draft": 0, "target": 0}  # forwards run so far, per model
    ending: dict[str, dict[int, list[int]]] = {"draft": {tokens: list(range(batch))}, "target": {}}
    active = {"draft": batch, "target": 0}  # rows in each model's phase
    scoring: list[int] = []  # rows whose draft step ended, waiting for the PRM
    busy: dict[str, tuple[float, str, list[int]] | None] = {"draft": None, "target": None}
    now = 0.0

    def start(model: str) -> None:
        other_busy = busy["target" if model == "draft" else "draft"] is not None
        if model == "draft" and scoring and len(scoring) >= prm_share * (len(scoring) + active["draft"]):
            work, rows, cost = "prm", list(scoring), costs.prm(len(scoring))
            scoring.clear()
        elif active[model]:
            work, rows = "forward", []
            full = costs.draft(active[model]) if model == "draft" else costs.target(active[model])
            cost = full / tokens
        else:
            return
        busy[model] = (now + cost * (slowdown if other_busy else 1.0), work, rows)

    def enter(model: str, row: int) -> None:
        ending[model].setdefault(forwards[model] + tokens, []).append(row)
        active[model] += 1

    while True:
        for model in ("draft", "target"):
            if busy[model] is None:
                start(model)
        running = [(entry[0], model) for model, entry in busy.items() if entry is not None]
        if not running:
            return now
        now, model = min(running)
        _, work, rows = busy[model]  # type: ignore[misc]
        busy[model] = None
        if work == "prm":
            for r in rows:
                if rejected[r][done[r]]:
                    enter("target", r)
                    continue
                done[r] += 1
                if done[r] < steps:
                    enter("draft", r)
            continue
        forwards[model] += 1
        for r in ending[model].pop(forwards[model], []):
            active[model] -= 1
            if model == "draft":
                scoring.append(r)
                continue
            done[r] += 1
            if done[r] < steps:
                enter("draft", r)


def schedules() -> dict[str, Callable[[CallCosts, Rejections], float]]:
    table: dict[str, Callable[[CallCosts, Rejections], float]] = {"lockstep-rounds": lockstep_rounds}
    for share in DEFER_SHARES:
        table[f"defer-target({share:g})"] = lambda c, r, share=share: defer_target(c, r, share)
    for slowdown in OVERLAP_SLOWDOWNS:
        table[f"overlap({slowdown:g})"] = lambda c, r, slowdown=slowdown: overlap(c, r, slowdown)
    for slowdown in OVERLAP_SLOWDOWNS:
        for share in CONTINUOUS_PRM_SHARES:
            table[f"continuous({slowdown:g}, PRM waits for {share:.0%})"] = (
                lambda c, r, slowdown=slowdown, share=share: continuous(c, r, slowdown, share)
            )
    return table


def costs_from_result(result: dict, steps: int, keep_share: float, step_tokens: int = STEP_TOKENS) -> CallCosts:
    t = result["seconds_median"]
    batch = result["batch"]
    few_rows = max(1, math.ceil((1.0 - keep_share) * batch))  # as gpu_speed.py times `target_rewrite_rows`
    few = t.get("target_rewrite_rows", t["target_only"])
    return CallCosts(
        draft_full=t["draft_alone"] / steps,
        prm_full=t["prm_alone"] / steps,
        target_full=t["target_only"] / steps,
        fixed_share=fixed_share(t["target_only"], few, batch, few_rows),
        batch=batch,
        step_tokens=step_tokens,
    )


def is_gpu_speed_report(report: object) -> bool:
    """Whether a parsed JSON file is `gpu_speed.py` output (benchmarks/results/ also holds other benchmarks')."""
    if not isinstance(report, dict) or not isinstance(report.get("config"), dict):
        return False
    results = report.get("results")
    return isinstance(results, list) and all(isinstance(r, dict) and "seconds_median" in r for r in results)


def own_shares(result: dict, one_row: dict) -> dict[str, float]:
    """The draft's and the PRM's row-independent shares at `result`'s batch, each from its own line through its
    time alone on one row (`one_row`, the batch-1 result) and on the whole batch."""
    t, one, batch = result["seconds_median"], one_row["seconds_median"], result["batch"]
    return {
        "draft_fixed": fixed_share(t["draft_alone"], one["draft_alone"], batch, 1),
        "prm_fixed": fixed_share(t["prm_alone"], one["prm_alone"], batch, 1),
    }


def analyse(report: dict, draws: int = DRAWS, prm_scale: float = 1.0, own: bool = False) -> list[dict]:
    """Every schedule's median makespan per batch size. `prm_scale` multiplies the PRM's calls (0: a free PRM, to
    see what the PRM's calls cost a schedule); the bound keeps the PRM as measured. `own`: the draft and the PRM
    each scale with their rows by their own share, from the report's batch-1 result, not the target's."""
    steps, keep = report["config"]["steps"], report["config"]["keep_share"]
    step_tokens = report["config"].get("step_tokens", STEP_TOKENS)
    one_row = next((r for r in report["results"] if r["batch"] == 1), None)
    if own and one_row is None:
        raise ValueError("own row-independent shares need the draft and PRM timed on one row: a batch-1 result")
    rows = []
    for result in sorted(report["results"], key=lambda r: r["batch"]):
        costs = costs_from_result(result, steps, keep, step_tokens)
        shares = own_shares(result, one_row) if own and one_row is not None else {}
        costs = dataclasses.replace(costs, prm_full=costs.prm_full * prm_scale, **shares)
        t = result["seconds_median"]
        bound_time = t["draft_alone"] + t["prm_alone"] + (1.0 - keep) * t["target_only"]
        patterns = [draw_rejections(result["batch"], steps, 1.0 - keep, seed) for seed in range(draws)]
        row = {
            "batch": result["batch"],
            "target_only_s": t["target_only"],
            "bound_s": bound_time,
            "bound": t["target_only"] / bound_time,
            "fixed_share": costs.fixed_share,
            "draft_prm_fixed_shares": [costs.draft_fixed, costs.prm_fixed] if own else None,
            "measured_rsd_s": t.get("rsd"),
            "schedules": {},
        }
        for name, schedule in schedules().items():
            seconds = statistics.median(schedule(costs, pattern) for pattern in patterns)
            speedup = t["target_only"] / seconds
            row["schedules"][name] = {"seconds": seconds, "speedup": speedup, "of_bound": speedup / row["bound"]}
        rows.append(row)
    return rows


def lines(rows: Sequence[dict]) -> str:
    names = list(rows[0]["schedules"])
    out = [
        "batch | row-independent share | bound | " + " | ".join(f"{n} s (of bound)" for n in names) + " | RSD measured",
        "---:|---:|---:|" + "---:|" * len(names) + "---:",
    ]
    for r in rows:
        cells = [f"{s['seconds']:.2f} ({s['of_bound']:.0%})" for s in r["schedules"].values()]
        measured = f"{r['measured_rsd_s']:.2f}" if r["measured_rsd_s"] is not None else "-"
        shares = f"{r['fixed_share']:.0%}"
        if r.get("draft_prm_fixed_shares"):
            draft, prm = r["draft_prm_fixed_shares"]
            shares += f" (draft {draft:.0%}, PRM {prm:.0%})"
        out.append(f"{r['batch']} | {shares} | {r['bound']:.2f}x | " + " | ".join(cells) + f" | {measured}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a gpu_speed.json (gpu_speed.py --out, or benchmarks/results/)")
    parser.add_argument("--draws", type=int, default=DRAWS, help="random rejection patterns per batch size")
    parser.add_argument(
        "--prm-scale", type=float, default=1.0, help="multiply the PRM's calls by this (0: free); the bound is kept"
    )
    parser.add_argument(
        "--own-shares",
        action="store_true",
        help="the draft and the PRM scale with their rows by their own row-independent shares (from the batch-1 "
        "result), not the target's",
    )
    args = parser.parse_args(argv)
    if args.prm_scale < 0:
        parser.error(f"--prm-scale {args.prm_scale}: a PRM call cannot cost less than nothing; pass 0 or more")
    if not args.results.is_file():
        sys.exit(f"{args.results}: no such file; pass a gpu_speed.json, e.g. one in benchmarks/results/")
    report = json.loads(args.results.read_text())
    if not is_gpu_speed_report(report):
        sys.exit(f"{args.results} is not gpu_speed.py output (no config and timed results); pass a gpu_speed.json.")
    if args.own_shares and not any(r["batch"] == 1 for r in report["results"]):
        sys.exit(f"{args.results} has no batch-1 result: --own-shares needs one (gpu_speed.py --batches ... 1)")
    rows = analyse(report, args.draws, args.prm_scale, args.own_shares)
    print(lines(rows))
    return rows


if __name__ == "__main__":
    main()
