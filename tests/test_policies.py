"""The five weighting functions of the paper, and the keep rate of the soft ones."""

import math
import random

import pytest

from rsd.core import RSDError
from rsd.policies import Clip, Constant, Logistic, Sigmoid, Threshold, make_policy


@pytest.mark.parametrize(
    ("policy", "reward", "expected"),
    [
        (Threshold(0.7), 0.7, 1.0),
        (Threshold(0.7), 0.6999, 0.0),
        (Threshold(0.0), 0.0, 1.0),
        (Threshold(1.01), 1.0, 0.0),
        (Constant(0.3), 0.9, 0.3),
        (Clip(), -0.2, 0.0),
        (Clip(), 0.42, 0.42),
        (Clip(), 1.3, 1.0),
        (Sigmoid(), 1.0, 0.5),
        (Sigmoid(), 0.25, 0.2),
        (Logistic(0.7, 10.0), 0.7, 0.5),
        (Logistic(0.5, 4.0), 0.0, 1 / (1 + math.exp(2.0))),
    ],
)
def test_weights_follow_the_paper(policy, reward, expected):
    assert policy.weight(reward) == pytest.approx(expected)


def test_logistic_is_monotone_and_survives_extreme_slopes():
    policy = Logistic(0.7, 1e6)
    assert policy.weight(0.0) == 0.0
    assert policy.weight(1.0) == 1.0
    weights = [Logistic(0.7, 8.0).weight(r / 10) for r in range(11)]
    assert weights == sorted(weights)


def test_threshold_keeps_exactly_by_reward():
    rng = random.Random(0)
    policy = Threshold(0.7)
    assert [policy.keep(r, rng) for r in (0.1, 0.69, 0.7, 0.95)] == [False, False, True, True]


@pytest.mark.parametrize("policy", [Constant(0.3), Clip(), Sigmoid(), Logistic(0.6, 5.0)])
def test_soft_keep_rate_matches_expected_weight(policy):
    rewards_rng = random.Random(1)
    rewards = [rewards_rng.random() for _ in range(40_000)]
    draws = random.Random(2)
    kept = sum(policy.keep(r, draws) for r in rewards)
    expected = sum(policy.weight(r) for r in rewards)
    # Binomial standard deviation is at most sqrt(n)/2 = 100; allow 4 sigma.
    assert abs(kept - expected) < 400, (kept, expected)


def test_soft_decisions_are_reproducible_from_the_seed():
    policy = Clip()
    first = [policy.keep(0.5, random.Random(f"7|{i}")) for i in range(200)]
    again = [policy.keep(0.5, random.Random(f"7|{i}")) for i in range(200)]
    other = [policy.keep(0.5, random.Random(f"8|{i}")) for i in range(200)]
    assert first == again
    assert first != other


def test_make_policy_checks_its_arguments():
    assert make_policy("threshold", delta=0.3) == Threshold(0.3)
    assert make_policy("logistic", delta=0.5, alpha=3.0) == Logistic(0.5, 3.0)
    with pytest.raises(RSDError, match="choose one of"):
        make_policy("greedy")
    with pytest.raises(RSDError, match="--p"):
        make_policy("constant", p=1.5)
    with pytest.raises(RSDError, match="--alpha"):
        make_policy("logistic", alpha=0)
