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

import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from rsd.core import (
    DEFAULT_DELIMITER,
    ModelUsage,
    RewardModel,
    RewardOutput,
    RewardRequest,
    RSDError,
    Step,
    StepGenerator,
    StepOutput,
    StepParams,
    StepRequest,
    StopReason,
    Trajectory,
    strip_delimiter,
)
from rsd.policies import Policy, Threshold


@dataclass(frozen=True)
class RunConfig:
    """How long trajectories may grow and how steps are sampled. Saved with every result."""

    delimiter: str = DEFAULT_DELIMITER  # ends a step; the only place it is defined for a run
    step_max_tokens: int = 256  # a step that reaches this many tokens ends there
    max_new_tokens: int = 2048  # generated-token budget of a trajectory
    max_steps: int = 64  # step budget of a trajectory
    temperature: float = 0.0  # 0: greedy, the paper's setting
    top_p: float = 1.0
    seed: int = 0  # seeds sampling and the soft weighting functions' draws
    batch_size: int = 32  # trajectories advanced together in one round

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise RSDError("the step delimiter is empty; pass a non-empty --delimiter such as '\\n\\n'.")
        for name in ("step_max_tokens", "max_new_tokens", "max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise RSDError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise RSDError("temperature must be >= 0 and top-p in (0, 1].")

    def step_params(self) -> StepParams:
        return StepParams(self.delimiter, self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class Prompted:
    """A problem ready to decode: its key, its raw question (for the PRM) and the generators' prompt text."""

    key: Hashable
    question: str
    prompt: str


class Controller:
    """The models and settings every controller holds (this one and the asynchronous one), checked once."""

    def __init__(
        self,
        proposer: StepGenerator,
        config: RunConfig,
        reward_model: RewardModel | None = None,
        fallback: StepGenerator | None = None,
        policy: Policy | None = None,
        proposer_role: str = "draft",
    ) -> None:
        if (reward_model is None) != (fallback is None):
            raise RSDError("RSD needs both a PRM and a target model; pass both, or neither for a single model.")
        self.proposer = proposer
        self.fallback = fallback
        self.reward_model = reward_model
        self.policy = policy or Threshold()
        self.config = config
        self.proposer_role = proposer_role
        # Token ids are only shared when both tokenizers give every id the same text; otherwise each model
        # re-reads the trajectory as text in its own tokenization.
        self.shared_ids = fallback is None or (proposer.vocabulary_fingerprint() == fallback.vocabulary_fingerprint())


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
        pending = [self._start(p) for p in reversed(problems)]
        done: list[Trajectory] = []
        active: list[Trajectory] = []
        while pending or active:
            while pending and len(active) < self.config.batch_size:
                active.append(pending.pop())
            self._advance(active)
            still_active = []
            for traj in active:
                if traj.finished:
                    self._release(traj)
                    done.append(traj)
                    if on_finish is not None:
                        on_finish(traj)
                else:
                    still_active.append(traj)
            active = still_active
        order = {p.key: i for i, p in enumerate(problems)}
        return sorted(done, key=lambda t: order[t.key])

    # -- one round ----------------------------------------------------------------------------------------
    def _start(self, problem: Prompted) -> Trajectory:
        if not problem.question.strip():
            raise RSDError(f"problem {problem.key!r} has an empty question; give every problem some text.")
        return Trajectory(
            key=problem.key,
            question=problem.question,
            prompt=problem.prompt,
            prompt_ids=self.proposer.encode(problem.prompt),
        )

    def _advance(self, batch: list[Trajectory]) -> None:
        proposals = self._generate(self.proposer, self.proposer_role, batch)
        if self.reward_model is None:
            for traj, out in zip(batch, proposals, strict=True):
                commit_single_model_step(traj, out, self.proposer_role, self.config)
            return
        rewards = self._score(batch, proposals)
        keep = [decide(self.policy, self.config.seed, traj, r) for traj, r in zip(batch, rewards, strict=True)]
        rejected = []
        for traj, proposal, reward, kept in zip(batch, proposals, rewards, keep, strict=True):
            if kept:
                commit_rsd_step(traj, proposal, reward, None, self.config)
            else:
                rejected.append((traj, proposal, reward))
        if not rejected:
            return
        riders = self._riders([traj for traj, kept in zip(batch, keep, strict=True) if kept])
        rewrites = self._generate(self.fallback, "target", [traj for traj, _, _ in rejected], riders)
        for (traj, proposal, reward), rewrite in zip(rejected, rewrites, strict=True):
            commit_rsd_step(traj, proposal, reward, rewrite, self.config)

    def _riders(self, kept: list[Trajectory]) -> list[Trajectory]:
        """The trajectories whose kept steps the target can cache while it rewrites the others' (see
        `StepRequest.cache_only`): only for a target that gains from it, and only those that go on."""
        if self.fallback is None or not getattr(self.fallback, "rides_along", False):
            return []
        return [traj for traj in kept if not traj.finished]

    # -- model calls, with their accounting ---------------------------------------------------------------
    def _prefix_ids(self, generator: StepGenerator, traj: Trajectory) -> list[int]:
        if self.shared_ids or generator is self.proposer:
            return traj.prompt_ids + traj.generated_ids
        return generator.encode(traj.prompt + traj.text)

    def _generate(
        self, generator: StepGenerator, role: str, batch: list[Trajectory], riders: Sequence[Trajectory] = ()
    ) -> list[StepOutput]:
        """One step for each of `batch`; `riders` only bring their prefixes along (cache-only requests)."""
        requests = [
            StepRequest(
                key=traj.key,
                prefix_ids=self._prefix_ids(generator, traj),
                max_tokens=min(self.config.step_max_tokens, self.config.max_new_tokens - traj.num_generated_tokens),
            )
            for traj in batch
        ]
        requests += [StepRequest(traj.key, self._prefix_ids(generator, traj), 0, cache_only=True) for traj in riders]
        start = time.perf_counter()
        outputs = generator.generate_steps(requests, self.config.step_params())
        share = (time.perf_counter() - start) / len(requests)
        for traj, out in zip(batch, outputs[: len(batch)], strict=True):
            record_generation(traj, role, generator, out, share)
        for traj in riders:
            record_ride(traj, role, share)
        return outputs[: len(batch)]

    def _score(self, batch: list[Trajectory], proposals: list[StepOutput]) -> list[float]:
        delimiter = self.config.delimiter
        requests = [
            RewardRequest(
                key=traj.key,
                question=traj.question,
                steps=[strip_delimiter(s.text, delimiter) for s in traj.steps] + [strip_delimiter(out.text, delimiter)],
            )
            for traj, out in zip(batch, proposals, strict=True)
        ]
        start = time.perf_counter()
        outputs = self.reward_model.score_steps(requests)
        share = (time.perf_counter() - start) / len(batch)
        for traj, out in zip(batch, outputs, strict=True):
            record_scoring(traj, self.reward_model, out, share)
        return [out.reward for out in outputs]

    def _release(self, traj: Trajectory) -> None:
        self.proposer.release([traj.key])
        if self.fallback is not None:
            self.fallback.release([traj.key])
        if self.reward_model is not None:
            self.reward_model.release([traj.key])


# -- the bookkeeping of one step, shared by every controller (this one and the asynchronous one) ---------------
def decide(policy: Policy, seed: int, traj: Trajectory, reward: float) -> bool:
    """Draw the keep decision for the trajectory's next step."""
    # Seeded per trajectory and step, so a decision never depends on which problems share the batch.
    rng = random.Random(f"{seed}|{traj.key}|{len(traj.steps)}")
    return policy.keep(reward, rng)


def reward_request(traj: Trajectory, proposal_text: str, delimiter: str) -> RewardRequest:
    """What the PRM reads: the raw question and every step, the proposal last, without their delimiters."""
    steps = [strip_delimiter(s.text, delimiter) for s in traj.steps]
    return RewardRequest(traj.key, traj.question, [*steps, strip_delimiter(proposal_text, delimiter)])


def record_generation(traj: Trajectory, role: str, generator: StepGenerator, out: StepOutput, seconds: float) -> None:
    tokens = out.prefill_tokens + out.decode_tokens
    usage = ModelUsage(out.prefill_tokens, out.decode_tokens, generator.cost.flops(tokens, out.context_sum), seconds, 1)
    traj.stats.models[role].add(usage)


def record_ride(traj: Trajectory, role: str, seconds: float) -> None:
    """A cache-only request's share of the call's time (its tokens count in the step that needs them)."""
    traj.stats.models[role].add(ModelUsage(wall_time_s=seconds))


def record_scoring(traj: Trajectory, reward_model: RewardModel, out: RewardOutput, seconds: float) -> None:
    flops = reward_model.cost.flops(out.prefill_tokens, out.context_sum)
    traj.stats.models["prm"].add(ModelUsage(out.prefill_tokens, 0, flops, seconds, 1))
    traj.stats.prm_tokens += out.prefill_tokens


def commit_rsd_step(
    traj: Trajectory, proposal: StepOutput, reward: float, rewrite: StepOutput | None, config: RunConfig
) -> None:
    """Append the kept proposal, or the target's rewrite of a rejected one, and count it."""
    stats = traj.stats
    if rewrite is None:
        step = Step("draft", proposal.text, proposal.token_ids, reward, True, stop=proposal.stop)
        stats.steps_kept += 1
        stats.draft_tokens_kept += len(proposal.token_ids)
    else:
        step = Step(
            "target", rewrite.text, rewrite.token_ids, reward, False,
            draft_text=proposal.text, draft_token_ids=proposal.token_ids, stop=rewrite.stop,
        )  # fmt: skip
        stats.steps_rejected += 1
        stats.draft_tokens_discarded += len(proposal.token_ids)
        stats.target_tokens += len(rewrite.token_ids)
    append_step(traj, step, config)


def commit_single_model_step(traj: Trajectory, out: StepOutput, role: str, config: RunConfig) -> None:
    """A step of a one-model run: no PRM, always kept, attributed to the model that wrote it."""
    if role == "draft":
        traj.stats.steps_kept += 1
        traj.stats.draft_tokens_kept += len(out.token_ids)
    else:
        traj.stats.steps_target_only += 1
        traj.stats.target_tokens += len(out.token_ids)
    append_step(traj, Step(role, out.text, out.token_ids, None, True, stop=out.stop), config)


def append_step(traj: Trajectory, step: Step, config: RunConfig) -> None:
    """Append a step and end the trajectory at EOS, at its token budget or at its step budget."""
    traj.steps.append(step)
    if step.stop is StopReason.EOS:
        traj.finished, traj.finish_reason = True, "eos"
    elif traj.num_generated_tokens >= config.max_new_tokens:
        traj.finished, traj.finish_reason = True, "max_new_tokens"
    elif len(traj.steps) >= config.max_steps:
        traj.finished, traj.finish_reason = True, "max_steps"
