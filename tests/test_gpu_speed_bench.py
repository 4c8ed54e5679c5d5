"""The GPU speed benchmark at tiny sizes on the CPU, so that it cannot rot: every method runs and every figure is
reported; the threshold calibration keeps the share it is asked for; the lock-step scheme really re-reads."""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_kernels  # noqa: E402
import gpu_speed  # noqa: E402
import phase_profile  # noqa: E402
import pytest  # noqa: E402
import row_copies  # noqa: E402
import torch  # noqa: E402

from rsd.backends import static_decode  # noqa: E402
from rsd.backends.packing import FORWARD_TOKENS_ENV  # noqa: E402
from rsd.backends.split_attention import triton_available  # noqa: E402
from rsd.backends.static_decode import DECODE_ENV  # noqa: E402
from rsd.core import TrajectoryStats  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    report = gpu_speed.main(["--tiny", "--repeats", "2", "--out", str(out)])
    assert json.loads((out / "gpu_speed.json").read_text())["table"] == report["table"]
    return report


def test_tiny_run_reports_every_method_and_figure(report):
    config = report["config"]
    assert [r["batch"] for r in report["results"]] == list(config["batches"])
    for result in report["results"]:
        tokens = result["batch"] * config["steps"] * config["step_tokens"]
        # Every RSD run wrote every token: no trajectory ended early at an EOS the random models might write.
        assert result["tokens_per_run"] == tokens
        assert result["rsd_tokens_checked"] == [tokens] * result["rounds"] and result["rounds"] == 2
        methods = {"target_only", "target_only_hf", "rsd", "lockstep", "draft_alone", "prm_alone"}
        if result["batch"] > 1:  # one row: the rejected rows are target-only's row, not timed twice
            methods.add("target_rewrite_rows")
        assert set(result["seconds_median"]) == methods
        assert all(t > 0 for t in result["seconds_median"].values())
        assert sum(result["rsd_split_share"].values()) == pytest.approx(1.0)
        assert all(result["rsd_split_s"][role] > 0 for role in ("draft", "prm"))
        assert 0.0 < result["rsd_kept_share"] <= 1.0
        assert result["bound"] > 0 and result["bandwidth_bound"] > 0
        assert result["target_only_hf_over_backend"] > 0
        assert result["speedup"] == pytest.approx(
            result["seconds_median"]["target_only"] / result["seconds_median"]["rsd"]
        )
    assert report["table"].count("\n") == len(report["results"])  # a header and one line per batch size
    assert "speed-up" in report["table"] and "RSD/lock" in report["table"]


def test_lockstep_rereads_every_prefix_and_rsd_does_not():
    config = gpu_speed.tiny_config(steps=3)
    models = gpu_speed.build_models(config)
    problems = gpu_speed.make_problems(models.tokenizer, 2, config.prompt_tokens, seed=1, tag="lock")
    run = gpu_speed.run_config(config, batch=2, steps=config.steps)
    prefill = {}
    for lockstep in (False, True):
        decoder = gpu_speed.rsd_decoder(models, run, delta=0.0, lockstep=lockstep)  # keeps every draft step
        trajectories = decoder.run(gpu_speed.fresh(problems, config.steps))
        total = TrajectoryStats()
        for traj in trajectories:
            total.add(traj.stats)
        prefill[lockstep] = (total.models["draft"].prefill_tokens, total.models["prm"].prefill_tokens)
        assert [len(t.steps) for t in trajectories] == [config.steps] * 2
    # Cached: the prompt once, then one token per step. Lock-step: the whole prefix at every step.
    prompt, step = config.prompt_tokens, config.step_tokens
    assert prefill[False][0] == 2 * (prompt + config.steps - 1)
    assert prefill[True][0] == 2 * sum(prompt + k * step for k in range(config.steps))
    assert prefill[True][1] > 2 * prefill[False][1]


def test_target_rewrite_term_follows_the_rejections():
    config = gpu_speed.tiny_config()
    rows_seen = []

    def time_on_rows(rows: int) -> float:
        rows_seen.append(rows)
        return 1.0

    assert gpu_speed.target_rewrite_term(config, 1, time_on_rows) == pytest.approx(0.3)
    assert gpu_speed.target_rewrite_term(config, 64, time_on_rows) == pytest.approx(1.0 - 0.7**64)
    assert rows_seen == [1, 20]


