"""`rsd eval`, `rsd sweep` and `rsd merge` on tiny models and a real JSONL file, run as a user runs them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from tiny import make_qwen2_lm, make_tokenizer  # noqa: E402
from tiny_prm import make_qwen_prm  # noqa: E402

from rsd.cli import main  # noqa: E402

ALL_METHODS = "rsd,target,draft,sd,best-of-n,majority,rsd-best-of-n,rsd-majority"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    tokenizer = make_tokenizer()
    problems = root / "problems.jsonl"
    with problems.open("w") as f:
        for i in range(16):
            f.write(json.dumps({"idx": i, "q": f"What is {i} + {i}?", "a": str(2 * i)}) + "\n")
    return {
        "root": root,
        "problems": problems,
        "draft": make_qwen2_lm(root / "draft", tokenizer, seed=1),
        "target": make_qwen2_lm(root / "target", tokenizer, hidden_size=128, heads=2, seed=2),
        "prm": make_qwen_prm(root / "prm", seed=3),
    }


def eval_args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "rsd.cli", "eval",
        "--draft", str(setup["draft"]), "--target", str(setup["target"]), "--prm", str(setup["prm"]),
        "--dataset", str(setup["problems"]), "--question-field", "q", "--answer-field", "a",
        "--max-new-tokens", "24", "--step-max-tokens", "6", "--delta", "0.5", "--device", "cpu",
        "--out", str(out), "--no-progress", "--grade-workers", "1", *extra,
    ]  # fmt: skip


def run(args: list[str]) -> dict:
    """Run in this process (the kill test starts a real process): the same `main` the console script calls."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args[3:], "--json"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def comparable(summary: dict) -> list[dict]:
    """A summary without wall times, which no two runs share."""
    drop = {"wall_time_s", "wall_time_by_model_s"}
    return [{k: v for k, v in m.items() if k not in drop} for m in summary["methods"]]


def records_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def test_every_method_runs_in_one_table(setup):
    out = setup["root"] / "all"
    summary = run(eval_args(setup, out, "--methods", ALL_METHODS, "--n", "2", "--num-problems", "4"))
    methods = [m["method"] for m in summary["methods"]]
    assert methods == ALL_METHODS.split(",")
    for m in summary["methods"]:
        assert m["n"] == 4
        assert set(m["flops"]) == {"draft", "target", "prm", "total"}
        assert m["flops"]["total"] > 0
        assert 0.0 <= m["accuracy"] <= 1.0
    by_name = {m["method"]: m for m in summary["methods"]}
    assert by_name["target"]["flops_vs_target"] == pytest.approx(1.0)
    assert by_name["draft"]["flops"]["target"] == 0 and by_name["draft"]["target_step_share"] == 0
    assert by_name["rsd"]["flops"]["prm"] > 0
    assert by_name["best-of-n"]["flops"]["prm"] > 0  # the PRM ranked the samples
    assert by_name["best-of-n"]["wall_time_by_model_s"]["prm"] > 0  # and its time counts in the method's
    assert by_name["majority"]["flops"]["prm"] == 0
    assert 0.0 <= by_name["sd"]["speculation"]["token_acceptance_rate"] <= 1.0
    for name in ("records.jsonl", "summary.json", "report.md", "config.json"):
        assert (out / name).is_file()
    records = records_of(out)
    assert len(records) == 4 * len(methods)
    bon = next(r for r in records if r["method"] == "best-of-n")
    assert len(bon["samples"]) == 2 and bon["response"] == bon["samples"][bon["chosen"]]["text"]
    assert "rsd" in (out / "report.md").read_text()
    check_columns_mean_what_they_say(summary, out)


