"""One harness for every method: decode, grade, record each problem the moment it ends, summarise.

Every method has the same signature, `method(ctx, spec, problems, emit)`, and sits in `METHODS`:

| method          | what it does                                                                 |
|-----------------|------------------------------------------------------------------------------|
| `rsd`           | reward-guided speculative decoding (draft steps, PRM, target rewrites)       |
| `target`        | the target alone, step by step (the accuracy RSD aims for)                   |
| `draft`         | the draft alone (the cost floor)                                              |
| `sd`            | token-level speculative decoding: lossless, the target's own output          |
| `best-of-n`     | N samples of `--sample-model`, the one the PRM ranks highest                 |
| `majority`      | N samples of `--sample-model`, the most frequent answer                      |
| `rsd-best-of-n` | N RSD samples, the one the PRM ranks highest                                 |
| `rsd-majority`  | N RSD samples, the most frequent answer                                      |
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rsd.controller import record_scoring, reward_request
from rsd.core import Prompted, RSDError, RunConfig, Trajectory, TrajectoryStats
from rsd.eval.runfolder import RECORD_HASH, current_records
from rsd.loop import StepwiseDecoder
from rsd.policies import Policy

METHODS = ("rsd", "target", "draft", "sd", "best-of-n", "majority", "rsd-best-of-n", "rsd-majority")
AGGREGATES = ("last", "min", "prod")


@dataclass(frozen=True)
class MethodSpec:
    """A method to run; sweeps run the same kind under several labels with other weighting functions."""

    kind: str
    label: str
    policy: Policy | None = None  # overrides the run's weighting function (sweeps)

    def __post_init__(self) -> None:
        if self.kind not in METHODS:
            raise RSDError(f"unknown method {self.kind!r}; choose from {', '.join(METHODS)}.")


@dataclass
class EvalProblem:
    id: str
    question: str
    answer: str
    prompt: str
    meta: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """A hash of everything about the problem that decides its records: a changed problem is run again."""
        text = json.dumps([self.question, self.answer, self.prompt], ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class EvalContext:
    """What the methods share: the loaded models (an `rsd.api.RSD`), the run configuration and N-sample settings."""

    rsd: object
    config: RunConfig
    num_samples: int = 8
    sample_temperature: float = 0.7
    sample_model: str = "draft"
    aggregate: str = "min"
    grader: Callable[[EvalProblem, str], tuple[str | None, bool]] | None = None
    voter: Callable[[EvalProblem, list[str]], int] | None = None

    def decoder(self, method: str, policy: Policy | None = None, **overrides) -> StepwiseDecoder:
        decoder = self.rsd.decoder(method, **overrides)
        if policy is not None:
            decoder.policy = policy
        return decoder


Emit = Callable[[dict], None]


# -- records --------------------------------------------------------------------------------------------------
def base_record(spec: MethodSpec, problem: EvalProblem) -> dict:
    return {
        "method": spec.label,
        "kind": spec.kind,
        "id": problem.id,
        "question": problem.question,
        "prompt": problem.prompt,
        "gold": problem.answer,
        RECORD_HASH: problem.digest,
    }


def single_record(ctx: EvalContext, spec: MethodSpec, problem: EvalProblem, traj: Trajectory) -> dict:
    prediction, correct = ctx.grader(problem, traj.text)
    return {
        **base_record(spec, problem),
        "response": traj.text,
        "prediction": prediction,
        "correct": correct,
        "finish_reason": traj.finish_reason,
        "steps": [s.to_dict() for s in traj.steps],
        "stats": traj.stats.to_dict(),
    }


def by_id(problems: Sequence[EvalProblem]) -> dict[str, EvalProblem]:
    return {p.id: p for p in problems}


# -- one-sample methods ---------------------------------------------------------------------------------------
def run_stepwise(ctx: EvalContext, spec: MethodSpec, problems: Sequence[EvalProblem], emit: Emit) -> None:
    decoder = ctx.decoder(spec.kind, spec.policy)
    index = by_id(problems)
    prompted = [Prompted(p.id, p.question, p.prompt) for p in problems]
    decoder.run(prompted, on_finish=lambda t: emit(single_record(ctx, spec, index[t.key], t)))


# -- N-sample methods -----------------------------------------------------------------------------------------
def sample_key(problem_id: str, j: int) -> str:
    return f"{problem_id}#{j}"


def run_sampled(ctx: EvalContext, spec: MethodSpec, problems: Sequence[EvalProblem], emit: Emit) -> None:
    """N samples per problem; a problem is recorded when its last sample ends."""
    uses_rsd = spec.kind.startswith("rsd-")
    temperature = ctx.config.temperature or ctx.sample_temperature  # N greedy samples would all be the same
    decoder = ctx.decoder("rsd" if uses_rsd else ctx.sample_model, spec.policy, temperature=temperature)
    index = by_id(problems)
    pending: dict[str, list[Trajectory]] = {p.id: [] for p in problems}

    def on_finish(traj: Trajectory) -> None:
        problem_id = str(traj.key).rsplit("#", 1)[0]
        pending[problem_id].append(traj)
        if len(pending[problem_id]) == ctx.num_samples:
            samples = sorted(pending.pop(problem_id), key=lambda t: int(str(t.key).rsplit("#", 1)[1]))
            emit(select_sample(ctx, spec, index[problem_id], samples))

    prompted = [Prompted(sample_key(p.id, j), p.question, p.prompt) for p in problems for j in range(ctx.num_samples)]
    decoder.run(prompted, on_finish=on_finish)


def select_sample(ctx: EvalContext, spec: MethodSpec, problem: EvalProblem, samples: list[Trajectory]) -> dict:
    texts = [t.text for t in samples]
    stats = TrajectoryStats()
    for t in samples:
        stats.add(t.stats)
    scores = None
    if spec.kind.endswith("best-of-n"):
        step_rewards = score_all_steps(ctx, samples, stats)
        scores = [aggregate_rewards(r, ctx.aggregate) for r in step_rewards]
        chosen = max(range(len(samples)), key=lambda j: (scores[j], -j))
    else:
        chosen = ctx.voter(problem, texts)
    graded = [ctx.grader(problem, text) for text in texts]
    return {
        **base_record(spec, problem),
        "response": texts[chosen],
        "prediction": graded[chosen][0],
        "correct": graded[chosen][1],
        "chosen": chosen,
        "finish_reason": samples[chosen].finish_reason,
        "samples": [
            {"text": text, "prediction": pred, "correct": ok, "score": None if scores is None else scores[j]}
            for j, (text, (pred, ok)) in enumerate(zip(texts, graded, strict=True))
        ],
        "steps": [s.to_dict() for s in samples[chosen].steps],
        "stats": stats.to_dict(),
    }


def score_all_steps(ctx: EvalContext, samples: list[Trajectory], stats: TrajectoryStats) -> list[list[float]]:
    """The PRM's reward of every step of every sample, scored incrementally (one new step per call)."""
    prm = ctx.rsd.prm
    delimiter = ctx.config.delimiter
    steps = [[s.text for s in t.steps] for t in samples]
    rewards: list[list[float]] = [[] for _ in samples]
    keys = [f"score|{t.key}" for t in samples]
    for k in range(1, max((len(s) for s in steps), default=0) + 1):
        rows = [j for j, s in enumerate(steps) if len(s) >= k]
        start = time.perf_counter()
        requests = [reward_request(keys[j], samples[j].question, steps[j][:k], delimiter) for j in rows]
        outputs = prm.score_steps(requests)
        seconds = (time.perf_counter() - start) / len(rows)  # one batched call: each row its share
        for j, out in zip(rows, outputs, strict=True):
            rewards[j].append(out.reward)
            record_scoring(stats, prm, out, seconds)
    prm.release(keys)
    return rewards


