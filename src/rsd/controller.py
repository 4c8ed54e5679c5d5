"""What every controller shares: the models and settings, and the life of one step of one trajectory.

The lock-step controller (`loop.py`), the asynchronous one (`async_loop.py`), the evaluation harness and the server
differ only in how they schedule model calls. Starting a trajectory, building each model's request, recording
what a call cost, drawing the keep decision, committing a step and releasing the caches are written once, here:

    start -> step_request (draft) -> reward_request (PRM) -> decide -> step_request (target) -> commit -> release
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

from rsd.core import (
    ModelUsage,
    Prompted,
    RewardModel,
    RewardOutput,
    RewardRequest,
    RSDError,
    RunConfig,
    Step,
    StepGenerator,
    StepOutput,
    StepRequest,
    StopReason,
    Trajectory,
    TrajectoryStats,
    strip_delimiter,
)
from rsd.policies import Policy, Threshold

# A prompt longer than this many characters per token of context cannot fit whatever the tokenizer: it is refused
# before it is tokenized, so a huge input costs no memory.
MAX_CHARS_PER_CONTEXT_TOKEN = 64


class Controller:
    """The models and settings of a run, checked once, and the step bookkeeping over them.

    - RSD: proposer = draft, reward_model = PRM, policy = weighting function, fallback = target.
    - draft-only / target-only: proposer alone; every step is kept.
    """

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

    @property
    def generators(self) -> list[StepGenerator]:
        return [g for g in (self.proposer, self.fallback) if g is not None]

    # -- a trajectory's life --------------------------------------------------------------------------------------
    def start(self, problem: Prompted) -> Trajectory:
        """A new trajectory; one whose prompt cannot fit a model's context is finished at once ("context")."""
        if not problem.question.strip():
            raise RSDError(f"problem {problem.key!r} has an empty question; give every problem some text.")
        config = problem.config or self.config
        traj = Trajectory(problem.key, problem.question, problem.prompt, [], config=config, policy=problem.policy)
        context = min((c for g in self.generators if (c := context_length(g))), default=None)
        if context is not None and len(problem.prompt) > MAX_CHARS_PER_CONTEXT_TOKEN * context:
            traj.finish("context")
            return traj
        traj.prompt_ids = self.proposer.encode(problem.prompt)
        if not all(self.room(g, traj) > 0 for g in self.generators):
            traj.finish("context")
        return traj

    def step_request(
        self, generator: StepGenerator, traj: Trajectory, proposal: StepOutput | None = None
    ) -> StepRequest:
        """The next step's request: the prefix in the generator's tokens, the step cap clipped to the budget, and
        a rejected draft step as the proposal to verify first, where both models read the same ids."""
        prefix = self.prefix_ids(generator, traj)
        guess = proposal.token_ids if proposal is not None and self.shared_ids else ()
        return StepRequest(traj.key, prefix, self.room(generator, traj, len(prefix)), guess)

    def room(self, generator: StepGenerator, traj: Trajectory, prefix_length: int | None = None) -> int:
        """Tokens the next step may take: its cap, the trajectory's token budget and the model's context."""
        config = traj.config
        room = min(config.step_max_tokens, config.max_new_tokens - traj.num_generated_tokens)
        context = context_length(generator)
        if context is not None:
            length = len(self.prefix_ids(generator, traj)) if prefix_length is None else prefix_length
            room = min(room, context - length)
        return room

    def prefix_ids(self, generator: StepGenerator, traj: Trajectory) -> list[int]:
        if self.shared_ids or generator is self.proposer:
            return traj.prompt_ids + traj.generated_ids
        return generator.encode(traj.prompt + traj.text)

    def reward_request(self, traj: Trajectory, proposal_text: str) -> RewardRequest:
        steps = [s.text for s in traj.steps] + [proposal_text]
        return reward_request(traj.key, traj.question, steps, traj.config.delimiter)

    def decide(self, traj: Trajectory, reward: float) -> bool:
        """Draw the keep decision for the trajectory's next step."""
        # Seeded per trajectory and step, so a decision never depends on which problems share the batch.
        rng = random.Random(f"{traj.config.seed}|{traj.key}|{len(traj.steps)}")
        return (traj.policy or self.policy).keep(reward, rng)

    def release(self, traj: Trajectory) -> None:
        for backend in (self.proposer, self.fallback, self.reward_model):
            if backend is not None:
                backend.release([traj.key])


def context_length(model: object) -> int | None:
    """The most tokens `model` reads and writes in one sequence, where it says (None: unknown, unchecked)."""
    return getattr(model, "context_length", None)


def reward_request(key: Hashable, question: str, step_texts: Sequence[str], delimiter: str) -> RewardRequest:
    """What the PRM reads: the raw question and the steps, the one to score last, without their delimiters."""
    return RewardRequest(key, question, [strip_delimiter(text, delimiter) for text in step_texts])


# -- what a model call cost ---------------------------------------------------------------------------------------
def record_generation(traj: Trajectory, role: str, generator: StepGenerator, out: StepOutput, seconds: float) -> None:
    """A step's cost: the tokens and FLOPs of the model that wrote it and, where it speculated, of the draft."""
    tokens = out.prefill_tokens + out.decode_tokens
    usage = ModelUsage(out.prefill_tokens, out.decode_tokens, generator.cost.flops(tokens, out.context_sum), seconds, 1)
    stats = traj.stats
    stats.models[role].add(usage)
    if role == "target":
        stats.target_forwards += out.forwards
    if out.speculation is not None:
        stats.speculation.add(out.speculation)
        stats.models["draft"].add(out.speculation.draft)


def record_scoring(stats: TrajectoryStats, reward_model: RewardModel, out: RewardOutput, seconds: float) -> None:
    flops = reward_model.cost.flops(out.prefill_tokens, out.context_sum)
    stats.models["prm"].add(ModelUsage(out.prefill_tokens, 0, flops, seconds, 1))
    stats.prm_tokens += out.prefill_tokens
    stats.prm_inputs_truncated += out.truncated


# -- committing a step ----------------------------------------------------------------------------------------------
def commit_rsd_step(traj: Trajectory, proposal: StepOutput, reward: float, rewrite: StepOutput | None) -> None:
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
    append_step(traj, step)


def commit_single_model_step(traj: Trajectory, out: StepOutput, role: str) -> None:
    """A step of a one-model run: no PRM, always kept, attributed to the model that wrote it."""
    if role == "draft":
        traj.stats.steps_kept += 1
        traj.stats.draft_tokens_kept += len(out.token_ids)
    else:
        traj.stats.steps_target_only += 1
        traj.stats.target_tokens += len(out.token_ids)
    append_step(traj, Step(role, out.text, out.token_ids, None, True, stop=out.stop))


def append_step(traj: Trajectory, step: Step) -> None:
    """Append a step and end the trajectory at EOS, at its token budget or at its step budget."""
    traj.steps.append(step)
    if step.stop is StopReason.EOS:
        traj.finish("eos")
    elif traj.num_generated_tokens >= traj.config.max_new_tokens:
        traj.finish("max_new_tokens")
    elif len(traj.steps) >= traj.config.max_steps:
        traj.finish("max_steps")
