"""The nouns of RSD and the interfaces every backend implements.

The controller (`loop.py`) owns trajectories; a `StepGenerator` owns batching and KV caches of one model; a
`RewardModel` owns the input format of one PRM. They talk through the small records below, keyed by a
trajectory key so a backend can keep per-trajectory state (a KV cache) between calls.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from rsd.policies import Policy

DEFAULT_DELIMITER = "\n\n"


class StopReason(StrEnum):
    """Why a step ended."""

    DELIMITER = "delimiter"  # the step text reached the step delimiter (kept at the end of the step)
    EOS = "eos"  # the model emitted an end-of-sequence token (kept in the step's token ids)
    LENGTH = "length"  # the step hit its token cap


@dataclass(frozen=True)
class StepParams:
    """Per-call generation settings shared by every request of one `generate_steps` call."""

    delimiter: str = DEFAULT_DELIMITER
    temperature: float = 0.0  # 0 means greedy, the paper's setting
    top_p: float = 1.0
    seed: int = 0  # sampling is reproducible from (seed, request key, position in the sequence)


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
        if not 0 <= self.temperature < float("inf") or not 0 < self.top_p <= 1:
            raise RSDError("temperature must be a finite number >= 0 and top-p in (0, 1].")

    def step_params(self) -> StepParams:
        return StepParams(self.delimiter, self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class Prompted:
    """A problem ready to decode: its key, its raw question (for the PRM) and the generators' prompt text.

    `config` and `policy` replace the controller's for this problem alone (a server's per-request settings); the
    step delimiter and batch size stay the controller's."""

    key: Hashable
    question: str
    prompt: str
    config: RunConfig | None = None
    policy: Policy | None = None


@dataclass(frozen=True)
class StepRequest:
    """Ask a generator for the next step of one trajectory.

    `prefix_ids` is the whole prefix (prompt + accepted steps) in the generator's own tokenization. The backend
    compares it with what it has cached for `key` and only processes the new tail.
    """

    key: Hashable
    prefix_ids: Sequence[int]
    max_tokens: int  # the step cap, already clipped to the trajectory's remaining token budget and context
    # A guess of the step's tokens (a rejected draft step), in the generator's ids. A generator may verify it to
    # write the step with fewer forwards; the step it writes is the same with or without it.
    proposal: Sequence[int] = ()


@dataclass
class StepOutput:
    """One generated step and what it cost."""

    token_ids: list[int]
    text: str  # decoded with special tokens removed
    stop: StopReason
    prefill_tokens: int  # prefix tokens this call had to run through the model (cache misses)
    decode_tokens: int  # tokens generated (== len(token_ids))
    context_sum: int = 0  # sum over processed tokens of their context length, for attention FLOPs
    forwards: int = 0  # forward passes of the model this step took part in (in process; 0 when unknown)
    speculation: Speculation | None = None  # what token-level speculation did for it, where it ran


@dataclass(frozen=True)
class RewardRequest:
    """Score the last step of `steps` for the trajectory `key` (steps carry no trailing delimiter)."""

    key: Hashable
    question: str
    steps: Sequence[str]