def aggregate_rewards(rewards: Sequence[float], how: str) -> float:
    """One score for a whole solution from its step rewards (an empty solution scores lowest)."""
    if not rewards:
        return -math.inf
    if how == "last":
        return rewards[-1]
    if how == "min":
        return min(rewards)
    if how == "prod":
        return math.prod(rewards)
    raise RSDError(f"unknown --aggregate {how!r}; choose from {', '.join(AGGREGATES)}.")


METHOD_RUNNERS: dict[str, Callable[[EvalContext, MethodSpec, Sequence[EvalProblem], Emit], None]] = {
    "rsd": run_stepwise,
    "target": run_stepwise,
    "draft": run_stepwise,
    "sd": run_stepwise,
    "best-of-n": run_sampled,
    "majority": run_sampled,
    "rsd-best-of-n": run_sampled,
    "rsd-majority": run_sampled,
}


# -- the harness ----------------------------------------------------------------------------------------------
def run_methods(
    ctx: EvalContext,
    specs: Sequence[MethodSpec],
    problems: Sequence[EvalProblem],
    folder,
    progress: bool = True,
) -> None:
    """Run every method on the problems that have no record yet in `folder`, appending records as they end."""
    wanted = {p.id: p.digest for p in problems}
    for spec in specs:
        done = folder.done(spec.label)
        todo = [p for p in problems if (p.id, p.digest) not in done]
        if not todo:
            continue
        bar = make_progress(spec.label, len(problems), len(problems) - len(todo), progress)
        finished = current_records(folder.records, wanted, [spec.label]).records
        emit = recorder(folder, bar, finished, show_acceptance=spec.kind.startswith("rsd"))
        METHOD_RUNNERS[spec.kind](ctx, spec, todo, emit)
        bar.close()


def recorder(folder, bar, finished: list[dict], show_acceptance: bool) -> Emit:
    """Save a finished problem's record at once (the run's durable state), then update the progress bar."""

    def emit(record: dict) -> None:
        folder.append(record)
        finished.append(record)
        update_progress(bar, finished, show_acceptance)

    return emit


def make_progress(label: str, total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{label:<14}", unit="problem", disable=not enabled, leave=True)


def update_progress(bar, finished: list[dict], show_acceptance: bool) -> None:
    """Live accuracy, and the step acceptance rate for methods where a PRM can reject steps."""
    correct = sum(bool(r["correct"]) for r in finished)
    kept = sum(r["stats"]["steps_kept"] for r in finished)
    rejected = sum(r["stats"]["steps_rejected"] for r in finished)
    postfix = {"acc": f"{correct / len(finished):.1%}"}
    if show_acceptance and kept + rejected:
        postfix["accept"] = f"{kept / (kept + rejected):.1%}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def parse_shard(shard: str) -> tuple[int, int]:
    """`i/n` as (i, n)."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise RSDError(f"--shard {shard!r}: write it as i/n, e.g. 0/4 for the first of four shards.") from None
    if not 0 <= i < n:
        raise RSDError(f"--shard {shard!r}: i must be in [0, n).")
    return i, n


def select_shard(problems: Sequence, shard: str | None) -> list:
    """`i/n`: every n-th problem starting at i, so shards are disjoint and cover the set."""
    if not shard:
        return list(problems)
    i, n = parse_shard(shard)
    return list(problems)[i::n]


def default_tinyworld_model(role: str) -> str:
    return str(Path(__file__).resolve().parents[1] / "tinyworld" / "models" / role)
