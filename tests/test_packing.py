"""Splitting a prefill into forwards of similar tail lengths: the split is the cheapest one, and its price is
read from the model size, the device and the override variable."""

from __future__ import annotations

import itertools
import random

import pytest

from rsd.backends.packing import FORWARD_TOKENS_ENV, forward_cost_tokens, group_by_length
from rsd.core import RSDError


def cost(lengths: list[int], groups: list[list[int]], forward_tokens: int, overlapped: bool = False) -> int:
    padded = [len(group) * max(lengths[i] for i in group) for group in groups]
    return sum(max(forward_tokens, p) if overlapped else forward_tokens + p for p in padded)


def partitions(items: list[int]):
    """Every way to split `items` into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for tail in partitions(rest):
        yield [[first], *tail]
        for k in range(len(tail)):
            yield [*tail[:k], [first, *tail[k]], *tail[k + 1 :]]


@pytest.mark.parametrize("overlapped", [False, True], ids=["host-then-device", "overlapped"])
@pytest.mark.parametrize("seed", range(40))
def test_the_split_is_the_cheapest_of_all_partitions(seed, overlapped):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 64, 65, 200, 256, 700]) for _ in range(rng.randint(1, 7))]
    forward_tokens = rng.choice([1, 50, 300, 5000])
    max_rows = rng.choice([0, 2, 3])
    groups = group_by_length(lengths, forward_tokens, max_rows, overlapped)
    assert sorted(itertools.chain(*groups)) == list(range(len(lengths)))  # every row once
    assert all(group == sorted(group) for group in groups)
    assert not max_rows or all(len(group) <= max_rows for group in groups)
    allowed = [p for p in partitions(list(range(len(lengths)))) if not max_rows or max(map(len, p)) <= max_rows]
    best = min(cost(lengths, p, forward_tokens, overlapped) for p in allowed)
    assert cost(lengths, groups, forward_tokens, overlapped) == best


def test_on_a_gpu_the_prm_splits_at_batch_64_and_the_draft_does_not():
    # The measured case (docs/benchmarks.md, --prefill-scale): splitting paid for the PRM and not for the draft.
    prm_price, draft_price = forward_cost_tokens(1_300_000_000, "cuda"), forward_cost_tokens(1_500_000_000, "cuda")
    prm_tails, draft_tails = [65] * 45 + [130] * 19, [1] * 45 + [65] * 19
    assert len(group_by_length(prm_tails, prm_price, 64, overlapped=True)) == 2
    assert len(group_by_length(draft_tails, draft_price, overlapped=True)) == 1
    # Paid as host work plus compute, neither would split.
    assert len(group_by_length(prm_tails, prm_price, 64)) == len(group_by_length(draft_tails, draft_price)) == 1


def test_rsd_shaped_tails_split_in_two_and_equal_tails_never_split():
    # The target's call at batch 8: four rows it wrote last round (one token), four with the whole trajectory.
    tails = [1, 449, 1, 1, 385, 449, 1, 449]
    groups = group_by_length(tails, forward_tokens=770)
    assert groups == [[0, 2, 3, 6], [1, 4, 5, 7]]
    assert group_by_length([64] * 16, forward_tokens=1) == [list(range(16))]
    assert group_by_length([5, 500], forward_tokens=10**9) == [[0, 1]]
    assert group_by_length([], forward_tokens=1) == []


def test_the_price_of_a_forward_follows_model_size_and_device(monkeypatch):
    monkeypatch.delenv(FORWARD_TOKENS_ENV, raising=False)
    target, draft = forward_cost_tokens(6_500_000_000, "cuda:0"), forward_cost_tokens(1_500_000_000, "cuda")
    assert 500 < target < draft  # a small model's forward is worth more of its tokens
    assert forward_cost_tokens(1_000_000, "cpu") > forward_cost_tokens(100_000_000, "cpu")
    assert forward_cost_tokens(70_000_000_000, "cpu") == 64  # the floor
    monkeypatch.setenv(FORWARD_TOKENS_ENV, "5")
    assert forward_cost_tokens(1_000_000, "cpu") == 5
    monkeypatch.setenv(FORWARD_TOKENS_ENV, "many")
    with pytest.raises(RSDError, match=FORWARD_TOKENS_ENV):
        forward_cost_tokens(1_000_000, "cpu")
