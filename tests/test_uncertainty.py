"""The figures of `rsd eval` carry their uncertainty: the tiny world's default run, as a user runs it (a
subprocess), checked against an independent recomputation from its records.jsonl with statsmodels.

The recomputation here shares no code with rsd: statsmodels' Wilson interval and exact McNemar test (rsd uses
scipy's), and Newcombe's paired interval written out from the 1998 paper's formula.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

statsmodels = pytest.importorskip(
    "statsmodels", reason="the independent recomputation needs statsmodels: pip install -e '.[dev]' brings it"
)
from statsmodels.stats.contingency_tables import mcnemar  # noqa: E402
from statsmodels.stats.proportion import proportion_confint  # noqa: E402


def rsd_cli(*args: str, timeout: float = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "rsd.cli", *args], capture_output=True, text=True, env=env, timeout=timeout, input=stdin
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> dict:
    """`rsd eval` with no arguments but the run folder: RSD, target and draft on 200 tiny-world problems."""
    out = tmp_path_factory.mktemp("default-run") / "run"
    result = rsd_cli("eval", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    return {
        "out": out,
        "stdout": result.stdout,
        "summary": json.loads((out / "summary.json").read_text()),
        "records": [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()],
        "report": (out / "report.md").read_text(),
    }


def verdicts(records: list[dict], method: str) -> dict[str, bool]:
    return {r["id"]: bool(r["correct"]) for r in records if r["method"] == method}


def newcombe_method10(a: dict[str, bool], b: dict[str, bool]) -> tuple[float, float]:
    """Newcombe (1998), method 10, from the paper: Wilson limits of both margins combined with phi-hat."""
    ids = sorted(set(a) & set(b))
    n = len(ids)
    e = sum(a[i] and b[i] for i in ids)
    f = sum(a[i] and not b[i] for i in ids)
    g = sum(b[i] and not a[i] for i in ids)
    h = n - e - f - g
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = proportion_confint(e + f, n, alpha=0.05, method="wilson")
    l2, u2 = proportion_confint(e + g, n, alpha=0.05, method="wilson")
    denominator = (e + f) * (g + h) * (e + g) * (f + h)
    phi = (e * h - f * g) / math.sqrt(denominator) if denominator else 0.0
    d = p1 - p2
    delta = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    epsilon = math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return d - delta, d + epsilon


def test_every_accuracy_has_its_wilson_interval_and_n(default_run):
    methods = default_run["summary"]["methods"]
    assert [m["method"] for m in methods] == ["rsd", "target", "draft"]
    for m in methods:
        mine = verdicts(default_run["records"], m["method"])
        assert m["n"] == len(mine) == 200
        assert m["correct"] == sum(mine.values())
        low, high = proportion_confint(m["correct"], m["n"], alpha=0.05, method="wilson")
        assert m["accuracy_ci"] == pytest.approx([low, high], abs=1e-6)
        assert m["confidence"] == 0.95
        # the terminal table and report.md print the same interval
        cell = f"{m['accuracy']:.1%} [{100 * low:.1f}, {100 * high:.1f}]"
        assert cell in default_run["stdout"] and cell in default_run["report"]


def test_rsd_against_the_target_is_a_paired_test_on_the_same_problems(default_run):
    comparisons = {(c["a"], c["b"]): c for c in default_run["summary"]["comparisons"]}
    assert {("rsd", "target"), ("draft", "target"), ("rsd", "draft")} <= set(comparisons)
    for (a_name, b_name), c in comparisons.items():
        a, b = verdicts(default_run["records"], a_name), verdicts(default_run["records"], b_name)
        a_only = sum(a[i] and not b[i] for i in a)
        b_only = sum(b[i] and not a[i] for i in a)
        assert (c["n"], c["a_only"], c["b_only"]) == (200, a_only, b_only)
        assert c["difference"] == pytest.approx((sum(a.values()) - sum(b.values())) / 200, abs=1e-9)
        assert c["ci"] == pytest.approx(list(newcombe_method10(a, b)), abs=1e-6)
        both = sum(a[i] and b[i] for i in a)
        table = [[both, a_only], [b_only, 200 - both - a_only - b_only]]
        assert c["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue, abs=1e-6)
    rsd_vs_target = comparisons[("rsd", "target")]
    assert rsd_vs_target["ci"][0] < rsd_vs_target["difference"] <= rsd_vs_target["ci"][1]
    low, high = rsd_vs_target["ci"]
    row = f"{100 * rsd_vs_target['difference']:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]"
    assert row in default_run["stdout"] and row in default_run["report"]


def test_columns_mean_what_they_say_on_the_default_run(default_run):
    by_name = {m["method"]: m for m in default_run["summary"]["methods"]}
    rsd = by_name["rsd"]
    assert 0 < rsd["acceptance_rate"] < 1 and 0 < rsd["token_acceptance_rate"] < 1
    kept = rsd["steps_by_source"]["draft"]
    assert rsd["acceptance_rate"] == pytest.approx(kept / (kept + rsd["steps_by_source"]["target"]))
    for name in ("target", "draft"):  # nothing was proposed for anyone to accept
        assert by_name[name]["acceptance_rate"] is None and by_name[name]["token_acceptance_rate"] is None
    assert by_name["target"]["target_step_share"] == 1.0 and by_name["draft"]["target_step_share"] == 0.0
    # the delimiter (a blank line) is written escaped, not as blank lines
    assert 'delimiter: "\\n\\n"' in default_run["report"]


def test_diff_lists_the_problems_where_rsd_and_the_target_disagree(default_run):
    result = rsd_cli("diff", str(default_run["out"]), "--methods", "rsd,target", "--json")
    assert result.returncode == 0, result.stderr
    diff = json.loads(result.stdout)
    rsd, target = verdicts(default_run["records"], "rsd"), verdicts(default_run["records"], "target")
    assert sorted(d["id"] for d in diff["disagreements"]) == sorted(i for i in rsd if rsd[i] != target[i])
    for d in diff["disagreements"]:
        assert d["a"]["correct"] != d["b"]["correct"] and d["question"]
    summary = next(c for c in default_run["summary"]["comparisons"] if (c["a"], c["b"]) == ("rsd", "target"))
    assert (diff["comparison"]["a_only"], diff["comparison"]["b_only"]) == (summary["a_only"], summary["b_only"])

    text = rsd_cli("diff", str(default_run["out"])).stdout  # rsd,target is the default pair
    assert f"{len(diff['disagreements'])} problems where one is right and the other wrong" in text
    for d in diff["disagreements"]:
        assert d["id"] in text


def test_diff_of_two_runs_pairs_one_method_across_them(default_run, tmp_path):
    other = tmp_path / "other"
    result = rsd_cli("eval", "--methods", "draft", "--num-problems", "20", "--out", str(other), "--no-progress")
    assert result.returncode == 0, result.stderr
    diff = json.loads(rsd_cli("diff", str(default_run["out"]), str(other), "--methods", "draft", "--json").stdout)
    assert diff["comparison"]["n"] == 20  # the problems both runs hold
    assert diff["unpaired"] == [180, 0]
    assert diff["comparison"]["a_only"] == diff["comparison"]["b_only"] == 0  # the same greedy draft
    refused = rsd_cli("diff", str(default_run["out"]), "--methods", "rsd,sd")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert "no records of method 'sd'" in refused.stderr