@dataclass
class RewardOutput:
    reward: float  # in [0, 1], higher is better
    prefill_tokens: int = 0  # tokens the PRM ran through its model for this request
    context_sum: int = 0
    truncated: bool = False  # the input did not fit the PRM's context: it read the question and the latest steps


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a model, for FLOP accounting: 2 x parameters, plus attention over the context."""

    parameters: int  # parameters that multiply each token (input embedding table excluded)
    layers: int = 0
    attention_width: int = 0  # heads x head_dim of the queries

    def flops(self, tokens: int, context_sum: int) -> float:
        # QK^T and AV: 2 matrix-vector products of width attention_width over the context, 2 FLOPs per MAC.
        return 2.0 * self.parameters * tokens + 4.0 * self.layers * self.attention_width * context_sum


@runtime_checkable
class StepGenerator(Protocol):
    """A model that writes one reasoning step at a time for a batch of trajectories."""

    name: str
    cost: ModelCost

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""

    def vocabulary_fingerprint(self) -> str:
        """Equal for two generators exactly when their token ids mean the same text."""

    def generate_steps(self, requests: Sequence[StepRequest], params: StepParams) -> list[StepOutput]:
        """One step per request, same order."""

    def release(self, keys: Sequence[Hashable]) -> None:
        """Forget the cached state of finished trajectories."""


@runtime_checkable
class RewardModel(Protocol):
    """A PRM: the reward of the last step of each request."""

    name: str
    cost: ModelCost

    def score_steps(self, requests: Sequence[RewardRequest]) -> list[RewardOutput]: ...

    def release(self, keys: Sequence[Hashable]) -> None: ...


@dataclass
class Step:
    """One step of a trajectory as it was committed."""

    source: str  # "draft" or "target"
    text: str
    token_ids: list[int]
    reward: float | None  # reward of the draft proposal (None when no PRM was consulted)
    kept: bool  # whether the draft proposal was kept
    draft_text: str | None = None  # the rejected draft proposal, when the target rewrote the step
    draft_token_ids: list[int] | None = None
    stop: StopReason = StopReason.DELIMITER

    def to_dict(self) -> dict:
        out = {
            "source": self.source,
            "text": self.text,
            "reward": self.reward,
            "kept": self.kept,
            "num_tokens": len(self.token_ids),
            "stop": self.stop.value,
        }
        if self.draft_text is not None:
            out["draft_text"] = self.draft_text
            out["draft_num_tokens"] = len(self.draft_token_ids or [])
        return out


@dataclass
class ModelUsage:
    """Tokens, FLOPs and seconds one model spent on one trajectory (or a whole run, when summed)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    flops: float = 0.0
    wall_time_s: float = 0.0
    calls: int = 0

    def add(self, other: ModelUsage) -> None:
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens
        self.flops += other.flops
        self.wall_time_s += other.wall_time_s
        self.calls += other.calls

    def to_dict(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "flops": self.flops,
            "wall_time_s": round(self.wall_time_s, 6),
            "calls": self.calls,
        }


MODEL_ROLES = ("draft", "target", "prm")


