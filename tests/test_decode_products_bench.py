"""The decode-products benchmark at tiny sizes on the CPU (Triton's interpreter), so that it cannot rot: every
product is timed both ways and checked against torch, and its grid of plans only holds plans that can run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_products  # noqa: E402

from rsd.engine.kernels import decode_matmul  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed: pip install -e '.[dev]' brings it")


def test_every_product_is_timed_both_ways_and_computes_what_torch_computes(tmp_path):
    report = decode_products.main(["--tiny", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "decode_products.json").read_text())["results"] == report["results"]
    assert [r["product"] for r in report["results"]] == list(decode_products.PRODUCTS)
    for result in report["results"]:
        assert result["kernels_ms"] > 0 and result["products_ms"] > 0
        assert [plan["chosen"] for plan in result["plans"]] == [True]  # without --sweep, the engine's plan only
        assert result["best"]["error"] < 1e-5  # float32 through the interpreter: torch's result to rounding


def test_the_sweep_grid_splits_only_into_whole_inner_blocks_and_fits_shared_memory():
    plans = decode_products.sweep_plans(decode_matmul, rows=16, features=1536, inner=8960, sms=132)
    assert plans and all(plan.block_rows == 16 for plan in plans)
    assert all(8960 // plan.splits >= plan.block_inner for plan in plans)
    assert all(plan.block_features * plan.block_inner * 2 * plan.stages <= 160 * 1024 for plan in plans)
    assert {plan.splits for plan in plans} == {1, 2, 4, 8}
