"""The controller: draft -> score -> decide -> target rewrites the rejected, over a batch of trajectories.

One round advances every active trajectory by exactly one step:
  1. the proposer (the draft) writes a step for each trajectory, batched;
  2. the PRM scores each proposal given the question and the steps so far;
  3. the weighting function decides, per trajectory, whether the proposal stays;
  4. the target rewrites the rejected steps from the same prefixes, batched (its steps are not scored);
  5. steps are committed; a trajectory ends at EOS, its token budget or its step budget, and a new problem
     takes its place in the batch (trajectories finish independently; no global cut-off).
Without a PRM the proposer's steps are all kept: that is draft-only or target-only decoding, with the same
step structure and the same statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from rsd.controller import (
    Controller,
    commit_rsd_step,
    commit_single_model_step,
    record_generation,
    record_scoring,
)
from rsd.core import Prompted, RunConfig, StepGenerator, StepOutput, Trajectory

__all__ = ["Prompted", "RunConfig", "StepwiseDecoder"]


class StepwiseDecoder(Controller):
    """Decodes trajectories step by step with a proposer, optionally checked by a PRM and a fallback model.

    - RSD: proposer = draft, reward_model = PRM, policy = weighting function, fallback = target.
    - draft-only / target-only: proposer alone; every step is kept.
    """

    # -- the public entry point ---------------------------------------------------------------------------
    def run(
        self,
        problems: Sequence[Prompted],
        on_finish: Callable[[Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        """Decode every problem; `on_finish` sees each trajectory the moment it ends (to save it at once)."""
        pending = [self.start(p) for p in reversed(problems)]  # every problem checked before any model call
        done: list[Trajectory] = []
        active: list[Trajectory] = []
        while pending or active:
            while pending and len(active) < self.config.batch_size:
                active.append(pending.pop())
            self.advance(active)
            still_active = []
            for traj in active:
                if traj.finished:
                    self.release(traj)
                    done.append(traj)
                    if on_finish is not None:
                        on_finish(traj)
                else:
                    still_active.append(traj)
            active = still_active
        order = {p.key: i for i, p in enumerate(problems)}
        return sorted(done, key=lambda t: order[t.key])

    # -- one round ----------------------------------------------------------------------------------------
    def advance(self, batch: Sequence[Trajectory]) -> None:
        """One step for every unfinished trajectory of `batch` (those that cannot fit their context end there)."""
        for traj in batch:
            if not traj.finished and any(self.room(g, traj) < 1 for g in self.generators):
                traj.finish("context")
        batch = [traj for traj in batch if not traj.finished]
        if not batch:
            return
        proposals = self._generate(self.proposer, self.proposer_role, batch)
        if self.reward_model is None:
            for traj, out in zip(batch, proposals, strict=True):
                commit_single_model_step(traj, out, self.proposer_role)
            return
        rewards = self._score(batch, proposals)
        rejected = []
        for traj, proposal, reward in zip(batch, proposals, rewards, strict=True):
            if self.decide(traj, reward):
                commit_rsd_step(traj, proposal, reward, None)
            else:
                rejected.append((traj, proposal, reward))
        if not rejected:
            return
        rewrites = self._generate(self.fallback, "target", [t for t, _, _ in rejected], [p for _, p, _ in rejected])
        for (traj, proposal, reward), rewrite in zip(rejected, rewrites, strict=True):
            commit_rsd_step(traj, proposal, reward, rewrite)

    # -- model calls, with their accounting ---------------------------------------------------------------
    def _generate(
        self,
        generator: StepGenerator,
        role: str,
        batch: list[Trajectory],
        proposals: Sequence[StepOutput] | None = None,
    ) -> list[StepOutput]:
        """One step for each of `batch` (a rewrite: with the rejected `proposals`): one call per group of
        trajectories that sample alike (usually one)."""
        outputs: dict[int, StepOutput] = {}
        for params, group in group_by_params(batch).items():
            requests = [self.step_request(generator, batch[i], proposals[i] if proposals else None) for i in group]
            start = time.perf_counter()
            results = generator.generate_steps(requests, params)
            share = (time.perf_counter() - start) / len(requests)
            for i, out in zip(group, results, strict=True):
                record_generation(batch[i], role, generator, out, share)
                outputs[i] = out
        return [outputs[i] for i in range(len(batch))]

    def _score(self, batch: list[Trajectory], proposals: list[StepOutput]) -> list[float]:
        requests = [self.reward_request(traj, out.text) for traj, out in zip(batch, proposals, strict=True)]
        start = time.perf_counter()
        outputs = self.reward_model.score_steps(requests)
        share = (time.perf_counter() - start) / len(batch)
        for traj, out in zip(batch, outputs, strict=True):
            record_scoring(traj.stats, self.reward_model, out, share)
        return [out.reward for out in outputs]


def group_by_params(batch: Sequence[Trajectory]) -> dict:
    """Indices of `batch` by the sampling settings of their steps, in order of first appearance."""
    groups: dict = {}
    for i, traj in enumerate(batch):
        groups.setdefault(traj.config.step_params(), []).append(i)
    return groups
