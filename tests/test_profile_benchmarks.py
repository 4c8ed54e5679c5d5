"""The engine's profiling benchmarks at tiny sizes on the CPU, so that they cannot rot: `phase_profile.py` times
every phase of an RSD run and puts the engine back as it was; `decode_kernels.py` times and profiles one decode token
per model and row count, every round over the same context."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_kernels  # noqa: E402
import gpu_speed  # noqa: E402
import phase_profile  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rsd.engine.kv_cache import WIDTH_BUCKET  # noqa: E402


@pytest.mark.slow
def test_phase_profile_times_every_phase_and_puts_the_engine_back(tmp_path):
    originals = [owner.__dict__[name] for owner, name, _, _ in phase_profile.ENGINE_PHASES]
    (result,) = phase_profile.main(["--tiny", "--batches", "3", "--kernels", "--out", str(tmp_path)])
    phases = result["phases [seconds, host seconds, calls]"]
    arena_forward = phase_profile.ARENA_FORWARD
    timed = ("call", "prefill", arena_forward, "decode forward (graphs on a GPU)", "stop checks (host)")
    for model in ("draft", "target"):
        for phase in timed:
            seconds, host, calls = phases[f"{model}/{phase}"]
            # A host-only phase of a few tokens can take less than the clock's resolution.
            assert seconds >= 0 and 0 <= host <= seconds + 1e-6 and calls > 0
    steps = gpu_speed.tiny_config().steps
    # One scoring call per step, one forward in the arena each (the PRM's Qwen2 body runs in the engine).
    assert phases["prm/call"][2] == phases[f"prm/{arena_forward}"][2] == steps
    assert "prm/transformers forward" not in phases
    assert not [phase for phase in phases if phase.endswith(phase_profile.GRAPH_CAPTURE)]  # no graphs on the CPU
    # A phase inside a call is part of it.
    assert phases["target/decode forward (graphs on a GPU)"][0] <= phases["target/call"][0]
    assert phases[f"draft/{arena_forward}"][0] <= phases["draft/prefill"][0] <= phases["draft/call"][0]
    # Every forward's shape is counted, its rows and tokens over the arena's columns, once per forward.
    for model in ("draft", "target", "prm"):
        shapes = result["forward shapes"][f"{model}/{arena_forward}"]
        assert sum(shapes.values()) == phases[f"{model}/{arena_forward}"][2]
        assert all(re.fullmatch(rf"[1-3] rows, \d+ tokens over {WIDTH_BUCKET}", shape) for shape in shapes)
        # --kernels: the same forwards profiled in a run of their own (on the CPU, operators stand for kernels).
        kernels = result["forward kernels"][f"{model}/{arena_forward}"]
        assert kernels["kernel_ms"] > 0 and kernels["launches"] > 0 and kernels["top_kernels"]
        assert sum(kernels["kinds_ms"].values()) == pytest.approx(kernels["kernel_ms"], abs=0.01)
    # --real-lengths: the tiny models at the benchmark's lengths.
    real = phase_profile.profile_config(tiny=True, real_lengths=True, batches=[64])
    assert (real.tiny, real.device, real.batches) == (True, "cpu", (64,))
    assert (real.prompt_tokens, real.step_tokens, real.steps) == (256, 64, 8)
    with pytest.raises(SystemExit):
        phase_profile.main(["--real-lengths"])
    feed = SimpleNamespace(rows=[(0, 0, 2), (1, 2, 1)], ids=[1, 2, 3])
    assert phase_profile.forward_shape((None, SimpleNamespace(width=512), feed, [2])) == "2 rows, 3 tokens over 512"
    assert json.loads((tmp_path / "phase_profile.json").read_text())["results"][0]["batch"] == 3
    assert [owner.__dict__[name] for owner, name, _, _ in phase_profile.ENGINE_PHASES] == originals


def test_decode_kernel_profile_reports_every_model_and_row_count(tmp_path):
    report = decode_kernels.main(["--tiny", "--rows", "1", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "decode_kernels.json").read_text())["results"] == report["results"]
    assert [(r["model"], r["rows"]) for r in report["results"]] == [(m, n) for m in ("draft", "target") for n in (1, 2)]
    for row in report["results"]:
        assert row["token_ms"] > 0 and row["kernel_ms"] > 0 and row["launches"] > 0
        assert row["top_kernels"] and sum(row["kinds_ms"].values()) == pytest.approx(row["kernel_ms"])
        # The floor counts each weight once: the tied draft's embedding is its head, the target's is left out.
        assert row["weight_gib"] > 0 and row["arena_gib"] > 0
        # On the CPU in float32 the engine runs torch operations, without graphs; each row's own path is recorded.
        assert (row["kernels"], row["graphs"], row["width"]) == (False, False, WIDTH_BUCKET)
    assert "draft | 2 | torch |" in decode_kernels.report_lines(report["results"])
    assert decode_kernels.kernel_kind("sm90_xmma_gemm_bf16bf16") == "matrix products"
    assert decode_kernels.kernel_kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert decode_kernels.kernel_kind("void at::native::indexFuncLargeIndex<>") == "rotation and arena writes"
    assert decode_kernels.kernel_kind("attention_combine") == "attention"
    assert decode_kernels.path_name({"kernels": True, "graphs": True}) == "triton + graphs"


def test_decode_kernel_rounds_read_the_same_context():
    config = gpu_speed.tiny_config()
    tokenizer = gpu_speed.make_word_tokenizer(gpu_speed.TINY_SHAPES["draft"].vocab)
    model = gpu_speed.build_lm(gpu_speed.TINY_SHAPES["draft"], tokenizer, "cpu", getattr(torch, config.dtype), 0)
    with torch.inference_mode():
        runner, ids = decode_kernels.blank_rows(model, rows=3, width=64, tokens=5)
        arena = runner.arena
        assert (runner.slots, ids.tolist(), arena.next[:3], arena.width) == (4, [0] * 4, [32] * 3, WIDTH_BUCKET)
        first = runner.decode(ids).clone()
        runner.rollback([1] * runner.slots)
        decode_kernels.decoded(runner, ids, 5)
        assert arena.next[:3] == arena.position[:3] == [32] * 3  # back where the round began
        torch.testing.assert_close(runner.decode(ids), first)  # the same token at the same column
    with pytest.raises(SystemExit, match="--width 64 leaves room for 32 decode tokens, not 50"):
        decode_kernels.blank_rows(model, rows=1, width=64, tokens=50)
