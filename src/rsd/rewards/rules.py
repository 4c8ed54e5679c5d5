"""Any Python callable `(question, steps) -> float` as the reward model: rule-based checkers, remote judges."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from numbers import Real

from rsd.core import ModelCost, RewardOutput, RewardRequest, RSDError

RewardFunction = Callable[[str, list[str]], float]

# Float round-off past the ends of [0, 1] (a 1.0000000002 from a product of probabilities) is clipped; anything
# further out is refused: a reward of 3 or -0.5 means the function returns something else (a logit, a score out
# of 10), and clipping it would make the acceptance rule quietly keep or reject every step.
ROUNDOFF = 1e-6


class CallableReward:
    """A reward model from a plain function of the raw question and the steps so far (no trailing delimiters).

    The reward is for the last step. It must be a real number (bools count as 0 and 1) in [0, 1]; values outside
    by more than float round-off raise RSDError. The function costs no model FLOPs.
    """

    def __init__(self, fn: RewardFunction, name: str | None = None):
        if not callable(fn):
            raise RSDError(f"the reward function {fn!r} is not callable; pass a function (question, steps) -> float.")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.cost = ModelCost(parameters=0)

    def score_steps(self, requests: Sequence[RewardRequest]) -> list[RewardOutput]:
        return [RewardOutput(reward=self.score_one(r.question, list(r.steps))) for r in requests]

    def score_one(self, question: str, steps: list[str]) -> float:
        return self.check_reward(self.fn(question, steps))

    def check_reward(self, value: object) -> float:
        # numpy and torch scalars are not always `Real`, but they convert with float() through __float__.
        if not isinstance(value, Real) and not (hasattr(value, "__float__") and getattr(value, "ndim", 0) == 0):
            raise RSDError(
                f"the reward function {self.name} returned {value!r}, not a number; it must return a float in [0, 1]."
            )
        reward = float(value)
        if math.isnan(reward) or not -ROUNDOFF <= reward <= 1 + ROUNDOFF:
            raise RSDError(
                f"the reward function {self.name} returned {reward}, outside [0, 1]; "
                "rescale it (a logit through a sigmoid, a score s of 10 as s / 10)."
            )
        return min(1.0, max(0.0, reward))

    def release(self, keys: Sequence[Hashable]) -> None:
        """Nothing is cached."""
