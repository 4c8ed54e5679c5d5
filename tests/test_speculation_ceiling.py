"""`benchmarks/speculation_ceiling.py`: the ceiling of token-level speculation at a draft price, against the
closed form where there is one, and the lock-step rewrite rounds it simulates against what they must be."""

from __future__ import annotations

import json
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


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
RUN_16 = RESULTS / "h100-5553bb0-gpu-speed-14b-batch16.json"
RUN_64 = RESULTS / "h100-5553bb0-gpu-speed-14b-batch64.json"
PHASES = RESULTS / "h100-5553bb0-phases-14b-speculative.json"  # batches 16 and 64


def test_the_pattern_rejects_the_share_it_is_set_to_and_every_step_has_rewrites_from_16_rows():
    config = {"steps": 8, "keep_share": 0.7}
    assert ceiling.pattern_calls(1, config) == [1, 1]  # 2 of the 8 steps of problem 0 (75% kept)
    sixteen = ceiling.pattern_calls(16, config)
    assert len(sixteen) == 8 and sum(sixteen) == round(0.3 * 16 * 8)  # 38 rows rewritten over the 8 calls


def test_rsd_best_time_adds_its_parts_at_the_runs_own_prices(capsys):
    ceiling.main(["--run", str(RUN_16), "--phases", str(PHASES), "--batches", "16", "--draws", "200"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        "batch 16: RSD with speculative rewrites at this run's prices (draft price 0.163, k = 4)"
    )
    run, phases = (json.loads(path.read_text()) for path in (RUN_16, PHASES))
    figures = ceiling.rsd_best_time(run, 16, phases, draws=200, seed=1)
    rsd = run["results"][0]["methods"]["rsd"]
    assert figures["draft and PRM"] == pytest.approx(rsd["split_s"]["draft"] + rsd["split_s"]["prm"])
    assert figures["first forwards"] == pytest.approx(0.512, abs=1e-3)  # the 8 first forwards the profile timed
    # 165 rounds of one verification (12.60 ms) and 4 draft forwards (2.06 ms) each.
    assert figures["simulated rounds"] == pytest.approx(165, abs=5)
    assert figures["rounds"] == pytest.approx(figures["simulated rounds"] * (0.012601 + 4 * 0.002059), rel=1e-3)
    assert figures["best"] == pytest.approx(
        sum(figures[part] for part in ("draft and PRM", "first forwards", "rounds"))
    )
    assert figures["best at the profiled rounds"] - figures["best"] == pytest.approx(
        (168 - figures["simulated rounds"]) * (0.012601 + 4 * 0.002059), rel=1e-3
    )
    # The median round without the graphs it captured: 5.858 - 0.350, 5.440 - 0.154, 5.485 - 0.076 s.
    assert figures["measured without captures"] == pytest.approx(5.409, abs=2e-3)
    assert figures["best"] < figures["measured without captures"] < figures["measured"]


def test_rsd_best_time_names_a_batch_the_run_does_not_have(capsys):
    with pytest.raises(SystemExit, match="has no batch 64 \\(it has 16\\)"):
        ceiling.main(["--run", str(RUN_16), "--batches", "64", "--draws", "5"])
    with pytest.raises(SystemExit):
        ceiling.main(["--phases", str(PHASES)])
    assert "--phases, --draft-time and --prm-floor-ms go with --run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ceiling.main(["--draft-time", "0.5"])
    with pytest.raises(SystemExit):
        ceiling.main(["--run", str(RUN_16), "--draft-time", "0"])
    assert "--draft-time is a share of the measured time, above 0" in capsys.readouterr().err


def test_a_faster_draft_scales_its_own_calls_and_its_proposals_and_no_other_part(capsys):
    """Every draft forward at 0.77 of its measured time: the draft's calls and the rounds' proposals shrink, the
    PRM's calls, the first forwards and the verifications stay; k is chosen again at the new price."""
    run, phases = (json.loads(path.read_text()) for path in (RUN_16, PHASES))
    rsd = run["results"][0]["methods"]["rsd"]
    measured = ceiling.rsd_best_time(run, 16, phases, draws=200, seed=1)
    faster = ceiling.rsd_best_time(run, 16, phases, draws=200, seed=1, draft_time=0.77)
    assert faster["draft and PRM"] == pytest.approx(0.77 * rsd["split_s"]["draft"] + rsd["split_s"]["prm"])
    assert faster["first forwards"] == measured["first forwards"]
    assert faster["price"] == pytest.approx(0.77 * measured["price"])
    verification, draft = 0.012601, 0.77 * 0.002059
    round_seconds = verification + faster["k"] * draft
    assert faster["rounds"] == pytest.approx(faster["simulated rounds"] * round_seconds, rel=1e-3)
    assert faster["best"] < measured["best"] and faster["measured"] == measured["measured"]
    ceiling.main(["--run", str(RUN_16), "--phases", str(PHASES), "--batches", "16", "--draws", "200",
                  "--draft-time", "0.77"])  # fmt: skip
    assert "the draft's forwards at 0.77 of their time (draft price 0.126" in capsys.readouterr().out


def profiled_first_forward_tokens(path: Path, batch: int) -> int:
    """The tokens of a speculative phase profile's first forwards at `batch`, from the shapes it recorded."""
    result = next(r for r in json.loads(path.read_text())["results"] if r["batch"] == batch)
    shapes = result["forward shapes"]["target/forward in the arena"]
    return sum(int(shape.split(" rows, ")[1].split(" tokens")[0]) * count for shape, count in shapes.items())


def test_the_patterns_first_forward_tokens_are_those_the_profiles_ran():
    """What the target reads before each rewrite (the prompt or the last token of its own step, the kept steps
    since, the rejected step but its last token), summed over the run's pattern, against the shapes profiled."""
    config = json.loads(RUN_16.read_text())["config"]
    assert ceiling.first_forward_tokens(16, config) == profiled_first_forward_tokens(PHASES, 16) == 11_248
    assert ceiling.first_forward_tokens(64, config) == profiled_first_forward_tokens(PHASES, 64) == 44_928
    batch_1 = RESULTS / "h100-3693daf-phases-14b-speculative-batch1.json"
    assert ceiling.first_forward_tokens(1, config) == profiled_first_forward_tokens(batch_1, 1) == 511 + 192


def test_a_profiled_batch_takes_its_own_first_forwards_and_rounds():
    run, phases = (json.loads(path.read_text()) for path in (RUN_64, PHASES))
    figures = ceiling.rsd_best_time(run, 64, phases, draws=50, seed=1)
    assert figures["first forwards"] == pytest.approx(2.03, abs=0.01) and figures["profiled rounds"] == 186
    assert "first forwards estimated from batch" not in figures


def test_the_first_forwards_of_an_unprofiled_batch_are_estimated_at_the_profiles_seconds_per_token(capsys, tmp_path):
    phases = json.loads(PHASES.read_text())
    phases["results"] = [result for result in phases["results"] if result["batch"] == 16]
    only_16 = tmp_path / "phases-16.json"
    only_16.write_text(json.dumps(phases))
    run = json.loads(RUN_64.read_text())
    figures = ceiling.rsd_best_time(run, 64, phases, draws=50, seed=1)
    tokens = ceiling.first_forward_tokens(64, run["config"])
    assert figures["first forward tokens"] == tokens > 4 * 11_248 * 0.9
    assert figures["first forwards"] == pytest.approx(0.5121 * tokens / 11_248, rel=1e-3)
    assert figures["first forwards estimated from batch"] == 16 and "profiled rounds" not in figures
    ceiling.main(["--run", str(RUN_64), "--phases", str(only_16), "--batches", "64", "--draws", "50"])
    out = capsys.readouterr().out
    assert f"({tokens:,} tokens, estimated at the profile's seconds per token at batch 16)" in out
    assert "best, profiled rounds" not in out


PRICES = ceiling.Prices(draft=1.0, verification=10.0, first_forward_token=0.01, prm_floor=0.5, prm_row=0.25)


def tiny_config(acceptance: float, steps: int) -> dict:
    return {"token_acceptance": acceptance, "step_tokens": 8, "steps": steps, "keep_share": 0.5, "prompt_tokens": 4}


def test_rows_not_in_lock_step_pay_what_each_iteration_runs():
    # One row, two steps of 8 tokens, k = 4: the pattern keeps step 0 and rejects step 1. Each step is two
    # iterations of 4 draft forwards and a PRM call of one row; the rewrite's first forward reads the 12 tokens the
    # target has not seen and 7 of the rejected step, and keeps all of them (acceptance 1): no verification follows.
    config = tiny_config(1.0, steps=2)
    first = ceiling.rows_first_tokens(1, config)
    assert first == [[0, 19]]
    seconds = ceiling.continuous_run(random.Random(0), 1, config, PRICES, 4, first)
    assert seconds == pytest.approx(4 * 4 * 1.0 + 2 * 0.5 + 19 * 0.01)
    # Two rows, one step: the pattern keeps row 0's and rejects row 1's. One PRM call scores both; nothing is ever
    # kept (acceptance 0), so the rewrite writes one token a verification: 7 iterations of 4 draft forwards and one
    # verification after its first forward (4 prompt tokens and 7 of the step).
    config = tiny_config(0.0, steps=1)
    first = ceiling.rows_first_tokens(2, config)
    assert first == [[0], [11]]
    seconds = ceiling.continuous_run(random.Random(0), 2, config, PRICES, 4, first)
    assert seconds == pytest.approx(2 * 4 + (0.5 + 0.25) + 11 * 0.01 + 7 * (4 + 10))


def test_rows_not_in_lock_step_match_lock_step_at_batch_1_and_beat_it_at_16():
    """At one row the two schedules run the same forwards; at 16 the draft's forwards carry the rows drafting with
    the rows proposing, and a verification carries rewrites of different steps."""
    one = json.loads((RESULTS / "h100-2a97f74-gpu-speed-14b-batch1.json").read_text())
    figures = ceiling.rsd_best_time(one, 1, None, draws=200, seed=1)
    continuous = ceiling.continuous_best_time(one, 1, figures, draws=20, seed=1, prm_floor=0.0044)
    assert continuous["continuous best"] == pytest.approx(figures["best"], rel=0.03)
    run, phases = (json.loads(path.read_text()) for path in (RUN_16, PHASES))
    figures = ceiling.rsd_best_time(run, 16, phases, draws=200, seed=1)
    continuous = ceiling.continuous_best_time(run, 16, figures, draws=10, seed=1, prm_floor=0.0044)
    assert continuous["continuous best"] < 0.85 * figures["best"]
    assert continuous["prm row"] == pytest.approx((0.14245 / 8 - 0.0044) / 15, rel=1e-3)


def test_the_script_prints_rows_not_in_lock_step_and_refuses_a_negative_prm_call(capsys):
    ceiling.main(["--run", str(RUN_16), "--phases", str(PHASES), "--batches", "16", "--draws", "10"])
    assert "  rows not in lock-step     " in capsys.readouterr().out.splitlines()[-1]
    with pytest.raises(SystemExit):
        ceiling.main(["--run", str(RUN_16), "--prm-floor-ms", "-1"])
    assert "--prm-floor-ms is at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ceiling.main(["--prm-floor-ms", "3"])
    assert "--phases, --draft-time and --prm-floor-ms go with --run" in capsys.readouterr().err
