"""rsd.eval.stats against statsmodels, and pass@k against its definition by enumeration."""

from __future__ import annotations

import itertools
import random

import pytest

from rsd.eval.stats import compare, mcnemar_exact_p, newcombe_paired_interval, pass_at_k, pass_at_ks, wilson_interval

statsmodels = pytest.importorskip(
    "statsmodels", reason="the reference values come from statsmodels: pip install -e '.[dev]' brings it"
)
from statsmodels.stats.contingency_tables import mcnemar  # noqa: E402
from statsmodels.stats.proportion import proportion_confint  # noqa: E402


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (3, 7), (197, 200), (1, 1), (50, 3018)])
def test_wilson_interval_matches_statsmodels(k, n):
    assert wilson_interval(k, n) == pytest.approx(proportion_confint(k, n, alpha=0.05, method="wilson"), abs=1e-9)
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_no_trials_have_no_interval():
    assert wilson_interval(0, 0) is None
    assert newcombe_paired_interval(0, 0, 0, 0) is None


@pytest.mark.parametrize(("b", "c"), [(0, 3), (3, 0), (5, 5), (12, 2), (0, 89), (40, 31)])
def test_mcnemar_exact_matches_statsmodels(b, c):
    assert mcnemar_exact_p(b, c) == pytest.approx(mcnemar([[10, b], [c, 10]], exact=True).pvalue, abs=1e-12)


def test_no_discordant_pairs_give_p_one_and_a_non_degenerate_interval():
    assert mcnemar_exact_p(0, 0) == 1.0
    low, high = newcombe_paired_interval(200, 0, 0, 0)
    assert low < 0 < high  # 200 ties still leave room for a difference either way


def test_paired_interval_contains_the_difference_and_flips_with_the_pair():
    rng = random.Random(0)
    for _ in range(200):
        both, a_only, b_only, neither = (rng.randint(0, 30) for _ in range(4))
        if both + a_only + b_only + neither == 0:
            continue
        n = both + a_only + b_only + neither
        low, high = newcombe_paired_interval(both, a_only, b_only, neither)
        assert -1.0 <= low <= (a_only - b_only) / n <= high <= 1.0
        flipped = newcombe_paired_interval(both, b_only, a_only, neither)
        assert flipped == pytest.approx((-high, -low), abs=1e-12)


def test_compare_pairs_on_shared_problems_only():
    a = {"1": True, "2": True, "3": False, "4": True}
    b = {"1": True, "2": False, "3": True, "5": False}
    result = compare("a", "b", a, b)
    assert (result.n, result.a_only, result.b_only, result.a_correct, result.b_correct) == (3, 1, 1, 2, 2)
    assert result.difference == 0.0 and result.p_value == 1.0


def test_pass_at_k_is_the_chance_a_draw_of_k_holds_a_correct_sample():
    for samples, correct in [(8, 0), (8, 1), (8, 3), (5, 5), (6, 2)]:
        outcomes = [True] * correct + [False] * (samples - correct)
        for k in range(1, samples + 1):
            draws = list(itertools.combinations(outcomes, k))
            assert pass_at_k(samples, correct, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    table = pass_at_ks([(8, 1), (8, 0), (8, 8)])
    assert list(table) == ["1", "2", "4", "8"]
    assert table["1"] == pytest.approx((1 / 8 + 0 + 1) / 3)
    assert table["8"] == pytest.approx(2 / 3)  # coverage: a correct sample in two of three problems
    assert list(pass_at_ks([(6, 1)])) == ["1", "2", "4", "6"]


def test_diff_reads_sweep_labels_with_commas_as_one_method():
    from rsd.eval.diff_cmd import choose_methods

    records = [[{"method": "rsd"}], [{"method": "rsd[threshold,delta=0.9]"}]]
    assert choose_methods(["a", "b"], "rsd,rsd[threshold,delta=0.9]", records) == ("rsd", "rsd[threshold,delta=0.9]")
