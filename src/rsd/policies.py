"""Weighting functions omega(r): the probability of keeping a draft step whose PRM reward is r.

The paper's family (Liao et al. 2025, section 3). The binary threshold is the optimal one and the default;
the soft ones keep a step with probability w, drawn from a seeded generator so runs are reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from rsd.core import RSDError

DEFAULT_DELTA = 0.7


@dataclass(frozen=True)
class Policy:
    """Base class: `weight(r)` is omega(r); `keep` draws the decision."""

    name = "policy"

    def weight(self, reward: float) -> float:
        raise NotImplementedError

    @property
    def is_deterministic(self) -> bool:
        return False

    def keep(self, reward: float, rng: random.Random) -> bool:
        w = self.weight(reward)
        if w >= 1.0:
            return True
        if w <= 0.0:
            return False
        return rng.random() < w


@dataclass(frozen=True)
class Threshold(Policy):
    """1[r >= delta]: keep exactly the steps the PRM rates at least delta. delta 0 keeps all, delta > 1 none."""

    delta: float = DEFAULT_DELTA
    name = "threshold"

    def weight(self, reward: float) -> float:
        return 1.0 if reward >= self.delta else 0.0

    @property
    def is_deterministic(self) -> bool:
        return True


@dataclass(frozen=True)
class Constant(Policy):
    """p, whatever the reward: a reward-blind mixture of draft and target steps (an ablation)."""

    p: float = 0.5
    name = "constant"

    def weight(self, reward: float) -> float:
        return self.p


@dataclass(frozen=True)
class Clip(Policy):
    """min(1, max(0, r)): keep a step with probability equal to its reward."""

    name = "clip"

    def weight(self, reward: float) -> float:
        return min(1.0, max(0.0, reward))


@dataclass(frozen=True)
class Sigmoid(Policy):
    """r / (1 + r): the paper's 'sigmoidal' weighting, at most 1/2 for rewards in [0, 1]."""

    name = "sigmoid"

    def weight(self, reward: float) -> float:
        return reward / (1.0 + reward)


@dataclass(frozen=True)
class Logistic(Policy):
    """1 / (1 + exp(-alpha (r - delta))): a soft threshold around delta, sharper as alpha grows."""

    delta: float = DEFAULT_DELTA
    alpha: float = 10.0
    name = "logistic"

    def weight(self, reward: float) -> float:
        z = -self.alpha * (reward - self.delta)
        if z > 700:  # exp would overflow; the weight is 0 to double precision
            return 0.0
        return 1.0 / (1.0 + math.exp(z))


POLICY_NAMES = ("threshold", "constant", "clip", "sigmoid", "logistic")


def make_policy(name: str = "threshold", delta: float = DEFAULT_DELTA, alpha: float = 10.0, p: float = 0.5) -> Policy:
    """The weighting function named on the command line, with its parameters checked."""
    if name == "threshold":
        return Threshold(delta)
    if name == "constant":
        if not 0.0 <= p <= 1.0:
            raise RSDError(f"--p {p}: a keep probability must lie in [0, 1].")
        return Constant(p)
    if name == "clip":
        return Clip()
    if name == "sigmoid":
        return Sigmoid()
    if name == "logistic":
        if alpha <= 0:
            raise RSDError(f"--alpha {alpha}: the logistic slope must be positive.")
        return Logistic(delta, alpha)
    raise RSDError(f"unknown --policy {name!r}; choose one of {', '.join(POLICY_NAMES)}.")
