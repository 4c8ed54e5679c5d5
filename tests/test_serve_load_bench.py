"""The serving load benchmark at a tiny scale, so that it cannot rot: it starts `rsd serve` on the tiny world, runs
closed-loop clients at two levels, times the decoder alone, and writes every figure it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


@pytest.mark.slow
def test_a_short_run_reports_every_level_and_the_reference(tmp_path):
    command = [sys.executable, str(SCRIPT), "--levels", "1,2", "--seconds", "2", "--warmup", "1"]
    command += ["--reference", "4", "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "serve_load.json").read_text())
    levels = result["tinyworld"]["levels"]
    assert [level["clients"] for level in levels] == [1, 2]
    for level in levels:
        assert level["completed"] > 0 and level["failed"] == 0 and not level["errors"]
        assert level["requests_per_s"] > 0 and level["tokens_per_s"] > level["requests_per_s"]
        assert 0 < level["first_step_p50"] <= level["latency_p50"] <= level["latency_p99"]
    assert set(result["reference_problems_per_s"]) == {"1", "8", "32"}
    assert result["environment"]["cpu_cores"] >= 1 and result["environment"]["torch"]
    # What it prints: the table, the three checks and the reference's bounds.
    assert "| 2 |" in run.stdout and "no failed request: yes" in run.stdout
    assert "a ceiling for the server's throughput ratio" in run.stdout