def check_columns_mean_what_they_say(summary: dict, out: Path) -> None:
    """Acceptance only where something was accepted, sd's token acceptance in the table, N in the names of
    N-sample methods, pass@k for them, and every method paired with the target (RSD with every baseline)."""
    by_name = {m["method"]: m for m in summary["methods"]}
    for name in ("target", "draft", "best-of-n", "majority"):  # nothing proposed for anyone to accept
        assert by_name[name]["acceptance_rate"] is None and by_name[name]["token_acceptance_rate"] is None
    for name in ("rsd", "rsd-best-of-n", "rsd-majority"):
        assert by_name[name]["acceptance_rate"] is not None
    sd = by_name["sd"]
    assert sd["token_acceptance_rate"] == sd["speculation"]["token_acceptance_rate"]
    assert sd["target_step_share"] is None and sd["steps_by_source"]["mixed"] == sd["steps"]
    assert by_name["best-of-n"]["display"] == "best-of-n (N=2, min)"
    assert by_name["majority"]["display"] == "majority (N=2)"
    for name in ("best-of-n", "majority", "rsd-best-of-n", "rsd-majority"):
        sampled = by_name[name]
        assert list(sampled["pass_at_k"]) == ["1", "2"]
        assert sampled["pass_at_k"]["2"] == sampled["coverage"]["accuracy"]
        assert len(sampled["coverage"]["accuracy_ci"]) == 2
    pairs = {(c["a"], c["b"]) for c in summary["comparisons"]}
    assert {(m, "target") for m in by_name if m != "target"} <= pairs
    assert {("rsd", b) for b in ("draft", "sd", "best-of-n", "majority")} <= pairs

    report = (out / "report.md").read_text()
    table = report.split("## Paired comparisons")[0]
    sd_row = next(line for line in table.splitlines() if line.startswith("| sd |"))
    assert f"{sd['token_acceptance_rate']:.1%}" in sd_row
    assert "| best-of-n (N=2, min) |" in table and "| majority (N=2) |" in table
    assert "## Sampling methods" in report and "pass@2" in report


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(setup):
    reference = run(eval_args(setup, setup["root"] / "whole", "--methods", "rsd,target", "--batch-size", "1"))

    out = setup["root"] / "killed"
    args = eval_args(setup, out, "--methods", "rsd,target", "--batch-size", "1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = out / "records.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and records.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = records.read_text().count("\n")
    assert 5 <= partial < 32

    resumed = run(args)
    recs = records_of(out)
    keys = [(r["method"], r["id"]) for r in recs]
    assert len(keys) == len(set(keys)) == 32, "a problem was lost or done twice"
    assert comparable(resumed) == comparable(reference)


def test_resume_refuses_another_configuration(setup):
    out = setup["root"] / "conf"
    run(eval_args(setup, out, "--methods", "draft", "--num-problems", "2"))
    args = eval_args(setup, out, "--methods", "draft", "--num-problems", "2", "--max-steps", "3")
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "another configuration" in result.stderr and "max_steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_shards_merge_into_the_whole_run(setup):
    whole = run(eval_args(setup, setup["root"] / "unsharded", "--methods", "rsd,draft", "--num-problems", "6"))
    shards = []
    for i in range(2):
        folder = setup["root"] / f"shard{i}"
        run(eval_args(setup, folder, "--methods", "rsd,draft", "--num-problems", "6", "--shard", f"{i}/2"))
        shards.append(str(folder))
    merged = run([sys.executable, "-m", "rsd.cli", "merge", *shards, "--out", str(setup["root"] / "merged")])
    assert comparable(merged) == comparable(whole)


def test_sweep_writes_a_table_and_a_plot(setup):
    out = setup["root"] / "sweep"
    args = eval_args(setup, out, "--num-problems", "3")
    args[args.index("eval")] = "sweep"
    summary = run([*args, "--deltas", "0,0.5,1.01", "--policies", "threshold,clip"])
    labels = [m["method"] for m in summary["methods"]]
    assert labels[:2] == ["target", "draft"]
    assert "rsd[threshold,delta=0]" in labels and "rsd[clip]" in labels
    by_label = {m["method"]: m for m in summary["methods"]}
    assert by_label["rsd[threshold,delta=0]"]["target_step_share"] == 0.0
    assert by_label["rsd[threshold,delta=1.01]"]["target_step_share"] == 1.0
    png = out / "tradeoff.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
