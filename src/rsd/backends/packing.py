"""Which rows of a prefill run together: one padded forward per group of similar tail lengths.

A batched prefill pads every row's tail to the longest one. In RSD the tails differ a lot: a rejected row hands the
target every draft step it has not read yet (up to the whole trajectory), a row it wrote last round hands it one
token. Padding all of them to the longest tail made the target's time inside RSD 6.25 s where the split takes
4.85 s, at batch 64 on an H200 (`benchmarks/gpu_speed.py --prefill ab`, docs/benchmarks.md). Splitting the rows into
a few forwards of similar lengths saves that compute, at the price of one more forward each: on a GPU, a
transformers forward costs its Python and kernel launches however few tokens it runs; on a CPU, its per-call
overhead.

The split minimises the forwards' cost in tokens, with a per-forward price in tokens (`forward_cost_tokens`) for
the host's work. On a CPU the host computes too, so a forward costs its price plus its padded tokens. On a GPU the
host issues the next forward while the device runs the last one, so a forward costs the larger of the two: a
split pays off for forwards long enough to hide the host's work. At batch 64 on an H200 that is what the PRM
gains from splitting (its rows of about 65 and 130 new tokens: 0.80 s against 0.72 s with a quarter of the
price) and the draft loses (1 and 65: 2.60 s against 2.70 s), `benchmarks/gpu_speed.py --prefill-scale 0.25`.
Sorted by length, the best groups are contiguous runs, so a small dynamic programme finds them exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from rsd.core import RSDError

FORWARD_TOKENS_ENV = "RSD_PREFILL_FORWARD_TOKENS"  # overrides the per-forward price (1 splits at every length)
# Rough host cost of one eager transformers forward, and the rate matrix products reach, per device kind. Only
# their ratio to a model's FLOPs per token matters: it says how many tokens one more forward is worth.
FORWARD_SECONDS = {"cuda": 0.02, "cpu": 0.005}
ACHIEVED_FLOPS = {"cuda": 5e14, "cpu": 1e11}
MIN_FORWARD_TOKENS = 64


def launches_overlap(device: str) -> bool:
    """Whether the host issues a forward while the device still runs the one before (CUDA's queue)."""
    return device.startswith("cuda")


def forward_cost_tokens(parameters: int, device: str) -> int:
    """How many tokens of compute one more forward costs this model: padding below that is cheaper than a split.
    The variable `RSD_PREFILL_FORWARD_TOKENS` replaces the estimate (a very large value never splits)."""
    forced = os.environ.get(FORWARD_TOKENS_ENV, "")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise RSDError(f"{FORWARD_TOKENS_ENV}={forced!r} is not a positive number of tokens; fix or unset it.")
        return int(forced)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    flops_per_token = 2.0 * max(parameters, 1)
    return max(MIN_FORWARD_TOKENS, round(FORWARD_SECONDS[kind] * ACHIEVED_FLOPS[kind] / flops_per_token))


def group_by_length(
    lengths: Sequence[int], forward_tokens: int, max_rows: int = 0, overlapped: bool = False
) -> list[list[int]]:
    """Indices into `lengths` split into groups, each one padded forward, that minimise the sum over groups of
    forward_tokens + rows x longest tail, or with `overlapped` (a GPU: the host's work hides behind the device's)
    max(forward_tokens, rows x longest tail); at most `max_rows` rows a group (0: no cap). Groups come shortest
    first; indices inside a group keep their order."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    best = [0.0] + [math.inf] * n  # best[j]: cheapest split of the j shortest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        first = max(0, j - max_rows) if max_rows else 0
        for i in range(first, j):
            padded = (j - i) * longest
            cost = best[i] + (max(forward_tokens, padded) if overlapped else forward_tokens + padded)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return groups[::-1]
