"""`rsd calibrate`: the delta for a chosen target share, from a keep-all pass corrected by RSD runs, on the
shipped tiny world's real models."""

from __future__ import annotations

import json
import math
import random

import pytest

from rsd.calibration import Calibration, delta_for_keep_share, target_step_share
from rsd.cli import main
from rsd.core import RSDError

PROBLEMS = "16"


def test_delta_keeps_the_asked_share_of_the_rewards():
    rng = random.Random(0)
    rewards = [rng.random() for _ in range(200)]
    for share in (0.1, 0.3, 0.7, 1.0):
        delta = delta_for_keep_share(rewards, share)
        assert sum(r >= delta for r in rewards) / len(rewards) == pytest.approx(share)
    assert delta_for_keep_share(rewards, 0.0) == math.inf
    assert delta_for_keep_share([0.2, 0.9, 0.5], 2 / 3) == 0.5
    with pytest.raises(RSDError, match="no draft step was scored"):
        delta_for_keep_share([], 0.7)
    with pytest.raises(RSDError, match=r"\[0, 1\]"):
        delta_for_keep_share(rewards, 1.5)


@pytest.fixture(scope="module")
def tinyworld_rsd():
    from rsd.api import RSD
    from rsd.eval.harness import default_tinyworld_model

    return RSD(*(default_tinyworld_model(role) for role in ("draft", "target", "prm")), device="cpu")


@pytest.fixture(scope="module")
def questions():
    from rsd.tinyworld.task import load_tinyworld

    return [p.question for p in load_tinyworld(split="test", n=int(PROBLEMS), seed=3)]


def test_rounds_correct_the_keep_all_estimate(tinyworld_rsd, questions):
    result = tinyworld_rsd.calibrate(questions, target_share=0.3, rounds=3)
    assert isinstance(result, Calibration) and result.problems == len(questions)
    # The keep-all delta hands the target 30% of the keep-all pass's steps...
    assert result.table[0.3] == result.keep_all_delta
    first = result.rounds[0]
    assert first.delta == result.keep_all_delta
    # ...but far less in RSD: in the keep-all pass every step after the draft's first error scores low, while RSD
    # has the target fix that first one.
    assert first.target_share < 0.2
    assert 1 <= len(result.rounds) <= 3
    assert result.delta in [r.delta for r in result.rounds]
    assert abs(result.achieved_share - 0.3) < abs(first.target_share - 0.3)
    assert abs(result.achieved_share - 0.3) == min(abs(r.target_share - 0.3) for r in result.rounds)
    # The delta really gives that share when RSD runs at it.
    from rsd.loop import Prompted
    from rsd.policies import Threshold

    problems = [Prompted(i, q, tinyworld_rsd.prompt(q)) for i, q in enumerate(questions)]
    again = tinyworld_rsd.decoder("rsd", policy=Threshold(result.delta)).run(problems)
    assert target_step_share(again) == pytest.approx(result.achieved_share)
    json.dumps(result.to_dict())


def test_without_rounds_only_the_keep_all_pass_runs(tinyworld_rsd, questions):
    result = tinyworld_rsd.calibrate(questions, target_share=0.5, rounds=0)
    assert result.rounds == [] and result.achieved_share is None
    assert result.delta == result.keep_all_delta == result.table[0.5]


def test_the_command_prints_json_and_refuses_a_bad_share(capsys):
    args = ["calibrate", "--num-problems", PROBLEMS, "--problem-seed", "3", "--rounds", "1"]
    assert main([*args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["problems"] == int(PROBLEMS) and len(payload["rounds"]) == 1
    assert payload["delta"] == payload["keep_all_delta"]
    assert main([*args]) == 0
    out = capsys.readouterr().out
    assert "round 1: RSD at delta" in out and "use it: rsd eval --delta" in out
    assert main(["calibrate", "--target-share", "1.5"]) == 2
    assert "--target-share 1.5" in capsys.readouterr().err
