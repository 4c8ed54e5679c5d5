"""The GPU speed benchmark at tiny sizes on the CPU, so that it cannot rot: every method runs and every figure is
reported, the RSD variants make the same decisions, and its acceptance hook sets the rate it is asked for while
the GPU's work stays a real run's (exact verification writes the target's own tokens through the same path)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_speed  # noqa: E402

from rsd.speculative import ForwardTimes, SpeculativeStepGenerator  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    report = gpu_speed.main(["--tiny", "--repeats", "2", "--out", str(out)])
    assert json.loads((out / "gpu_speed_tiny.json").read_text())["table"] == report["table"]
    return report


def test_tiny_run_reports_every_method_and_figure(report):
    assert [r["batch"] for r in report["results"]] == list(report["config"]["batches"])
    for result in report["results"]:
        assert set(result["methods"]) == set(gpu_speed.METHODS)
        for name, method in result["methods"].items():
            assert len(method["seconds_all"]) == 2 and method["seconds"] > 0
            assert method["flops"]["total"] > 0
            assert method["speedup_vs_target_only"] == pytest.approx(
                result["methods"]["target_only"]["seconds"] / method["seconds"]
            )
            assert (method["split_s"] is not None) == name.startswith("rsd")
        assert result["rsd_over_sd"] == pytest.approx(result["seconds"]["sd"] / result["seconds"]["rsd"])
    lines = report["table"].splitlines()
    assert len(lines) == 2 + len(gpu_speed.METHODS) * len(report["results"])


def test_rsd_variants_make_the_same_decisions_and_only_speculation_saves_target_forwards(report):
    for result in report["results"]:
        methods = result["methods"]
        assert methods["rsd"]["kept_share"] == methods["rsd_plain"]["kept_share"]  # the seeded keep draws
        assert methods["rsd_plain"]["target_forwards_per_target_token"] in (None, 1.0)
        assert methods["target_only"]["target_forwards_per_target_token"] == 1.0
        assert methods["sd"]["target_forwards_per_target_token"] < 1.0
        assert methods["sd"]["flops"]["draft"] > 0 and methods["target_only"]["flops"]["draft"] == 0
        if methods["rsd"]["target_tokens"]:
            assert methods["rsd"]["target_forwards_per_target_token"] < 1.0


def test_forwards_run_without_graphs_are_named_in_the_round_line_and_the_report(report):
    """A failed capture leaves a model's forwards of that shape eager for the rest of the run: its times are not the
    engine's, so the round's line and the report name them (the runner's `graph_stats.eager`)."""
    assert report["without_graphs"] == {}  # nothing failed (on the CPU nothing is captured at all)
    assert all(graphs["eager"] == [] for graphs in report["results"][0]["methods"]["rsd"]["graphs"][0].values())
    captured = {"captured": 2, "capture_s": 0.25, "held": 5, "held_gib": 0.1}
    graphs = {
        "draft": {**captured, "captured": 0, "capture_s": 0.0, "eager": []},
        "target": {**captured, "eager": [1, 9]},
    }
    line = gpu_speed.round_line(gpu_speed.Run(8.9, stats=None, graphs=graphs))
    assert line == "8.900s (captured {'target': 2}, 0.25s) (without graphs, tokens a slot: {'target': [1, 9]})"
    later = {"target": {**captured, "eager": [3, 9]}, "prm": {**captured, "eager": [1]}}
    assert gpu_speed.without_graphs([graphs, None, later]) == {"prm": [1], "target": [1, 3, 9]}
    assert gpu_speed.round_line(gpu_speed.Run(1.0, stats=None, graphs={"draft": graphs["draft"]})) == "1.000s"


def test_the_seeded_acceptance_keeps_tokens_at_its_rate_by_draws_fixed_where_they_stand():
    rule = gpu_speed.SeededAcceptance(0.8, seed=3)
    proposal = list(range(4))
    kept = [rule(proposal, proposal, (f"t{i}", 7)) for i in range(20000)]
    # Each proposed token stays with probability 0.8 until the first that does not: E[kept] = sum of 0.8^i.
    expected = sum(0.8**i for i in range(1, 5))
    assert sum(kept) / len(kept) == pytest.approx(expected, rel=0.02)
    assert max(kept) == 4 and min(kept) == 0
    # A token's draw is its own: the same whatever proposal (k) reaches it, in any order; another round, others.
    starts = [(f"t{i}", 7) for i in range(200)]
    shorter = [rule(proposal[:2], proposal[:2], start) for start in reversed(starts)][::-1]
    assert shorter == [min(2, k) for k in kept[:200]]
    later = [rule(proposal[2:], proposal[2:], (key, 9)) for key, _ in starts]
    assert [k for k in kept[:200] if k >= 2] == [2 + n for k, n in zip(kept[:200], later, strict=True) if k >= 2]
    rule.round = 1
    assert [rule(proposal, proposal, start) for start in starts] != kept[:200]


def test_with_exact_verification_the_timed_paths_write_the_targets_own_tokens():
    config = gpu_speed.tiny_config()
    models = gpu_speed.build_models(config)
    models.speculative = SpeculativeStepGenerator(models.target, models.draft)  # the exact rule, not the draws
    problems = gpu_speed.make_problems(models.tokenizer, 3, config.prompt_tokens, config.seed, tag="exact")
    alone, speculated = (gpu_speed.alone(g, problems, config) for g in (models.target, models.speculative))
    assert alone.target_tokens == speculated.target_tokens == 3 * config.steps * config.step_tokens
    plain = gpu_speed.rsd(models, problems, config, plain=True)
    fast = gpu_speed.rsd(models, problems, config, plain=False)
    assert (plain.steps_kept, plain.steps_rejected, plain.target_tokens) == (
        fast.steps_kept,
        fast.steps_rejected,
        fast.target_tokens,
    )
    assert fast.target_forwards <= plain.target_forwards


def test_the_draft_price_the_rounds_measured_is_reported_where_they_timed_their_forwards(report):
    """On a GPU the speculation rounds time their forwards (`ForwardTimes`): the report gives the medians of the
    draft's and the target's and their ratio. Untimed (the CPU), no price is made up."""
    for result in report["results"]:
        assert all(method["forward_ms"] is None for method in result["methods"].values())
    timed = SimpleNamespace(times=ForwardTimes())
    assert gpu_speed.forward_ms(timed) is None  # nothing timed yet
    timed.times.samples["draft"].extend([2.0, 2.2, 9.0])  # a forward whose graph was being captured: 9 ms
    assert gpu_speed.forward_ms(timed) is None  # no target verification timed yet
    timed.times.samples["target"].extend([12.0, 13.0])
    assert gpu_speed.forward_ms(timed) == pytest.approx({"draft": 2.2, "target": 12.5, "draft_price": 2.2 / 12.5})
    assert gpu_speed.forward_ms(SimpleNamespace(times=None)) is None
    assert report["table"].splitlines()[0].endswith("| draft price (draft / target ms) |")


def test_a_run_without_target_only_leaves_the_ratio_to_it_blank():
    report = gpu_speed.main(["--tiny", "--batches", "2", "--methods", "rsd", "sd"])
    rows = [line.split(" | ") for line in report["table"].splitlines()[2:]]
    assert [row[1] for row in rows] == ["rsd", "sd"]
    assert all(row[3] == "" and float(row[2]) > 0 for row in rows)  # no "0.00x" against a method that never ran
    assert "rsd_over_sd" in report["results"][0]


def test_a_batchs_counts_come_from_the_round_whose_time_is_reported():
    def run(seconds: float, flops: float) -> gpu_speed.Run:
        return gpu_speed.Run(seconds, stats=flops, graphs=None)

    rounds = [run(2.07, 1.0), run(1.87, 2.0), run(1.90, 3.0), run(1.86, 4.0), run(1.90, 5.0)]
    assert gpu_speed.median_round(rounds).stats == 3.0  # 1.90 s, the median; not the last round's
    assert gpu_speed.median_round(rounds[:4]).stats == 2.0  # of the middle two (1.87, 1.90), the faster
    assert gpu_speed.median_round(rounds[:1]).stats == 1.0