def test_profile_runs_on_the_cpu_and_says_why_there_is_no_graph():
    config = gpu_speed.tiny_config()
    models = gpu_speed.build_models(config)
    row = gpu_speed.profile_forward(models.draft.model, batch=2, context=8, device="cpu", vocab=len(models.tokenizer))
    assert row["wall_ms"] > 0 and row["kernel_ms"] == 0.0
    assert "graph_error" in row and "graph_ms" not in row
    assert torch.get_num_threads() >= 1


def test_sdpa_ab_times_rsd_both_ways_side_by_side():
    report = gpu_speed.main(["--tiny", "--repeats", "1", "--batches", "2", "--sdpa", "ab"])
    (result,) = report["results"]
    assert result["rsd_cudnn_s"] > 0
    assert result["rsd_over_rsd_cudnn"] == pytest.approx(result["rsd_cudnn_s"] / result["seconds_median"]["rsd"])
    assert set(result["rsd_cudnn_split_s"]) == {"draft", "prm", "target", "controller"}
    assert gpu_speed.CUDNN_ATTENTION_ENV not in os.environ  # the switch is put back


def test_decode_ab_times_the_eager_path_side_by_side(monkeypatch):
    # "auto" on the CPU is transformers' forward; the variable sends it through the static buffers instead, so the
    # A/B compares two different paths here too.
    monkeypatch.setenv(DECODE_ENV, "static")
    report = gpu_speed.main(["--tiny", "--repeats", "1", "--batches", "2", "--decode", "ab"])
    (result,) = report["results"]
    t = result["seconds_median"]
    assert {"rsd_eager", "target_only_eager"} <= set(t)
    assert result["rsd_over_rsd_eager"] == pytest.approx(t["rsd_eager"] / t["rsd"])
    assert result["target_only_over_eager"] == pytest.approx(t["target_only_eager"] / t["target_only"])
    assert set(result["rsd_eager_split_s"]) == {"draft", "prm", "target", "controller"}
    assert report["environment"]["decode"] == "ab"


def test_every_method_writes_the_same_tokens_on_either_decode_path(monkeypatch):
    config = gpu_speed.tiny_config()
    models = gpu_speed.build_models(config)
    problems = gpu_speed.make_problems(models.tokenizer, 3, config.prompt_tokens, seed=2, tag="same")
    prompts = gpu_speed.prompt_tensor(models, problems, "cpu")
    monkeypatch.setenv(DECODE_ENV, "static")
    static = gpu_speed.build_models(config)
    assert static.target.decode_mode == "static" and models.target.decode_mode == "eager"
    lean = gpu_speed.greedy_decode(models.target.model, prompts, 10).tolist()
    for generator in (models.target, static.target):
        outputs = gpu_speed.backend_decode(generator, prompts.tolist(), 10)
        assert [o.token_ids for o in outputs] == lean
        assert not generator._caches  # released after the call


def test_prefill_ab_times_rsd_with_one_forward_per_call_side_by_side(monkeypatch):
    # Tiny CPU models never split on their own (a forward costs more than their padding); a price of one token
    # splits at every tail length, so the A/B compares two different prefills here too.
    monkeypatch.setenv(FORWARD_TOKENS_ENV, "1")
    variant_report("prefill", "rsd_one_prefill")


def test_prefill_one_never_splits_and_split_writes_the_same_tokens(monkeypatch):
    monkeypatch.setenv(FORWARD_TOKENS_ENV, "1")
    split = gpu_speed.build_models(gpu_speed.tiny_config())
    one = gpu_speed.build_models(gpu_speed.tiny_config(prefill="one"))
    assert split.target.prefill_forward_tokens == 1 and one.target.prefill_forward_tokens == gpu_speed.ONE_FORWARD
    # The split changes which rows share a forward only.
    shipped_and_changed(split, 4, gpu_speed.with_one_prefill_forward)


