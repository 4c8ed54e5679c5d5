"""`benchmarks/speculation_ceiling.py`: the ceiling of token-level speculation at a draft price, against the
closed form where there is one, and the lock-step rewrite rounds it simulates against what they must be."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import speculation_ceiling as ceiling  # noqa: E402


def test_an_uninterrupted_run_writes_the_expected_tokens_per_unit_of_work():
    # 0.8 acceptance, a draft at 0.18 of the target: k = 4 writes 3.36 tokens for 1.72 target forwards' worth.
    k, rate = ceiling.uninterrupted(0.8, 0.18)
    assert k == 4 and rate == pytest.approx((1 - 0.8**5) / 0.2 / 1.72)
    assert ceiling.uninterrupted(1.0, 0.0) == (ceiling.MAX_K, ceiling.MAX_K + 1.0)  # every proposal kept, free
    assert ceiling.uninterrupted(0.0, 0.5)[1] == pytest.approx(1 / 1.5)  # nothing kept: one token a round, k = 1


def test_rewrite_rounds_end_with_the_slowest_row_and_cost_nothing_when_every_token_is_kept():
    rng = random.Random(0)
    # Every proposal kept: the rejected step is read whole in the first forward, and no round follows.
    assert ceiling.lockstep_rounds(rng, 3, 1.0, 4, 64) == 0
    # Nothing kept: each forward writes one token, so a row needs 63 rounds after the first, however many rows.
    assert ceiling.lockstep_rounds(rng, 1, 0.0, 4, 64) == ceiling.lockstep_rounds(rng, 5, 0.0, 4, 64) == 63
    one = ceiling.rewrite_speedup(0.8, 0.18, 1, 0.7, 64, 400, 1)
    sixteen = ceiling.rewrite_speedup(0.8, 0.18, 16, 0.7, 64, 400, 1)
    assert one[1] > sixteen[1] > 1.0  # more rows rejected together wait longer for their slowest


def test_the_script_prints_a_row_per_price_and_refuses_bad_rates(capsys):
    ceiling.main(["--prices", "0.18", "0.1", "--batches", "1", "4", "--draws", "50"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4].startswith("| 0.18 | 4, 1.95x |") and lines[-3].startswith("| 0.10 | 6, 2.47x |")
    assert lines[-2].startswith("price 0.18: a 512-token run at k = 4 takes 15")  # 512 / 3.36 tokens a round
    rng = random.Random(0)
    assert ceiling.run_rounds(rng, 1.0, 4, 512) == 103 and ceiling.run_rounds(rng, 0.0, 4, 512) == 512
    with pytest.raises(SystemExit):
        ceiling.main(["--acceptance", "1.5"])
    assert "--acceptance is in [0, 1]" in capsys.readouterr().err
