"""Which rows of a prefill run together: one padded forward per group of similar tail lengths.

A batched prefill pads every row's tail to the longest one. In RSD the tails differ a lot: a rejected row hands the
target every draft step it has not read yet (up to the whole trajectory), a row it wrote last round hands it one
token. Padding all of them to the longest tail made the target's time inside RSD 6.25 s where the split takes
4.85 s, at batch 64 on an H200 (`benchmarks/gpu_speed.py --prefill ab`, docs/benchmarks.md). Splitting the rows into
a few forwards of similar lengths saves that compute, at the price of one more forward each: on a GPU, a
transformers forward costs its Python and kernel launches however few tokens it runs; on a CPU, its per-call
overhead.

The split minimises padded tokens plus a per-forward price in tokens (`forward_cost_tokens`). Sorted by length,
the best groups are contiguous runs, so a small dynamic programme finds them exactly.
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


def group_by_length(lengths: Sequence[int], forward_tokens: int, max_rows: int = 0) -> list[list[int]]:
    """Indices into `lengths` split into groups, each one padded forward, that minimise
    sum(rows x longest tail) + forward_tokens x groups, with at most `max_rows` rows a group (0: no cap).
    Groups come shortest first; indices inside a group keep their order."""
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
            cost = best[i] + forward_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return groups[::-1]