def variant_report(flag: str, variant: str) -> dict:
    """A tiny run with `--{flag} ab`: the variant is timed in the same rounds and compared with RSD as shipped."""
    report = gpu_speed.main(["--tiny", "--repeats", "1", "--batches", "3", f"--{flag}", "ab"])
    (result,) = report["results"]
    t = result["seconds_median"]
    assert result[f"rsd_over_{variant}"] == pytest.approx(t[variant] / t["rsd"])
    assert set(result[f"{variant}_split_s"]) == {"draft", "prm", "target", "controller"}
    assert 0 <= result[f"{variant}_kept_share"] <= 1
    assert report["config"][flag.replace("-", "_")] == "ab"
    return result


def shipped_and_changed(models, seed: int, setting) -> tuple:
    """RSD on the same problems and threshold, as shipped and under `setting` (a context that changes one thing)."""
    config = gpu_speed.tiny_config()
    problems = gpu_speed.make_problems(models.tokenizer, 3, config.prompt_tokens, seed=seed, tag=f"same{seed}")
    run_config = gpu_speed.run_config(config, 3, config.steps)

    def run(delta):
        decoder = gpu_speed.rsd_decoder(models, run_config, delta=delta)
        return gpu_speed.run_decoder(decoder, gpu_speed.fresh(problems, config.steps), "cpu")

    delta = statistics.median(run(0.0).rewards)  # some steps kept, some rewritten
    shipped, changed = run(delta), setting(models, lambda: run(delta))
    assert shipped.tokens == changed.tokens and shipped.kept == changed.kept and 0 < shipped.kept < shipped.proposed
    # Every step's reward is the same, so every step's text is.
    assert shipped.rewards == pytest.approx(changed.rewards, abs=1e-5)
    return shipped, changed


def test_arena_prefill_ab_times_rsd_with_transformers_prefill_and_both_write_the_same_tokens(monkeypatch):
    monkeypatch.setenv(DECODE_ENV, "static")
    variant_report("arena-prefill", "rsd_transformers_prefill")
    models = gpu_speed.build_models(gpu_speed.tiny_config())
    models.prm.arena_prefill = True  # as on a GPU
    holders = (models.draft, models.target, models.prm)
    seen = gpu_speed.with_transformers_prefill(models, lambda: [holder.arena_prefill for holder in holders])
    assert seen == [False, False, False]
    shipped_and_changed(models, 9, gpu_speed.with_transformers_prefill)
    assert all(holder.arena_prefill for holder in holders)  # put back


def test_overlap_ab_times_rsd_with_host_and_gpu_taking_turns_and_both_write_the_same_tokens(monkeypatch):
    monkeypatch.setenv(DECODE_ENV, "static")
    variant_report("overlap", "rsd_no_overlap")
    models = gpu_speed.build_models(gpu_speed.tiny_config())
    shipped_and_changed(models, 7, gpu_speed.without_overlap)
    assert models.draft.overlap_decode and models.target.overlap_decode  # put back


