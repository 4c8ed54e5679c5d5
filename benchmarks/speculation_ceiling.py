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

    python benchmarks/speculation_ceiling.py --prices 0.18 0.10 --batches 1 16 64
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Sequence

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
    args = parser.parse_args(argv)
    if not 0.0 <= args.acceptance <= 1.0 or not 0.0 <= args.keep_share < 1.0:
        parser.error("--acceptance is in [0, 1] and --keep-share in [0, 1)")
    if any(price < 0 for price in args.prices) or args.step_tokens < 2 or args.draws < 1:
        parser.error("prices are at least 0, --step-tokens at least 2, --draws at least 1")
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


if __name__ == "__main__":
    main()
