"""The schedule replay behind docs/benchmarks.md's finding that no schedule of RSD's calls reaches the bound on one
GPU: it does reach the bound when calls cost in proportion to their rows, and falls short when they do not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest  # noqa: E402
import schedule_bound  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def report(target_on_rejected_rows: float) -> dict:
    """A gpu_speed.json of one batch of 16 whose target takes `target_on_rejected_rows` s on its 5 rejected rows."""
    seconds = {
        "target_only": 4.0,
        "draft_alone": 2.0,
        "prm_alone": 0.2,
        "target_rewrite_rows": target_on_rejected_rows,
        "rsd": 7.0,
    }
    return {"config": {"steps": 8, "keep_share": 0.7}, "results": [{"batch": 16, "seconds_median": seconds}]}


def test_calls_that_cost_in_proportion_to_their_rows_reach_the_bound():
    (row,) = schedule_bound.analyse(report(4.0 * 5 / 16), draws=100)
    assert row["fixed_share"] == pytest.approx(0.0, abs=1e-9)
    assert row["schedules"]["lockstep-rounds"]["of_bound"] == pytest.approx(1.0, abs=0.05)


def test_calls_that_cost_the_same_for_any_rows_fall_far_short():
    (row,) = schedule_bound.analyse(report(4.0), draws=100)
    assert row["fixed_share"] == 1.0
    # Nearly every round has a rejection among 16 rows, so the target runs every round: draft + PRM + target.
    assert row["schedules"]["lockstep-rounds"]["seconds"] == pytest.approx(6.2, abs=0.1)
    assert all(s["of_bound"] < 0.75 for s in row["schedules"].values())


def test_overlap_with_no_slowdown_never_loses_to_its_slowed_self():
    rejected = schedule_bound.draw_rejections(16, 8, 0.3, seed=3)
    costs = schedule_bound.costs_from_result(report(3.0)["results"][0], steps=8, keep_share=0.7)
    assert schedule_bound.overlap(costs, rejected, 1.0) <= schedule_bound.overlap(costs, rejected, 1.3)
    # Every row needs its 8 draft calls and its rewrites one after another: no schedule beats the slowest row.
    slowest = max(8 * (costs.draft(1) + costs.prm(1)) + sum(r) * costs.target(1) for r in rejected)
    assert schedule_bound.overlap(costs, rejected, 1.0) >= slowest - 1e-9


def test_the_command_reads_a_results_file_and_refuses_a_missing_one(tmp_path, capsys):
    path = tmp_path / "gpu_speed.json"
    path.write_text(json.dumps(report(3.0)))
    rows = schedule_bound.main([str(path)])
    assert "lockstep-rounds" in capsys.readouterr().out and rows[0]["batch"] == 16
    # --prm-scale 0: a free PRM shortens every schedule with a PRM call and leaves the bound as measured.
    free = schedule_bound.main([str(path), "--prm-scale", "0", "--draws", "20"])
    full = schedule_bound.analyse(report(3.0), draws=20)
    assert free[0]["bound"] == full[0]["bound"]
    assert all(free[0]["schedules"][n]["seconds"] < s["seconds"] for n, s in full[0]["schedules"].items())
    with pytest.raises(SystemExit):
        schedule_bound.main([str(path), "--prm-scale", "-1"])
    assert "cannot cost less than nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):
        schedule_bound.main([str(tmp_path / "missing.json")])
    other = tmp_path / "phase_profile.json"
    other.write_text(json.dumps({"environment": {}, "results": [{"batch": 16, "phases": {}}]}))
    with pytest.raises(SystemExit, match="not gpu_speed.py output"):
        schedule_bound.main([str(other)])


@pytest.mark.skipif(
    not any(RESULTS.glob("*.json")),
    reason="no GPU results in benchmarks/results/: run benchmarks/gpu_speed.py on a GPU and save its JSON there",
)
def test_committed_gpu_results_replay():
    for path in sorted(RESULTS.glob("*.json")):
        report = json.loads(path.read_text())
        if not schedule_bound.is_gpu_speed_report(report):
            # The other scripts' output: phase_profile.py's, decode_kernels.py's, decode_products.py's,
            # gpu_speed.py's own from the side-by-side methods on (which records no per-call costs to replay), and
            # serve_load.py's (a CPU's).
            other = "phases" in path.name or "copy_bandwidth_gbs" in report or "gpu-speed" in path.name
            other = other or "serve-load" in path.name or "decode-products" in path.name
            assert other, f"{path.name}: not the output of a benchmark in benchmarks/"
            continue
        for row in schedule_bound.analyse(report, draws=20):
            assert row["schedules"] and row["bound"] > 0


def test_continuous_batching_lets_a_kept_row_draft_on_while_the_target_rewrites_another():
    # Two rows, two steps, costs that do not depend on the rows; row 0's first step is rejected. Row 1 drafts and
    # is scored again while the target (on its own card) rewrites row 0's step; row 0 then drafts its second
    # step alone: draft + PRM + target + draft + PRM.
    costs = schedule_bound.CallCosts(draft_full=1.0, prm_full=0.25, target_full=3.0, fixed_share=1.0, batch=2)
    rejected = [[True, False], [False, False]]
    assert schedule_bound.continuous(costs, rejected, 1.0) == pytest.approx(1.0 + 0.25 + 3.0 + 1.0 + 0.25)
    # Rounds make row 1 wait for the rewrite: draft + PRM + target, then draft + PRM for both.
    assert schedule_bound.lockstep_rounds(costs, rejected) == pytest.approx(2 * (1.0 + 0.25) + 3.0)
    # Without rejections every row stays in step: the calls of lock-step rounds, at any share the PRM waits for.
    kept = [[False] * 3 for _ in range(4)]
    for share in (0.0, 1.0):
        assert schedule_bound.continuous(costs, kept, 1.0, share) == pytest.approx(3 * 1.25)


def test_continuous_batching_is_held_to_the_slowest_row_and_fuller_prm_calls_help_it():
    rejected = schedule_bound.draw_rejections(64, 8, 0.3, seed=5)
    result = report(3.0)["results"][0]
    costs = schedule_bound.costs_from_result({**result, "batch": 64}, steps=8, keep_share=0.7)
    slowest = max(8 * (costs.draft(1) + costs.prm(1)) + sum(r) * costs.target(1) for r in rejected)
    at_once, all_rows = (schedule_bound.continuous(costs, rejected, 1.0, share) for share in (0.0, 1.0))
    assert min(at_once, all_rows) >= slowest - 1e-9
    # A PRM call costs much the same for few rows as for many: scoring each row as its step ends costs more.
    assert all_rows < at_once
    assert schedule_bound.continuous(costs, rejected, 1.0, 1.0) <= schedule_bound.continuous(costs, rejected, 1.3, 1.0)


def test_own_shares_scale_the_draft_and_prm_by_their_own_lines_through_one_row():
    one = {"batch": 1, "seconds_median": {"target_only": 3.0, "draft_alone": 2.0 / 16, "prm_alone": 0.1}}
    two = {"config": {"steps": 8, "keep_share": 0.7}, "results": [report(3.0)["results"][0], one]}
    by_batch = {r["batch"]: r for r in schedule_bound.analyse(two, draws=20, own=True)}
    # The draft's time alone grows in proportion to its rows; the PRM's line through 0.1 s on 1 row and 0.2 s on 16
    # rises 0.1 / 15 s a row, so 16 rows of it are 0.107 s and the rest, 47% of 0.2 s, is fixed.
    draft, prm = by_batch[16]["draft_prm_fixed_shares"]
    assert draft == pytest.approx(0.0, abs=1e-9) and prm == pytest.approx((0.2 - 16 * 0.1 / 15) / 0.2)
    shared = schedule_bound.analyse(report(3.0), draws=20)[0]
    # Cheaper calls on few rows than the target's share gives them: no schedule gets slower.
    assert all(by_batch[16]["schedules"][n]["seconds"] <= s["seconds"] + 1e-9 for n, s in shared["schedules"].items())
    with pytest.raises(ValueError, match="batch-1 result"):
        schedule_bound.analyse(report(3.0), draws=20, own=True)


def test_own_shares_without_a_batch_1_result_is_one_clear_error(tmp_path):
    path = tmp_path / "gpu_speed.json"
    path.write_text(json.dumps(report(3.0)))
    with pytest.raises(SystemExit, match="no batch-1 result: --own-shares needs one"):
        schedule_bound.main([str(path), "--own-shares"])
