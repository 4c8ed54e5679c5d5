"""The threshold delta for a chosen target share: "give me delta for a 30% target share".

RSD's cost follows the share of steps the target writes, and that share depends on how the PRM scores this draft
on these problems, so no fixed delta gives it. Two stages find it:

1. A keep-all pass (delta 0: every draft step kept and scored) records the PRM's reward of every draft step. The
   threshold that keeps a share k of those rewards is the k-th from the top. It is cheap, but it is biased: once
   the draft goes wrong, every later step of that trajectory scores low, while in RSD the target would have fixed
   the first one. On the tiny world, a 30% share from the keep-all pass gave RSD 9%.
2. Rounds of RSD at the current delta: each round's own draft proposals (kept and rewritten alike) give the next
   delta, until the share RSD really gave is within `tolerance` of the one asked for. The delta whose round came
   closest is the answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rsd.core import Prompted, RSDError, Trajectory, TrajectoryStats
from rsd.policies import Threshold

if TYPE_CHECKING:
    from rsd.api import RSD

TABLE_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)  # target shares printed next to the one asked for


def delta_for_keep_share(rewards: Sequence[float], keep_share: float) -> float:
    """The delta whose binary rule 1[r >= delta] keeps `keep_share` of `rewards`: the k-th largest reward,
    k = round(share x n). Exactly k rewards reach it when they are distinct (ties keep a little more). A share of 0
    gives +inf, which keeps nothing."""
    if not 0.0 <= keep_share <= 1.0:
        raise RSDError(f"the share of steps to keep must lie in [0, 1], not {keep_share}.")
    if not rewards:
        raise RSDError("no draft step was scored, so there is nothing to calibrate on; give more problems.")
    keep = round(keep_share * len(rewards))
    if keep == 0:
        return math.inf
    return sorted(rewards, reverse=True)[keep - 1]


def check_target_share(target_share: float) -> None:
    if not 0.0 <= target_share <= 1.0:
        raise RSDError(
            f"--target-share {target_share}: give the share of steps the target should write, between 0 and 1 "
            "(e.g. 0.3)."
        )


@dataclass
class CalibrationRound:
    delta: float
    target_share: float  # the share of steps the target wrote in RSD at `delta`
    steps: int


@dataclass
class Calibration:
    """What the keep-all pass found, and the RSD rounds after it."""

    target_share: float  # asked for
    delta: float  # the answer: the delta whose RSD round came closest (the keep-all one without rounds)
    keep_all_delta: float
    scored_steps: int  # draft steps scored in the keep-all pass
    problems: int
    seconds: float
    table: dict[float, float] = field(default_factory=dict)  # keep-all pass: other target shares -> their delta
    rounds: list[CalibrationRound] = field(default_factory=list)

    @property
    def achieved_share(self) -> float | None:
        """The target's share in RSD at `delta` (None without rounds)."""
        return next((r.target_share for r in self.rounds if r.delta == self.delta), None)

    def to_dict(self) -> dict:
        return {
            "target_share": self.target_share,
            "delta": self.delta,
            "achieved_share": self.achieved_share,
            "keep_all_delta": self.keep_all_delta,
            "scored_steps": self.scored_steps,
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
            "table": {f"{share:g}": delta for share, delta in self.table.items()},
            "rounds": [vars(r) for r in self.rounds],
        }


def step_rewards(trajectories: Sequence[Trajectory]) -> list[float]:
    """The PRM's reward of every scored draft step (a rewritten step carries its draft's reward)."""
    return [step.reward for traj in trajectories for step in traj.steps if step.reward is not None]


def target_step_share(trajectories: Sequence[Trajectory]) -> float:
    """The share of all steps that the target wrote, over the trajectories' statistics together."""
    total = TrajectoryStats()
    for traj in trajectories:
        total.add(traj.stats)
    return total.target_step_share


def calibrate(
    rsd: RSD, problems: Sequence[Prompted], target_share: float, rounds: int = 3, tolerance: float = 0.02
) -> Calibration:
    """The delta that hands the target `target_share` of the steps on `problems`: a keep-all pass, then up to
    `rounds` RSD runs, each setting delta from its own proposals' rewards, stopping within `tolerance`."""
    check_target_share(target_share)
    if rounds < 0 or not 0.0 <= tolerance < 1.0:
        raise RSDError(f"rounds {rounds} and tolerance {tolerance}: give rounds >= 0 and a tolerance in [0, 1).")
    started = time.perf_counter()
    problems = list(problems)
    rewards = step_rewards(rsd.decoder("rsd", policy=Threshold(0.0)).run(problems))
    delta = delta_for_keep_share(rewards, 1.0 - target_share)
    result = Calibration(
        target_share=target_share,
        delta=delta,
        keep_all_delta=delta,
        scored_steps=len(rewards),
        problems=len(problems),
        seconds=0.0,
        table={share: delta_for_keep_share(rewards, 1.0 - share) for share in TABLE_SHARES},
    )
    for _ in range(rounds):
        trajectories = rsd.decoder("rsd", policy=Threshold(delta)).run(problems)
        share = target_step_share(trajectories)
        result.rounds.append(CalibrationRound(delta, share, sum(len(t.steps) for t in trajectories)))
        if abs(share - target_share) <= tolerance:
            break
        delta = delta_for_keep_share(step_rewards(trajectories), 1.0 - target_share)
    if result.rounds:
        result.delta = min(result.rounds, key=lambda r: abs(r.target_share - target_share)).delta
    result.seconds = time.perf_counter() - started
    return result
