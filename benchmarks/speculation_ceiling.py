"""How fast token-level speculation can make the target write, at a token acceptance and a draft price.

A round costs one target forward and k draft forwards (the draft's price: its forward's time over the target's)
and writes (1 - a^(k+1)) / (1 - a) tokens at token acceptance a, with the best k. That is the ceiling of an
uninterrupted run (`sd`). RSD's rewrites are shorter: each starts by reading the rejected step (the proposal it
keeps a prefix of), and its rounds run in lock-step with the other rows rejected in the same round of RSD, so they
last until the slowest of them has written its step. This script simulates those rounds (acceptance draws at the
set rate, every row rejected with probability 1 - keep share) and prints, per price: the best k and the ceiling of
an uninterrupted run, and the speed-up of a rewrite's rounds over plain rewrites (one target forward per token)
for one row and for the rows rejected at each batch size. No host time, no prefill, verification forwards priced
as decodes: ceilings, not predictions. Last, how much an uninterrupted run's round count moves with its draws
alone (one standard deviation), the spread a benchmark of one trajectory carries.

`--run` prices RSD itself from a `gpu_speed.py` result at one batch size: its best time is the draft's and the
PRM's calls, the first forward of each rewrite (read from a `phase_profile.py --rewrite speculative` result given
with `--phases`: the target's forwards in the arena, which read the kept steps it has not seen and the rejected
step, compute-bound) and the simulated mean of the rewrites' rounds, each priced at the run's own median
verification and draft forward. Printed beside it: the same with the profiled run's own count of rounds, and what
the run measured, with and without the CUDA graphs its rounds captured. Where the profile has another batch size,
the first forwards are estimated: the tokens the run's pattern makes them read, at the profile's own seconds per
token (an upper bound where the calls are larger: longer prefills run nearer the card's peak).

With `--run`, also the same run if its rows were not in lock-step (`rsd.continuous`, the continuous schedule,
modelled). Each iteration runs k draft forwards for every row, drafting its own step or proposing
for its rewrite, so the draft's forwards serve both; a PRM call over the rows whose draft step just ended (one row
at `--prm-floor-ms`, each further row at this run's own price per row); the first forwards of the rewrites it
rejected; one verification over every row rewriting, whatever step it is at. Priced at the run's forwards (the
draft's at the larger of the rounds' median and its own calls' time per token), with the best fixed k; no host
time, captures or the draft's reading of a rewritten step. At one row it runs the forwards lock-step does.

    python benchmarks/speculation_ceiling.py --prices 0.18 0.10 --batches 1 16 64
    python benchmarks/speculation_ceiling.py --run benchmarks/results/h100-5553bb0-gpu-speed-14b-batch16.json \
        --phases benchmarks/results/h100-5553bb0-phases-14b-speculative.json --batches 16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsd.speculative import MAX_K, tokens_per_round


def uninterrupted(acceptance: float, price: float) -> tuple[int, float]:
    """(best k, tokens per target-forward's worth of time) for a run that never ends."""
    rate = {k: tokens_per_round(acceptance, k) / (1 + price * k) for k in range(1, MAX_K + 1)}
    best = max(rate, key=rate.__getitem__)
    return best, rate[best]


def kept_run(rng: random.Random, acceptance: float, limit: int) -> int:
    """Proposed tokens kept before the first refused one, at most `limit`."""
    kept = 0
    while kept < limit and rng.random() < acceptance:
        kept += 1
    return kept


def lockstep_rounds(rng: random.Random, rows: int, acceptance: float, k: int, step_tokens: int) -> int:
    """Rounds until every one of `rows` rewrites has written its `step_tokens` tokens, after the forward that reads
    the rejected step (which keeps a prefix of it and adds the target's own token)."""
    left = [step_tokens - kept_run(rng, acceptance, step_tokens - 1) - 1 for _ in range(rows)]
    rounds = 0
    while any(n > 0 for n in left):
        rounds += 1
        left = [n - kept_run(rng, acceptance, min(k, n - 1)) - 1 if n > 0 else n for n in left]
    return rounds


def run_rounds(rng: random.Random, acceptance: float, k: int, tokens: int) -> int:
    """Rounds of k proposals an uninterrupted run takes to write `tokens` tokens."""
    rounds = written = 0
    while written < tokens:
        rounds += 1
        written += kept_run(rng, acceptance, min(k, max(0, tokens - written - 1))) + 1
    return rounds


def rewrite_speedup(
    acceptance: float, price: float, batch: int, keep_share: float, step_tokens: int, draws: int, seed: int
) -> tuple[int, float]:
    """(best k, speed-up of a rewrite's rounds over plain rewrites' step_tokens - 1 decode forwards), the rows of a
    round those rejected among `batch` (rounds with none rejected cost nothing and are skipped)."""
    best = (1, 0.0)
    for k in range(1, MAX_K + 1):
        rng = random.Random(seed)
        rounds = []
        while len(rounds) < draws:
            rows = sum(rng.random() >= keep_share for _ in range(batch))
            if rows:
                rounds.append(lockstep_rounds(rng, rows, acceptance, k, step_tokens))
        speedup = (step_tokens - 1) / (statistics.mean(rounds) * (1 + price * k))
        best = max(best, (k, speedup), key=lambda pair: pair[1])
    return best


FIRST_FORWARDS = "target/forward in the arena"  # in a speculative profile: each rewrite's first forward
ROUNDS = "target/rewrite: verification forward"
PHASES_KEY = "phases [seconds, host seconds, calls]"
# A one-row PRM call at batch 1 (h100-2a97f74-gpu-speed-14b-batch1.json: 8 calls in 0.042 s, the first of them a
# prompt's prefill): what a call of the few rows whose step just ended costs where rows are not in lock-step.
PRM_FLOOR_MS = 4.4
CONTINUOUS_DRAWS = 100  # runs of draws per k for rows not in lock-step (each a whole run of every row)


def batch_result(report: dict[str, Any], batch: int, source: str) -> dict[str, Any]:
    for result in report["results"]:
        if result["batch"] == batch:
            return result
    found = ", ".join(str(result["batch"]) for result in report["results"])
    raise SystemExit(f"{source} has no batch {batch} (it has {found}); pick one of those with --batches")


def pattern_keeps(problem: int, step: int, config: dict[str, Any]) -> bool:
    """Whether a `gpu_speed.py` run's fixed pattern keeps problem `problem`'s step `step`."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # run as a script its folder is there; imported (the tests) it may not be
        sys.path.insert(0, here)
    import gpu_speed

    return gpu_speed.pattern_keeps(problem, step, config["steps"], config["keep_share"])


def pattern_calls(batch: int, config: dict[str, Any]) -> list[int]:
    """The rows of each rewrite call of a `gpu_speed.py` run at `batch`: per step, those its fixed pattern rejects."""
    rows = [sum(not pattern_keeps(p, step, config) for p in range(batch)) for step in range(config["steps"])]
    return [n for n in rows if n]


def first_forward_tokens(batch: int, config: dict[str, Any]) -> int:
    """The tokens the rewrites' first forwards of a `gpu_speed.py` run at `batch` read (`rows_first_tokens`)."""
    return sum(sum(row) for row in rows_first_tokens(batch, config))


def first_forwards(phases: dict[str, Any], batch: int, config: dict[str, Any]) -> tuple[float, int | None]:
    """The seconds of the rewrites' first forwards at `batch`, from a speculative phase profile: its own where it
    profiled that batch (and None), else estimated at the seconds per token of its nearest batch (and that one),
    whose tokens are counted with the run's prompt and step lengths (the profile records none: both scripts share
    them)."""
    profiled = {result["batch"]: result[PHASES_KEY] for result in phases["results"]}
    if batch in profiled:
        return profiled[batch][FIRST_FORWARDS][0], None
    source = min(profiled, key=lambda other: abs(other - batch))
    rate = profiled[source][FIRST_FORWARDS][0] / first_forward_tokens(source, config)
    return rate * first_forward_tokens(batch, config), source


def run_rounds_mean(calls: list[int], acceptance: float, k: int, step_tokens: int, draws: int, seed: int) -> float:
    """The mean rounds, over `draws` runs of acceptance draws, that the rewrite calls of `calls` rows each take."""
    rng = random.Random(seed)
    runs = [sum(lockstep_rounds(rng, rows, acceptance, k, step_tokens) for rows in calls) for _ in range(draws)]
    return statistics.mean(runs)


def rsd_best_time(
    run: dict[str, Any], batch: int, phases: dict[str, Any] | None, draws: int, seed: int, draft_time: float = 1.0
) -> dict[str, float]:
    """RSD's best time with speculative rewrites at `batch`, priced from a `gpu_speed.py` report (`run`) and a
    `phase_profile.py --rewrite speculative` report (`phases`, for the first forwards and the rounds a run took):
    the rewrite calls its pattern makes, their rounds simulated at the best fixed k. `draft_time` scales every
    draft forward's time (its own calls' and its proposals'): what a faster draft forward would give."""
    config, result = run["config"], batch_result(run, batch, "--run")
    rsd = result["methods"].get("rsd")
    if rsd is None or not rsd.get("forward_ms"):
        raise SystemExit(
            f"--run has no timed forwards of RSD with speculative rewrites at batch {batch}: give a GPU run of "
            "gpu_speed.py with the rsd method"
        )
    verification, draft = rsd["forward_ms"]["target"] / 1e3, draft_time * rsd["forward_ms"]["draft"] / 1e3
    calls = pattern_calls(batch, config)
    acceptance, step_tokens = config["token_acceptance"], config["step_tokens"]
    k, rounds = min(
        ((k, run_rounds_mean(calls, acceptance, k, step_tokens, draws, seed)) for k in range(1, MAX_K + 1)),
        key=lambda pair: pair[1] * (verification + pair[0] * draft),
    )
    round_seconds = verification + k * draft
    parts = {
        "draft and PRM": draft_time * rsd["split_s"]["draft"] + rsd["split_s"]["prm"],
        "first forwards": 0.0,
        "rounds": rounds * round_seconds,
    }
    figures: dict[str, float] = {}
    if phases is not None:
        parts["first forwards"], source = first_forwards(phases, batch, config)
        figures["first forward tokens"] = first_forward_tokens(batch, config)
        if source is None:
            figures["profiled rounds"] = batch_result(phases, batch, "--phases")[PHASES_KEY][ROUNDS][2]
        else:
            figures["first forwards estimated from batch"] = source
    uncaptured = [
        seconds - sum(graphs.get("capture_s", 0.0) for graphs in captured.values())
        for seconds, captured in zip(rsd["seconds_all"], rsd.get("graphs") or [], strict=False)
    ]
    best = sum(parts.values())
    figures.update(parts)
    figures.update({
        "k": k,
        "price": draft / verification,
        "draft time": draft_time,
        "calls": len(calls),
        "simulated rounds": rounds,
        "best": best,
        "target only": result["seconds"]["target_only"],
        "measured": result["seconds"]["rsd"],
        "measured without captures": statistics.median(uncaptured) if uncaptured else float("nan"),
    })  # fmt: skip
    if "profiled rounds" in figures:
        figures["best at the profiled rounds"] = best - parts["rounds"] + figures["profiled rounds"] * round_seconds
    return figures


@dataclass
class Prices:
    """What a continuous schedule's forwards cost, in seconds, from a run's own measurements."""

    draft: float  # a draft forward (proposals and step tokens alike)
    verification: float  # a target verification forward
    first_forward_token: float  # a token of a rewrite's first forward (compute-bound: priced per token)
    prm_floor: float  # a PRM call of one row
    prm_row: float  # each further row of a PRM call


@dataclass
class Lane:
    """One problem under a continuous schedule: where it is and what is left of its current phase."""

    problem: int
    step: int = 0
    drafting: int = 0  # step tokens the draft has still to write
    rewriting: int = 0  # tokens the target has still to write of a rejected step
    waiting: bool = False  # its draft step is written and waits for the PRM

    def next_step(self, step_tokens: int, steps: int) -> None:
        """The step is done: the draft writes the next one, if any."""
        self.step += 1
        self.drafting = step_tokens if self.step < steps else 0

    def rewrite(self, left: int, step_tokens: int, steps: int) -> None:
        """`left` tokens of the rewrite remain to write; at none, the step is done."""
        self.rewriting = max(0, left)
        if self.rewriting == 0:
            self.next_step(step_tokens, steps)


def continuous_run(
    rng: random.Random, batch: int, config: dict[str, Any], prices: Prices, k: int, first_tokens: list[list[int]]
) -> float:
    """Seconds of one run whose rows are not in lock-step: each iteration runs k draft forwards for every row that
    drafts its step or proposes for its rewrite, a PRM call over the rows whose draft step just ended, the first
    forwards of the rewrites those rejected (`first_tokens[problem][step]` tokens each) and one verification over
    every row rewriting. The pattern decides as in the run; the acceptance draws are `rng`'s."""
    acceptance, step_tokens, steps = config["token_acceptance"], config["step_tokens"], config["steps"]
    lanes = [Lane(problem, drafting=step_tokens) for problem in range(batch)]
    seconds = 0.0
    while lanes:
        seconds += k * prices.draft
        proposing = [lane for lane in lanes if lane.rewriting > 0]
        for lane in lanes:
            if lane.drafting > 0:
                lane.drafting = max(0, lane.drafting - k)
                lane.waiting = lane.drafting == 0
        scored = [lane for lane in lanes if lane.waiting]
        if scored:
            seconds += prices.prm_floor + (len(scored) - 1) * prices.prm_row
        for lane in scored:
            lane.waiting = False
            if pattern_keeps(lane.problem, lane.step, config):
                lane.next_step(step_tokens, steps)
            else:  # the first forward reads the rejected step: a prefix of it stays, and the target's own token
                seconds += first_tokens[lane.problem][lane.step] * prices.first_forward_token
                lane.rewrite(step_tokens - kept_run(rng, acceptance, step_tokens - 1) - 1, step_tokens, steps)
        if proposing:
            seconds += prices.verification
        for lane in proposing:
            lane.rewrite(lane.rewriting - kept_run(rng, acceptance, min(k, lane.rewriting - 1)) - 1, step_tokens, steps)
        lanes = [lane for lane in lanes if lane.drafting or lane.rewriting or lane.waiting]
    return seconds


def rows_first_tokens(batch: int, config: dict[str, Any]) -> list[list[int]]:
    """Per problem and step of a `gpu_speed.py` run at `batch`, the tokens of the first forward of that step's rewrite
    (0 where the step is kept): what the target has not seen of its row (the prompt the first time; then the last
    token of its own step before, and the steps the draft wrote since) and the rejected step (all but its last
    token: a proposal leaves room for the target's own)."""
    prompt, step_tokens = config["prompt_tokens"], config["step_tokens"]
    table = []
    for problem in range(batch):
        row, last_written = [], None
        for step in range(config["steps"]):
            if pattern_keeps(problem, step, config):
                row.append(0)
                continue
            if last_written is None:
                unseen = prompt + step * step_tokens
            else:
                unseen = 1 + (step - 1 - last_written) * step_tokens
            row.append(unseen + step_tokens - 1)
            last_written = step
        table.append(row)
    return table


def continuous_best_time(
    run: dict[str, Any], batch: int, figures: dict[str, float], draws: int, seed: int, prm_floor: float
) -> dict[str, float]:
    """The best time of the same run if its rows were not in lock-step (`continuous_run`, the best fixed k, the mean
    over `draws` runs of draws), priced at the run's own forwards: the rounds' draft forward or the draft calls'
    time per token, the larger; the rounds' verification; the first forwards at `figures`' seconds per token; a PRM
    call at `prm_floor` seconds for one row and this run's per-row price for each further row."""
    config, result = run["config"], batch_result(run, batch, "--run")
    rsd = result["methods"]["rsd"]
    steps, step_tokens = config["steps"], config["step_tokens"]
    per_token_draft = rsd["split_s"]["draft"] / (steps * step_tokens)
    prm_call = rsd["split_s"]["prm"] / steps
    prices = Prices(
        draft=figures["draft time"] * max(rsd["forward_ms"]["draft"] / 1e3, per_token_draft),
        verification=rsd["forward_ms"]["target"] / 1e3,
        first_forward_token=figures["first forwards"] / max(1, figures.get("first forward tokens", 0)),
        prm_floor=prm_floor,
        prm_row=max(0.0, prm_call - prm_floor) / max(1, batch - 1),
    )
    first_tokens = rows_first_tokens(batch, config)

    def mean_time(k: int) -> float:
        rng = random.Random(seed)
        return statistics.mean(continuous_run(rng, batch, config, prices, k, first_tokens) for _ in range(draws))

    k, best = min(((k, mean_time(k)) for k in range(1, MAX_K + 1)), key=lambda pair: pair[1])
    return {"continuous k": k, "continuous best": best, "prm floor": prm_floor, "prm row": prices.prm_row}


def first_forwards_note(figures: dict[str, float]) -> str:
    if "first forward tokens" not in figures:
        return " (no --phases: left out)"
    tokens = f"{figures['first forward tokens']:,.0f} tokens"
    if "first forwards estimated from batch" in figures:
        source = figures["first forwards estimated from batch"]
        return f" ({tokens}, estimated at the profile's seconds per token at batch {source:.0f})"
    return f" ({tokens}, profiled)"


def best_time_lines(figures: dict[str, float], batch: int) -> list[str]:
    base = figures["target only"]

    def against(seconds: float) -> str:
        return f"{seconds:.2f} s ({base / seconds:.2f}x target-only)"

    prices = "this run's prices"
    if figures["draft time"] != 1.0:
        prices += f", the draft's forwards at {figures['draft time']:.2f} of their time"
    lines = [
        f"batch {batch}: RSD with speculative rewrites at {prices} (draft price {figures['price']:.3f}, "
        f"k = {figures['k']:.0f}); target-only {base:.2f} s",
        f"  draft and PRM calls       {figures['draft and PRM']:.2f} s",
        f"  first forwards            {figures['first forwards']:.2f} s" + first_forwards_note(figures),
        f"  rounds                    {figures['rounds']:.2f} s ({figures['simulated rounds']:.0f} simulated over "
        f"{figures['calls']:.0f} calls)",
        f"  best                      {against(figures['best'])}",
    ]
    if "profiled rounds" in figures:
        lines.append(
            f"  best, profiled rounds     {against(figures['best at the profiled rounds'])} "
            f"({figures['profiled rounds']:.0f} rounds)"
        )
    lines.append(
        f"  measured                  {against(figures['measured'])}; without captures "
        f"{against(figures['measured without captures'])}"
    )
    if "continuous best" in figures:
        lines.append(
            f"  rows not in lock-step     {against(figures['continuous best'])} (k = {figures['continuous k']:.0f}; "
            f"a PRM call {1e3 * figures['prm floor']:.1f} ms + {1e3 * figures['prm row']:.2f} ms a further row)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acceptance", type=float, default=0.8, help="token acceptance (default 0.8)")
    parser.add_argument("--prices", type=float, nargs="+", default=[0.18, 0.10], help="draft forward / target's")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--keep-share", type=float, default=0.7, help="share of draft steps kept (default 0.7)")
    parser.add_argument("--step-tokens", type=int, default=64, help="tokens of a step (default 64)")
    parser.add_argument("--draws", type=int, default=2000, help="simulated rewrite rounds per k (default 2000)")
    parser.add_argument("--run-tokens", type=int, default=512, help="an uninterrupted run's tokens (default 512)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run", type=Path, help="a gpu_speed.py result: RSD's best time at its prices, per batch")
    parser.add_argument("--phases", type=Path, help="with --run: a phase_profile.py --rewrite speculative result")
    parser.add_argument(
        "--draft-time",
        type=float,
        default=1.0,
        help="with --run: every draft forward at this share of the time the run measured (a faster draft)",
    )
    parser.add_argument(
        "--prm-floor-ms",
        type=float,
        default=PRM_FLOOR_MS,
        help=f"with --run: a PRM call of one row, for rows not in lock-step (default {PRM_FLOOR_MS})",
    )
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error("--draws is at least 1")
    if args.draft_time <= 0:
        parser.error("--draft-time is a share of the measured time, above 0")
    if args.prm_floor_ms < 0:
        parser.error("--prm-floor-ms is at least 0")
    if args.run is not None:
        run = read_report(parser, args.run)
        phases = read_report(parser, args.phases) if args.phases is not None else None
        for batch in args.batches:
            figures = rsd_best_time(run, batch, phases, args.draws, args.seed, args.draft_time)
            draws = min(args.draws, CONTINUOUS_DRAWS)
            figures.update(continuous_best_time(run, batch, figures, draws, args.seed, args.prm_floor_ms / 1e3))
            print("\n".join(best_time_lines(figures, batch)))
        return
    if args.phases is not None or args.draft_time != 1.0 or args.prm_floor_ms != PRM_FLOOR_MS:
        parser.error("--phases, --draft-time and --prm-floor-ms go with --run")
    if not 0.0 <= args.acceptance <= 1.0 or not 0.0 <= args.keep_share < 1.0:
        parser.error("--acceptance is in [0, 1] and --keep-share in [0, 1)")
    if any(price < 0 for price in args.prices) or args.step_tokens < 2:
        parser.error("prices are at least 0 and --step-tokens at least 2")
    print(f"token acceptance {args.acceptance}, steps of {args.step_tokens} tokens, {args.keep_share:.0%} kept")
    batches = " | ".join(f"rewrites at batch {batch}: k, speed-up" for batch in args.batches)
    print(f"| draft price | uninterrupted: k, speed-up | {batches} |")
    print("| ---: | ---: |" + " ---: |" * len(args.batches))
    for price in args.prices:
        k, rate = uninterrupted(args.acceptance, price)
        cells = [
            "{}, {:.2f}x".format(
                *rewrite_speedup(
                    args.acceptance, price, batch, args.keep_share, args.step_tokens, args.draws, args.seed
                )
            )  # fmt: skip
            for batch in args.batches
        ]
        print(f"| {price:.2f} | {k}, {rate:.2f}x | " + " | ".join(cells) + " |")
    for price in args.prices:  # how much one run's round count moves with its draws alone
        k = uninterrupted(args.acceptance, price)[0]
        rng = random.Random(args.seed)
        rounds = [run_rounds(rng, args.acceptance, k, args.run_tokens) for _ in range(args.draws)]
        mean, spread = statistics.mean(rounds), statistics.pstdev(rounds)
        print(
            f"price {price:.2f}: a {args.run_tokens}-token run at k = {k} takes {mean:.0f} +- {spread:.0f} rounds "
            f"({spread / mean:.1%}, one standard deviation over {args.draws} draws)"
        )


def read_report(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"{path}: {exc}")
        raise  # parser.error exits


if __name__ == "__main__":
    main()