@dataclass
class Speculation:
    """What token-level speculation did for one step, or (summed) a trajectory: the tokens it took from the proposal
    it was given (a rejected draft step) and from the draft's proposals, and what the draft ran to propose them."""

    proposal_tokens: int = 0  # tokens of the given proposal that were verified
    from_proposal: int = 0  # of those, tokens the step kept
    proposed: int = 0  # tokens the draft proposed in speculation rounds
    from_draft: int = 0  # of those, tokens the step kept
    rounds: int = 0  # verification forwards of the target
    draft: ModelUsage = field(default_factory=ModelUsage)

    def add(self, other: Speculation) -> None:
        for name in ("proposal_tokens", "from_proposal", "proposed", "from_draft", "rounds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.draft.add(other.draft)

    @property
    def token_acceptance_rate(self) -> float | None:
        """The share of the draft's proposed tokens the target kept."""
        return self.from_draft / self.proposed if self.proposed else None

    def to_dict(self) -> dict:
        return {
            "proposal_tokens": self.proposal_tokens,
            "tokens_from_proposal": self.from_proposal,
            "draft_tokens_proposed": self.proposed,
            "tokens_from_draft": self.from_draft,
            "token_acceptance_rate": self.token_acceptance_rate,
            "rounds": self.rounds,
        }


@dataclass
class TrajectoryStats:
    steps_kept: int = 0
    steps_rejected: int = 0  # draft proposals the target rewrote
    steps_target_only: int = 0  # steps the target wrote without a draft proposal (target-only runs)
    draft_tokens_kept: int = 0
    draft_tokens_discarded: int = 0
    target_tokens: int = 0
    prm_tokens: int = 0
    prm_inputs_truncated: int = 0  # scorings whose input did not fit the PRM's context (earliest steps left out)
    target_forwards: int = 0  # forwards of the target that wrote this trajectory's target tokens
    speculation: Speculation = field(default_factory=Speculation)
    models: dict[str, ModelUsage] = field(default_factory=lambda: {r: ModelUsage() for r in MODEL_ROLES})

    @property
    def num_steps(self) -> int:
        return self.steps_kept + self.steps_rejected + self.steps_target_only

    @property
    def acceptance_rate(self) -> float | None:
        proposed = self.steps_kept + self.steps_rejected
        return self.steps_kept / proposed if proposed else None

    @property
    def target_step_share(self) -> float:
        n = self.num_steps
        return (self.steps_rejected + self.steps_target_only) / n if n else 0.0

    @property
    def target_forwards_per_token(self) -> float | None:
        """Target forwards per token the target wrote: 1 for plain decoding, less with speculation."""
        return self.target_forwards / self.target_tokens if self.target_tokens else None

    @property
    def total_flops(self) -> float:
        return sum(m.flops for m in self.models.values())

    def add(self, other: TrajectoryStats) -> None:
        for name in (
            "steps_kept",
            "steps_rejected",
            "steps_target_only",
            "draft_tokens_kept",
            "draft_tokens_discarded",
            "target_tokens",
            "prm_tokens",
            "prm_inputs_truncated",
            "target_forwards",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.speculation.add(other.speculation)
        for role, usage in other.models.items():
            self.models.setdefault(role, ModelUsage()).add(usage)

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "steps_kept": self.steps_kept,
            "steps_rejected": self.steps_rejected,
            "steps_target_only": self.steps_target_only,
            "acceptance_rate": self.acceptance_rate,
            "target_step_share": self.target_step_share,
            "tokens": {
                "draft_kept": self.draft_tokens_kept,
                "draft_discarded": self.draft_tokens_discarded,
                "target": self.target_tokens,
                "prm": self.prm_tokens,
            },
            "prm_inputs_truncated": self.prm_inputs_truncated,
            "target_forwards": self.target_forwards,
            "target_forwards_per_target_token": self.target_forwards_per_token,
            "speculation": self.speculation.to_dict(),
            "flops": {**{r: u.flops for r, u in self.models.items()}, "total": self.total_flops},
            "wall_time_s": {r: round(u.wall_time_s, 6) for r, u in self.models.items()},
            "models": {r: u.to_dict() for r, u in self.models.items()},
        }


@dataclass
class Trajectory:
    """A problem's prompt and the steps committed so far."""

    key: Hashable
    question: str  # the raw question, what the PRM sees
    prompt: str  # what the generators see (the question wrapped in a template, or verbatim)
    prompt_ids: list[int]
    steps: list[Step] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "eos", "max_new_tokens", "max_steps" or "context"
    stats: TrajectoryStats = field(default_factory=TrajectoryStats)
    config: RunConfig = field(default_factory=lambda: RunConfig())  # its budgets and sampling (`Prompted.config`)
    policy: Policy | None = None  # its weighting function, when it is not the controller's

    def finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason

    @property
    def generated_ids(self) -> list[int]:
        return [t for s in self.steps for t in s.token_ids]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.steps)

    def to_dict(self) -> dict:
        return {
            "id": self.key,
            "question": self.question,
            "prompt": self.prompt,
            "text": self.text,
            "steps": [s.to_dict() for s in self.steps],
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


def strip_delimiter(text: str, delimiter: str) -> str:
    """A step's text as the PRM sees it: up to its first delimiter, which ends the step."""
    cut = text.find(delimiter) if delimiter else -1
    return text if cut < 0 else text[:cut]


class RSDError(Exception):
    """A problem the user can fix; the CLI prints its message alone, without a traceback."""