def test_prefill_scale_times_rsd_with_other_prices_side_by_side_and_puts_them_back():
    report = gpu_speed.main(["--tiny", "--repeats", "1", "--batches", "3", "--prefill-scale", "0.5"])
    (result,) = report["results"]
    assert result["rsd_over_rsd_prefill_scaled"] == pytest.approx(
        result["seconds_median"]["rsd_prefill_scaled"] / result["seconds_median"]["rsd"]
    )
    models = gpu_speed.build_models(gpu_speed.tiny_config())
    prices = [m.prefill_forward_tokens for m in (models.draft, models.target, models.prm)]
    seen = gpu_speed.with_prefill_prices(
        models, lambda price: price // 2, lambda: [m.prefill_forward_tokens for m in (models.draft, models.target)]
    )
    assert seen == [price // 2 for price in prices[:2]]
    assert [m.prefill_forward_tokens for m in (models.draft, models.target, models.prm)] == prices


def test_kernels_ab_times_one_decode_token_each_way():
    report = gpu_speed.main(["--tiny", "--repeats", "1", "--batches", "2", "--kernels", "ab"])
    table = report["replay_ms"]
    assert {(r["model"], r["rows"]) for r in table} == {("draft", 2), ("target", 2)}
    for row in table:
        assert all(row[f"{variant}_ms"] > 0 for variant in gpu_speed.REPLAY_VARIANTS)
        assert row["speedup"] == pytest.approx(row["modules_ms"] / row["fused_ms"])
        assert row["projections_speedup"] == pytest.approx(row["fused_ms"] / row["projections_ms"])
        assert row["compiled_speedup"] == pytest.approx(row["projections_ms"] / row["compiled_ms"])


def test_projections_ab_times_rsd_and_target_only_unfused_and_both_write_the_same_tokens(monkeypatch):
    monkeypatch.setenv(DECODE_ENV, "static")  # the fused products are the static decode path's
    result = variant_report("projections", "rsd_unfused")
    t = result["seconds_median"]
    assert result["target_only_over_unfused"] == pytest.approx(t["target_only_unfused"] / t["target_only"])
    models = gpu_speed.build_models(gpu_speed.tiny_config())
    decoders = [models.draft.static_decoder, models.target.static_decoder]
    seen = gpu_speed.without_fused_projections(models, lambda: [d.fuse_projections for d in decoders])
    assert seen == [False, False]
    assert all(d.fuse_projections and d._projections is not None for d in decoders)  # put back
    shipped_and_changed(models, 8, gpu_speed.without_fused_projections)


def test_phase_profile_times_every_phase_and_puts_the_backend_back(monkeypatch, tmp_path):
    monkeypatch.setenv(DECODE_ENV, "static")
    originals = [owner.__dict__[name] for owner, name, _, _ in phase_profile.GENERATOR_PHASES]
    (result,) = phase_profile.main(["--tiny", "--batches", "3", "--kernels", "--out", str(tmp_path)])
    phases = result["phases [seconds, host seconds, calls]"]
    timed = ("call", "prefill", "prefill: own forward in the arena", "decode forward (static, graphs on a GPU)")
    for model in ("draft", "target"):
        for phase in timed:
            seconds, host, calls = phases[f"{model}/{phase}"]
            assert seconds > 0 and 0 <= host <= seconds + 1e-6 and calls > 0
    steps = gpu_speed.tiny_config().steps
    assert phases["prm/call"][2] == phases["prm/forward"][2] == steps  # one scoring call per step, one forward each
    # A phase inside a call is part of it.
    assert phases["target/decode forward (static, graphs on a GPU)"][0] <= phases["target/call"][0]
    # Every arena prefill's shape is counted, [rows, tokens] over the arena's columns, once per forward.
    for model in ("draft", "target"):
        shapes = result["prefill shapes"][f"{model}/prefill: own forward in the arena"]
        assert sum(shapes.values()) == phases[f"{model}/prefill: own forward in the arena"][2]
        assert all(re.fullmatch(r"[1-3]x\d+ over \d+", shape) for shape in shapes)
        # --kernels: the same forwards profiled in a run of their own (on the CPU, operators stand for kernels).
        kernels = result["prefill kernels"][f"{model}/prefill: own forward in the arena"]
        assert kernels["kernel_ms"] > 0 and kernels["launches"] > 0 and kernels["top_kernels"]
        assert sum(kernels["kinds_ms"].values()) == pytest.approx(kernels["kernel_ms"], abs=0.01)
    # --real-lengths: the tiny models at the benchmark's lengths, decoding in the arena as on a GPU.
    real = phase_profile.profile_config(tiny=True, real_lengths=True, batches=[64])
    assert (real.tiny, real.device, real.decode, real.batches) == (True, "cpu", "static", (64,))
    assert (real.prompt_tokens, real.step_tokens, real.steps) == (256, 64, 8)
    with pytest.raises(SystemExit):
        phase_profile.main(["--real-lengths"])
    # A packed prefill (on CUDA) counts its rows and their tokens, as the padded one counts its [rows, tokens].
    packed = (SimpleNamespace(width=512), 0, [[1, 2], [3]], [0, 4])
    assert phase_profile.prefill_shape(packed) == "2 rows, 3 tokens packed over 512"
    assert json.loads((tmp_path / "phase_profile.json").read_text())["results"][0]["batch"] == 3
    assert [owner.__dict__[name] for owner, name, _, _ in phase_profile.GENERATOR_PHASES] == originals


@pytest.mark.slow
def test_decode_kernel_profile_reports_every_model_rows_and_attention(tmp_path):
    report = decode_kernels.main(["--tiny", "--rows", "1", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "decode_kernels.json").read_text())["results"] == report["results"]
    seen = [(r["model"], r["rows"], r["variant"]) for r in report["results"]]
    # Off CUDA rsd's kernels run through Triton's interpreter (conftest.py), where Triton is installed.
    kinds = ("torch", "split", "triton") if triton_available() else ("torch",)
    assert seen == [(m, n, a) for m in ("draft", "target") for n in (1, 2) for a in kinds]
    for row in report["results"]:
        assert row["token_ms"] > 0 and row["kernel_ms"] > 0 and row["launches"] > 0
        assert row["top_kernels"] and sum(row["kinds_ms"].values()) == pytest.approx(row["kernel_ms"])
        # The floor counts each weight once: the tied draft's embedding is its head, the target's is left out.
        assert row["weight_gib"] > 0 and row["arena_gib"] > 0
    assert decode_kernels.kernel_kind("sm90_xmma_gemm_bf16bf16") == "matrix products"
    assert decode_kernels.kernel_kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert decode_kernels.kernel_kind("void at::native::indexFuncLargeIndex<>") == "rotation and arena writes"
    assert decode_kernels.kernel_kind("attention_combine") == "attention"


def test_triton_ab_times_rsd_and_target_only_without_the_kernels_and_both_write_the_same_tokens(monkeypatch):
    monkeypatch.setenv(DECODE_ENV, "static")  # the kernels are the static decode path's
    result = variant_report("triton", "rsd_no_triton")
    t = result["seconds_median"]
    assert result["target_only_over_no_triton"] == pytest.approx(t["target_only_no_triton"] / t["target_only"])
    if not triton_available():
        return
    models = gpu_speed.build_models(gpu_speed.tiny_config())
    decoders = [models.draft.static_decoder, models.target.static_decoder]
    for decoder in decoders:  # as shipped on a GPU; here through Triton's interpreter
        decoder.attention, decoder.layer_kernels = "split", True
    seen = gpu_speed.without_triton_kernels(models, lambda: [(d.attention, d.layer_kernels) for d in decoders])
    assert seen == [("sdpa", False)] * 2
    assert all((d.attention, d.layer_kernels) == ("split", True) for d in decoders)  # put back
    shipped_and_changed(models, 9, gpu_speed.without_triton_kernels)


@pytest.mark.slow
def test_packed_prefill_ab_times_rsd_with_padded_prefills_and_both_write_the_same_tokens(monkeypatch):
    monkeypatch.setenv(DECODE_ENV, "static")  # the packed prefill is the static path's
    variant_report("packed-prefill", "rsd_padded_prefill")
    if not triton_available():
        return
    models = gpu_speed.build_models(gpu_speed.tiny_config())
    models.prm.arena_prefill = True  # as on a GPU; here through Triton's interpreter
    decoders = [models.draft.static_decoder, models.target.static_decoder, models.prm.arena_decoder()]
    for decoder in decoders:
        decoder.attention, decoder.layer_kernels = "split", True
    assert all(d.packed_prefill for d in decoders)
    seen = gpu_speed.with_padded_prefills(models, lambda: [d.packed_prefill for d in decoders])
    assert seen == [False] * 3
    assert all(d.packed_prefill for d in decoders)  # put back
    shipped_and_changed(models, 10, gpu_speed.with_padded_prefills)


def test_row_copies_time_the_gather_and_the_slices_side_by_side(tmp_path):
    report = row_copies.main(["--tiny", "--rows", "3", "5", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "row_copies.json").read_text())["results"] == report["results"]
    for result, rows in zip(report["results"], (3, 5), strict=True):  # both copied the same values (else it raises)
        assert result["rows"] == rows and result["mib_per_call"] > 0
        for method in ("gather", "slices"):
            assert 0 < result[f"{method}_host_ms"] <= result[f"{method}_ms"]
        assert result["gather_over_slices"] == pytest.approx(result["gather_ms"] / result["slices_ms"], abs=0.01)
    # Each row as RSD leaves it: a prefix right-aligned to one column, a hole, then its tail and decoded tokens.
    for columns in row_copies.row_columns(20, prefix_end=100, tail_end=300, seed=1):
        assert columns == sorted(set(columns)) and columns[-1] == 300 + 62
        assert len(static_decode.column_runs(columns)) == 2
