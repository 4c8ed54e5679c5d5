"""The continuous schedule (`rsd.continuous`): RSD's rows each on its own give the lock-step decoder's steps, greedy
and sampled, with trajectories coming and going, on the tiny world (CPU, float32)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from rsd import RSD
from rsd.continuous import ContinuousDecoder, runs_continuously
from rsd.core import Prompted, RSDError, Trajectory
from rsd.eval.harness import default_tinyworld_model
from rsd.eval.prompts import build_prompt
from rsd.loop import StepwiseDecoder
from rsd.tinyworld.task import load_tinyworld

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_speculative import decided, eval_json, records_of  # noqa: E402


@pytest.fixture(scope="module")
def tinyworld() -> RSD:
    roles = ("draft", "target", "prm")
    return RSD(*(default_tinyworld_model(role) for role in roles), device="cpu", dtype="float32", schedule="continuous")


def tinyworld_problems(rsd: RSD, n: int) -> list[Prompted]:
    return [
        Prompted(p.id, p.question, build_prompt("qwen25-math-cot", p.question, rsd.draft.tokenizer))
        for p in load_tinyworld("test", n=n, seed=0)
    ]


def steps_of(traj: Trajectory) -> tuple:
    """Everything a trajectory says but its costs; rewards to 5 places (the PRM scores other rows beside a step here,
    which moves a float32 sum in its last bits)."""
    steps = [
        (s.source, s.text, s.token_ids, round(s.reward, 5), s.kept, s.draft_text, s.draft_token_ids, s.stop)
        for s in traj.steps
    ]
    stats = traj.stats
    counts = (stats.steps_kept, stats.steps_rejected, stats.target_tokens, stats.draft_tokens_kept)
    return traj.key, traj.text, traj.finish_reason, steps, counts


@pytest.mark.parametrize(("temperature", "problems", "batch"), [(0.0, 40, 8), (0.8, 24, 6)])
def test_rows_on_their_own_write_the_lockstep_steps(tinyworld, temperature, problems, batch):
    """40 problems at batch 8 (trajectories end and new ones take their lanes), greedy and top-p sampled: every
    trajectory's steps, decisions, rewards and counts are the lock-step decoder's; the target still writes its tokens
    in well under a forward each."""
    todo = tinyworld_problems(tinyworld, problems)
    overrides = {"batch_size": batch, "temperature": temperature, "top_p": 0.9}
    continuous = tinyworld.decoder("rsd", **overrides)
    assert type(continuous) is ContinuousDecoder
    lockstep = StepwiseDecoder(
        tinyworld.draft, replace(tinyworld.config, **overrides), tinyworld.prm, tinyworld.speculative_target(),
        tinyworld.policy, proposer_role="draft",
    )  # fmt: skip
    reference = lockstep.run(todo)
    finished: list[str] = []
    got = continuous.run(todo, on_finish=lambda traj: finished.append(traj.key))
    assert [steps_of(t) for t in got] == [steps_of(t) for t in reference]
    assert sorted(finished) == sorted(p.key for p in todo)
    assert sum(t.stats.steps_rejected for t in got) > 0
    forwards = sum(t.stats.target_forwards for t in got)
    assert 0 < forwards <= 0.5 * sum(t.stats.target_tokens for t in got)
    for traj in got:  # each model's cost is counted for every step it wrote or scored
        models = traj.stats.models
        assert models["draft"].decode_tokens >= traj.stats.draft_tokens_kept
        assert models["prm"].calls == len(traj.steps)
        assert (models["target"].calls > 0) == (traj.stats.steps_rejected > 0)
    assert not tinyworld.draft.engine.prefixes.rows and not tinyworld.target.engine.prefixes.rows  # all released


def test_eval_with_the_continuous_schedule_gives_the_same_records(tmp_path):
    """`rsd eval --schedule continuous` against the default on a CPU (lock-step): the same records and summary, but
    what they cost."""
    base = ["--num-problems", "16", "--methods", "rsd", "--batch-size", "8"]
    lockstep = eval_json(*base, "--out", str(tmp_path / "lockstep"))
    continuous = eval_json(*base, "--schedule", "continuous", "--out", str(tmp_path / "continuous"))
    strip = {"flops", "wall_time_s", "wall_time_by_model_s", "target_forwards", "target_forwards_per_target_token"}
    strip |= {"speculation", "flops_vs_target"}
    [a], [b] = lockstep["methods"], continuous["methods"]
    assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}

    def rounded(record: dict) -> dict:
        record = decided(record)
        record["steps"] = [{**s, "reward": round(s["reward"], 5)} for s in record["steps"]]
        return record

    assert [rounded(r) for r in records_of(lockstep)["rsd"]] == [rounded(r) for r in records_of(continuous)["rsd"]]


def test_the_schedule_is_chosen_by_what_runs_and_refused_where_it_cannot():
    roles = ("draft", "target", "prm")
    models = [default_tinyworld_model(role) for role in roles]
    on_cpu = RSD(*models, device="cpu", dtype="float32")
    assert on_cpu.schedule == "auto" and type(on_cpu.decoder("rsd")) is StepwiseDecoder  # the CPU: lock-step
    assert not runs_continuously(on_cpu.rewriter(), 16) and not runs_continuously(on_cpu.target, 16)
    assert type(RSD(*models, device="cpu", schedule="lockstep").decoder("rsd")) is StepwiseDecoder
    assert type(on_cpu.decoder("target")) is StepwiseDecoder
    with pytest.raises(RSDError, match="schedule='sometimes': choose one of auto, continuous, lockstep"):
        RSD(*models, device="cpu", schedule="sometimes")
    with pytest.raises(RSDError, match="schedule='continuous' needs speculative rewrites"):
        RSD(*models, device="cpu", schedule="continuous", rewrite="plain")
