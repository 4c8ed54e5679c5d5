"""RSD over real vLLM servers (the CPU build) against the in-process path, and the failure modes of serving.

The tests that need servers start them, carry the `served` marker, and skip, saying why, when RSD_VLLM_PYTHON does
not point at a python with vLLM (`bash scripts/setup_vllm_cpu.sh` makes one). Three sets of servers start one after
the other: the tiny world's draft, target and PRM (RSD end to end on 50 problems); tiny random PRMs in the
Math-Shepherd, RLHFlow and token-classification layouts; then random tiny draft and target, a Skywork PRM converted
for vLLM and a Qwen PRM.
Starting the servers takes most of this file's time (4-6 min on 2 cores); everything runs in float32 on both sides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_qwen2_lm, make_tokenizer  # noqa: E402
from tiny_prm import BUILDERS as PRM_BUILDERS  # noqa: E402
from tiny_prm import make_prm_tokenizer, make_qwen_prm, make_skywork_prm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from vllm_servers import (  # noqa: E402
    free_port,
    prometheus_counter,
    serving,
    start_vllm_server,
    vllm_python,
    wait_until_ready,
)

from rsd.async_loop import AsyncStepwiseDecoder  # noqa: E402
from rsd.backends.hf import HFStepGenerator  # noqa: E402
from rsd.backends.openai import (  # noqa: E402
    ServedStepGenerator,
    ServerOptions,
    parse_server_urls,
    stop_reason_of,
)
from rsd.core import RewardRequest, RSDError, StepParams, StepRequest, StopReason, Trajectory  # noqa: E402
from rsd.eval.harness import default_tinyworld_model  # noqa: E402
from rsd.eval.prompts import DEFAULT_TEMPLATE, build_prompt  # noqa: E402
from rsd.loop import Prompted, RunConfig, StepwiseDecoder  # noqa: E402
from rsd.policies import DEFAULT_DELTA, Threshold  # noqa: E402
from rsd.rewards import load_prm  # noqa: E402
from rsd.rewards.formats import QWEN_PRM_STEP_TAG  # noqa: E402
from rsd.rewards.pooling import FORMAT_MARK, ROUTES, ServedRewardModel, convert_skywork  # noqa: E402
from rsd.tinyworld.task import is_correct_answer, last_boxed_value, load_tinyworld  # noqa: E402

hf_logging.disable_progress_bar()
VLLM_PYTHON = vllm_python()
NO_VLLM = "no vLLM environment: run `bash scripts/setup_vllm_cpu.sh`, set RSD_VLLM_PYTHON to that venv's python"
needs_vllm = pytest.mark.skipif(VLLM_PYTHON is None, reason=NO_VLLM)


def vllm(test):
    """A test (or class) that starts real vLLM servers: marked `served`, skipped without a vLLM environment."""
    return pytest.mark.served(needs_vllm(test))


FAST_FAIL = ServerOptions(retries=2, backoff_s=0.1, connect_timeout_s=2.0, timeout_s=60.0)
QUESTIONS = [f"Tom has {a} apples and buys {b} more. How many apples does he have?" for a, b in
             [(3, 4), (5, 2), (12, 7), (9, 9), (1, 8), (20, 5), (6, 6), (14, 3), (2, 11), (8, 1)]] + [
             f"A train travels {v} miles per hour for {h} hours. How far does it go?" for v, h in
             [(60, 2), (45, 3), (30, 5), (80, 1), (55, 4), (70, 2), (25, 6), (90, 3), (40, 7), (65, 5)]]  # fmt: skip


# -- no server needed ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"finish_reason": "stop", "stop_reason": "\n\n"}, StopReason.DELIMITER),  # vLLM: a stop string
        ({"finish_reason": "stop", "stop_reason": None}, StopReason.EOS),  # vLLM: the EOS token
        ({"finish_reason": "stop", "stop_reason": 151645}, StopReason.EOS),  # vLLM: another stop token id
        ({"finish_reason": "length", "stop_reason": None}, StopReason.LENGTH),
        ({"finish_reason": "stop", "matched_stop": "\n\n"}, StopReason.DELIMITER),  # SGLang
        ({"finish_reason": "stop", "matched_stop": 151643}, StopReason.EOS),
        ({"finish_reason": "stop", "matched_stop": None}, StopReason.EOS),
        ({"finish_reason": "length", "matched_stop": None}, StopReason.LENGTH),
    ],
)
def test_stop_reasons_follow_vllm_and_sglang_conventions(choice, expected):
    assert stop_reason_of(choice, "\n\n") is expected


def test_unexpected_finish_or_stop_string_is_an_error():
    with pytest.raises(RSDError, match="finish_reason 'abort'"):
        stop_reason_of({"finish_reason": "abort"}, "\n\n")
    with pytest.raises(RSDError, match="did not send"):
        stop_reason_of({"finish_reason": "stop", "stop_reason": "###"}, "\n\n")


def test_server_urls_are_parsed_with_replicas():
    roots = parse_server_urls("http://a:8000/v1, http://b:8000/v1/,https://c/v1,http://a:8000", "draft")
    assert roots == ["http://a:8000", "http://b:8000", "https://c"]
    with pytest.raises(RSDError, match="not a server URL"):
        parse_server_urls("a:8000/v1", "target")


def test_unreachable_server_is_one_clear_error_at_start():
    start = time.monotonic()
    with pytest.raises(RSDError, match=r"cannot reach the target server at http://127.0.0.1:9/v1"):
        ServedStepGenerator("http://127.0.0.1:9/v1", role="target", options=FAST_FAIL)
    assert time.monotonic() - start < 10


def test_converted_skywork_keeps_every_weight_and_its_format(tmp_path):
    from safetensors.torch import load_file

    source = make_skywork_prm(tmp_path / "skywork")
    out = convert_skywork(source, tmp_path / "converted")
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(before["v_head.summary.weight"], after["score.weight"])
    assert torch.equal(before["v_head.summary.bias"], after["score.bias"])
    assert {k for k in before if not k.startswith("v_head.")} == {k for k in after if not k.startswith("score.")}
    config = (out / "config.json").read_text()
    assert '"Qwen2ForSequenceClassification"' in config and f'"{FORMAT_MARK}": "skywork"' in config
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    with pytest.raises(RSDError, match="not a Skywork PRM"):
        convert_skywork(out, tmp_path / "again")


# -- real vLLM servers --------------------------------------------------------------------------------------------
# Three sets of servers, one set running at a time (two cores): each class below starts its set in a class-scoped
# fixture and stops it when the class ends; the module's `servers` start at their first test, after the classes,
# and stop when the module ends. Keep the classes above the module-level tests that use `servers`.
REWARD_REQUESTS = [
    RewardRequest(i, q, [f"Step {k}: {i} + {k} = {i + k}." for k in range(1, 2 + i % 4)])
    for i, q in enumerate(QUESTIONS[:6])
] + [RewardRequest("delimiter in the question", "Solve:\n\nwhat is 2 + 2?", ["2 + 2 = 4.", "\\boxed{4}"])]


def assert_served_rewards_match(served: ServedRewardModel, local) -> None:
    """The served PRM gives the in-process PRM's rewards (float32 on both sides) on the same inputs."""
    want = [o.reward for o in local.score_steps(REWARD_REQUESTS)]
    got = [o.reward for o in served.score_steps(REWARD_REQUESTS)]
    assert got == pytest.approx(want, abs=1e-4)
    assert len({round(r, 3) for r in got}) > 3  # rewards that differ: a wrong position or label would show


@pytest.fixture
def one_torch_thread():
    """The in-process models beside the servers: one thread, as `rsd eval` uses for the tiny world."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINYWORLD_ROLES = ("draft", "target", "prm")
TINYWORLD_PROBLEMS = 50


@pytest.fixture(scope="class")
def tinyworld(tmp_path_factory):
    """The committed tiny-world draft, target and PRM, each behind a vLLM server. Both sides load one copy of the
    weights: the committed ones may be retrained while the tests run."""
    if VLLM_PYTHON is None:
        pytest.skip(NO_VLLM)
    root = tmp_path_factory.mktemp("tinyworld")
    models = {role: Path(shutil.copytree(default_tinyworld_model(role), root / role)) for role in TINYWORLD_ROLES}
    tag_id = AutoTokenizer.from_pretrained(models["prm"]).convert_tokens_to_ids(QWEN_PRM_STEP_TAG)
    generating = ["--enable-prompt-tokens-details"]
    pooler = json.dumps({"pooling_type": "STEP", "step_tag_id": tag_id})
    step_pooling = ["--runner", "pooling", "--pooler-config", pooler]
    started = {
        "draft": start_vllm_server(models["draft"], log_dir=root, extra_args=generating),
        "target": start_vllm_server(models["target"], log_dir=root, extra_args=generating),
        "prm": start_vllm_server(models["prm"], log_dir=root, extra_args=step_pooling),
    }
    with serving(started) as servers:
        yield models, servers


def decisions(traj: Trajectory) -> list[tuple[bool, str]]:
    return [(step.kept, step.source) for step in traj.steps]


def step_statistics(traj: Trajectory) -> dict:
    """What both paths must count alike; prefill tokens differ by design (KV cache vs the server's block cache)."""
    stats = traj.stats.to_dict()
    tokens = {k: v for k, v in stats["tokens"].items() if k != "prm"}
    return {k: stats[k] for k in ("num_steps", "steps_kept", "steps_rejected")} | {
        "tokens": tokens,
        "decode": {role: usage["decode_tokens"] for role, usage in stats["models"].items()},
        "finish": traj.finish_reason,
    }


def agreement(local: list[Trajectory], served: list[Trajectory]) -> dict[str, float]:
    """The share of problems on which the served run agrees with the in-process one, by what is compared."""
    pairs = list(zip(local, served, strict=True))
    assert [a.key for a, _ in pairs] == [b.key for _, b in pairs]

    def share(same) -> float:
        return sum(same) / len(pairs)

    return {
        "decisions": share(decisions(a) == decisions(b) for a, b in pairs),
        "answers": share(last_boxed_value(a.text) == last_boxed_value(b.text) for a, b in pairs),
        "texts": share(a.text == b.text for a, b in pairs),
        "statistics": share(step_statistics(a) == step_statistics(b) for a, b in pairs),
    }


def acceptance(results: list[Trajectory]) -> float:
    kept = [step.kept for traj in results for step in traj.steps if step.reward is not None]
    return sum(kept) / len(kept)


@vllm
class TestTinyWorldThroughServers:
    def test_rsd_through_servers_matches_the_in_process_run(self, tinyworld, one_torch_thread, capsys):
        """50 tiny-world problems, prompts as `rsd eval` builds them, the default threshold: the async controller
        and the lock-step one through servers agree with the in-process transformers run."""
        models, servers = tinyworld
        draft = HFStepGenerator(str(models["draft"]), role="draft", device="cpu", dtype="float32")
        target = HFStepGenerator(str(models["target"]), role="target", device="cpu", dtype="float32")
        prm = load_prm(str(models["prm"]), device="cpu", dtype="float32")
        problems = load_tinyworld(split="test", n=TINYWORLD_PROBLEMS, seed=0)
        prompted = [
            Prompted(p.id, p.question, build_prompt(DEFAULT_TEMPLATE, p.question, draft.tokenizer)) for p in problems
        ]
        # Generous caps: the models' solutions end with EOS well within them. All problems in flight at once: on
        # two cores, fewer and larger server batches take half the time.
        config = RunConfig(step_max_tokens=64, max_new_tokens=384, max_steps=16, batch_size=TINYWORLD_PROBLEMS)
        policy = Threshold(DEFAULT_DELTA)
        local = StepwiseDecoder(draft, config, prm, target, policy).run(prompted)
        kept = [step.kept for traj in local for step in traj.steps]
        assert 0 < sum(kept) < len(kept), "the threshold should keep some draft steps and reject others"

        served_draft = ServedStepGenerator(servers["draft"].url, role="draft")
        served_target = ServedStepGenerator(servers["target"].url, role="target")
        served_prm = ServedRewardModel(servers["prm"].url)
        assert served_prm.prm_format == "qwen-prm"
        runs = {
            "async": AsyncStepwiseDecoder(served_draft, config, served_prm, served_target, policy).run(prompted),
            "lock-step": StepwiseDecoder(served_draft, config, served_prm, served_target, policy).run(prompted),
        }
        for name, served in runs.items():
            agree = agreement(local, served)
            with capsys.disabled():
                figures = ", ".join(f"{what} {share:.0%}" for what, share in agree.items())
                print(
                    f"\n[tiny world, {len(problems)} problems, {name} through servers vs in process] agree: {figures}; "
                    f"acceptance {acceptance(served):.3f} vs {acceptance(local):.3f}; correct "
                    f"{sum(is_correct_answer(p, t.text) for p, t in zip(problems, served, strict=True))} vs "
                    f"{sum(is_correct_answer(p, t.text) for p, t in zip(problems, local, strict=True))}"
                )
            assert min(agree.values()) >= 0.95, (name, agree)
            assert acceptance(served) == pytest.approx(acceptance(local), abs=0.05)
            for a, b in zip(local, served, strict=True):
                if decisions(a) == decisions(b):
                    assert [s.reward for s in b.steps] == pytest.approx([s.reward for s in a.steps], abs=1e-4)

    def test_rsd_eval_through_servers_scores_what_the_in_process_eval_scores(self, tinyworld, tmp_path):
        """`rsd eval` with server URLs for all three models: the same answers, decisions and token counts as
        `rsd eval` on the same checkpoints in process (only the PRM's computed tokens differ: vLLM serves STEP
        pooling without its prefix cache)."""
        models, servers = tinyworld
        common = ["eval", "--num-problems", "16", "--methods", "rsd,target", "--no-progress", "--grade-workers", "1"]
        local_models = [f"--{role}={models[role]}" for role in TINYWORLD_ROLES]
        served_models = [f"--{role}={servers[role].url}" for role in TINYWORLD_ROLES]
        local = cli_json([*common, *local_models, "--threads", "1", "--out", str(tmp_path / "local")])
        served = cli_json([*common, *served_models, "--out", str(tmp_path / "served")])

        def comparable(summary: dict) -> list[dict]:
            keep = ("method", "n", "correct", "acceptance_rate", "target_step_share", "steps")
            return [{k: m[k] for k in keep} | {"tokens": m["tokens"] | {"prm": None}} for m in summary["methods"]]

        assert comparable(served) == comparable(local)
        rsd = next(m for m in served["methods"] if m["method"] == "rsd")
        assert 0 < rsd["acceptance_rate"] < 1 and rsd["tokens"]["prm"] > 0


BLOCK_SIZE = 32  # start_vllm_server's: the prefix cache holds whole blocks of this many tokens
# Tiny random PRMs in the layouts that no other served test covers, each on its serve line from docs/serving.md.
FORMAT_SERVE_ARGS = {
    "math-shepherd": [],  # generating servers: the reward is the next-token distribution over + and -
    "rlhflow": [],
    "token-classification": ["--pooler-config", json.dumps({"task": "classify"})],
}


@pytest.fixture(scope="class")
def format_prms(tmp_path_factory):
    if VLLM_PYTHON is None:
        pytest.skip(NO_VLLM)
    root = tmp_path_factory.mktemp("prm-formats")
    folders = {fmt: PRM_BUILDERS[fmt](root / fmt, seed=5 + i) for i, fmt in enumerate(FORMAT_SERVE_ARGS)}
    started = {
        fmt: start_vllm_server(folders[fmt], log_dir=root, extra_args=["--enable-prompt-tokens-details", *args])
        for fmt, args in FORMAT_SERVE_ARGS.items()
    }
    # The same token-classification PRM on /pooling with ALL pooling: the route of older clients (route="all").
    every_token = ["--pooler-config", json.dumps({"task": "token_classify"})]
    started["all"] = start_vllm_server(folders["token-classification"], log_dir=root, extra_args=every_token)
    with serving(started) as servers:
        yield folders, servers


@vllm
class TestServedPRMFormats:
    @pytest.mark.parametrize("fmt", list(FORMAT_SERVE_ARGS))
    def test_served_rewards_match_in_process(self, format_prms, fmt):
        folders, servers = format_prms
        served = ServedRewardModel(servers[fmt].url, delimiter="\n\n")
        assert (served.prm_format, served.route) == (fmt, ROUTES[fmt])  # the format read from the local config
        assert_served_rewards_match(served, load_prm(str(folders[fmt]), device="cpu", dtype="float32"))

    @pytest.mark.parametrize("fmt", list(FORMAT_SERVE_ARGS))
    def test_the_next_step_reads_the_servers_prefix_cache(self, format_prms, fmt):
        """The server computes only the new step's tokens (its /metrics count the rest as prefix-cache hits).
        Generating servers say so in each answer, and rsd counts only the computed tokens; vLLM's /classify
        answers carry no cached-token count, so there rsd counts every token (docs/serving.md says so)."""
        server = format_prms[1][fmt]
        served = ServedRewardModel(server.url)
        question, steps = QUESTIONS[3], [f"Step {k}: {k} + {k} = {2 * k}." for k in range(1, 7)]
        served.score_steps([RewardRequest("a", question, steps[:-1])])
        hits = prometheus_counter(server.root, "vllm:prefix_cache_hits_total")
        [second] = served.score_steps([RewardRequest("a", question, steps)])
        reused = prometheus_counter(server.root, "vllm:prefix_cache_hits_total") - hits
        before, after = (len(served.builder.build_ids(question, s)) for s in (steps[:-1], steps))
        assert reused >= (before // BLOCK_SIZE - 1) * BLOCK_SIZE > 0  # every full block of the last input but one
        assert after - second.prefill_tokens == (reused if served.route == "next-token" else 0)

    def test_the_all_pooling_route_gives_the_same_rewards_and_reruns_every_token(self, format_prms):
        folders, servers = format_prms
        served = ServedRewardModel(servers["all"].url, route="all")
        assert (served.prm_format, served.route) == ("token-classification", "all")
        assert_served_rewards_match(served, load_prm(str(folders["token-classification"]), device="cpu"))
        question, steps = QUESTIONS[2], [f"Step {k}: {k} * 2 = {2 * k}." for k in range(1, 5)]
        [first] = served.score_steps([RewardRequest("all", question, steps[:-1])])
        [second] = served.score_steps([RewardRequest("all", question, steps)])
        # No prefix cache on this route: each call computes its whole input, which is why rsd defaults to /classify.
        assert second.prefill_tokens == len(served.builder.build_ids(question, steps)) > first.prefill_tokens
        with pytest.raises(RSDError, match="route 'all': only 'all', and only for skywork or token-classification"):
            ServedRewardModel(servers["math-shepherd"].url, route="all")

    def test_a_prm_server_of_another_kind_fails_at_start_with_its_serve_line(self, format_prms):
        folders, servers = format_prms
        with pytest.raises(RSDError, match=r"cannot score math-shepherd rewards.*a plain generating server"):
            ServedRewardModel(servers["token-classification"].url, tokenizer=str(folders["math-shepherd"]))
        with pytest.raises(RSDError, match=r"cannot score token-classification rewards.*\"task\": \"classify\""):
            ServedRewardModel(servers["rlhflow"].url, tokenizer=str(folders["token-classification"]))


# -- the module's servers: random draft and target, Skywork and Qwen PRMs, in-process vLLM --------------------
def sharpened_lm(folder: Path, tokenizer, seed: int, **shape) -> Path:
    """A random Qwen2 LM whose attention is sharp enough that a wrong position or cache changes its tokens."""
    make_qwen2_lm(folder, tokenizer, seed=seed, **shape)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    tokenizer = make_tokenizer()
    skywork = make_skywork_prm(root / "skywork", seed=3)
    return {
        "draft": sharpened_lm(root / "draft", tokenizer, seed=0),
        "target": sharpened_lm(root / "target", tokenizer, seed=1, hidden_size=128, heads=2),
        "skywork": skywork,
        "skywork-vllm": convert_skywork(skywork, root / "skywork-vllm"),
        "qwen-prm": make_qwen_prm(root / "qwen-prm", seed=4),
    }


# Runs in the vLLM environment: three chained steps of every request with the in-process vLLM backend.
IN_PROCESS_VLLM = """
import json, sys
from rsd.backends.vllm import VLLMStepGenerator
from rsd.core import StepParams, StepRequest
job = json.load(open(sys.argv[1]))
generator = VLLMStepGenerator(job["model"], dtype="float32", max_model_len=1024, block_size=32, enforce_eager=True)
params = StepParams(delimiter=job["delimiter"])
requests = [StepRequest(i, ids, cap) for i, (ids, cap) in enumerate(zip(job["prompts"], job["caps"]))]
steps = []
for _ in range(3):
    outs = generator.generate_steps(requests, params)
    steps.append([[o.token_ids, o.text, o.stop.value] for o in outs])
    requests = [StepRequest(r.key, list(r.prefix_ids) + o.token_ids, r.max_tokens) for r, o in zip(requests, outs)]
json.dump({"steps": steps, "cost": list(vars(generator.cost).values())}, open(sys.argv[2], "w"))
"""


def start_in_process_vllm(draft: Path, folder: Path) -> tuple[subprocess.Popen, dict, Path]:
    """The in-process vLLM backend, run in the vLLM environment (rsd from this checkout) on the draft."""
    local = HFStepGenerator(str(draft), device="cpu", dtype="float32")
    prompts = [local.encode(q) for q in QUESTIONS[:8]]
    job = {"model": str(draft), "prompts": prompts, "caps": [4, 12, 40, 200] * 2}
    job["delimiter"] = delimiter_the_model_writes(local, prompts)
    (folder / "job.json").write_text(json.dumps(job))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "VLLM_CPU_KVCACHE_SPACE": "1",
                        "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [VLLM_PYTHON, "-c", IN_PROCESS_VLLM, str(folder / "job.json"), str(folder / "out.json")]
    log = open(folder / "in-process.log", "wb")  # noqa: SIM115 - the process writes to it after this returns
    # A session of its own: stopping it mid-job (a run of selected tests) must end its engine process too.
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, job, folder


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    if VLLM_PYTHON is None:
        pytest.skip(NO_VLLM)
    tag_id = make_tokenizer().convert_tokens_to_ids("<extra_0>")
    qwen_pooler = f'{{"pooling_type": "STEP", "step_tag_id": {tag_id}}}'
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "draft": start_vllm_server(checkpoints["draft"], log_dir=logs, extra_args=["--enable-prompt-tokens-details"]),
        "target": start_vllm_server(checkpoints["target"], log_dir=logs),
        "skywork": start_vllm_server(checkpoints["skywork-vllm"], log_dir=logs),
        "qwen-prm": start_vllm_server(
            checkpoints["qwen-prm"], log_dir=logs, extra_args=["--runner", "pooling", "--pooler-config", qwen_pooler]
        ),
    }
    in_process = start_in_process_vllm(checkpoints["draft"], logs)
    try:
        wait_until_ready(list(started.values()))
        yield started | {"in-process": in_process}
    finally:
        if in_process[0].poll() is None:
            os.killpg(in_process[0].pid, signal.SIGKILL)
            in_process[0].wait()
        for server in started.values():
            server.stop()


def delimiter_the_model_writes(generator: HFStepGenerator, prompts: list[list[int]]) -> str:
    """A one-character delimiter this random model actually writes, so steps end at it now and then."""
    outs = generator.generate_steps([StepRequest(i, p, 16) for i, p in enumerate(prompts)], StepParams("\x00"))
    counts = Counter(ch for out in outs for ch in out.text if ch.isascii() and ch.isprintable() and ch != " ")
    return counts.most_common(1)[0][0]


@vllm
def test_served_steps_are_token_exact_and_spread_over_replicas(checkpoints, servers):
    local = HFStepGenerator(str(checkpoints["draft"]), device="cpu", dtype="float32")
    port = servers["draft"].port
    served = ServedStepGenerator(f"http://127.0.0.1:{port}/v1,http://localhost:{port}/v1", role="draft")
    assert served.vocabulary_fingerprint() == local.vocabulary_fingerprint()
    assert served.cost == local.cost
    prompts = [local.encode(q) for q in QUESTIONS[:8]]
    delimiter = delimiter_the_model_writes(local, prompts)
    params = StepParams(delimiter=delimiter)
    requests = [StepRequest(i, p, cap) for i, (p, cap) in enumerate(zip(prompts, [4, 12, 40, 200] * 2, strict=True))]
    for _ in range(3):  # three steps, each continuing from the last: the second and later reuse cached prefixes
        want = local.generate_steps(requests, params)
        got = served.generate_steps(requests, params)
        for w, g in zip(want, got, strict=True):
            assert (g.token_ids, g.text, g.stop) == (w.token_ids, w.text, w.stop)
        requests = [
            StepRequest(r.key, list(r.prefix_ids) + w.token_ids, r.max_tokens)
            for r, w in zip(requests, want, strict=True)
        ]
    seen = {stop for stop in StopReason}
    assert {o.stop for o in want} | {o.stop for o in got} <= seen
    assert all(server.requests > 0 for server in served.pool.servers)  # both replicas served some steps


@vllm
def test_in_process_vllm_steps_are_token_exact(checkpoints, servers):
    process, job, folder = servers["in-process"]
    assert process.wait(timeout=300) == 0, (folder / "in-process.log").read_text()[-3000:]
    got = json.loads((folder / "out.json").read_text())
    local = HFStepGenerator(str(checkpoints["draft"]), device="cpu", dtype="float32")
    assert got["cost"] == list(vars(local.cost).values())
    params = StepParams(delimiter=job["delimiter"])
    requests = [StepRequest(i, p, cap) for i, (p, cap) in enumerate(zip(job["prompts"], job["caps"], strict=True))]
    for step in got["steps"]:
        want = local.generate_steps(requests, params)
        assert step == [[w.token_ids, w.text, w.stop.value] for w in want]
        requests = [
            StepRequest(r.key, list(r.prefix_ids) + w.token_ids, r.max_tokens)
            for r, w in zip(requests, want, strict=True)
        ]


@vllm
@pytest.mark.parametrize(("fmt", "server_key", "local_key"), [("skywork", "skywork", "skywork"),
                                                              ("qwen-prm", "qwen-prm", "qwen-prm")])  # fmt: skip
def test_served_prm_rewards_match_in_process(checkpoints, servers, fmt, server_key, local_key):
    served = ServedRewardModel(servers[server_key].url, delimiter="\n\n")
    assert served.prm_format == fmt
    assert_served_rewards_match(served, load_prm(str(checkpoints[local_key]), device="cpu", dtype="float32"))


@vllm
def test_wrong_servers_fail_at_start_with_the_fix(checkpoints, servers):
    with pytest.raises(RSDError, match="not 'some-other-model'"):
        ServedStepGenerator(servers["target"].url, role="target", served_model="some-other-model")
    with pytest.raises(RSDError, match="cannot generate"):
        ServedStepGenerator(servers["skywork"].url, role="draft", tokenizer=str(checkpoints["draft"]))
    with pytest.raises(RSDError, match="cannot score qwen-prm rewards"):
        ServedRewardModel(servers["draft"].url, prm_format="qwen-prm", tokenizer=str(checkpoints["qwen-prm"]))
    with pytest.raises(RSDError, match="tokenizer splits text differently"):
        ServedStepGenerator(servers["draft"].url, tokenizer=make_prm_tokenizer())


class Forwarder:
    """A TCP relay on its own port to a real server: a second "replica" that can be cut off mid-run."""

    def __init__(self, port: int) -> None:
        self.port, self.target = free_port(), port
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result()

    async def _serve(self):
        return await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        async def close_all():
            self.server.close()
            for writer in self.writers:
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result()


@vllm
def test_requests_move_to_the_other_replica_when_one_dies(checkpoints, servers, caplog):
    forwarder = Forwarder(servers["target"].port)
    urls = f"http://127.0.0.1:{forwarder.port}/v1,{servers['target'].url}"
    target = ServedStepGenerator(urls, role="target", options=FAST_FAIL)
    config = RunConfig(delimiter="\n\n", step_max_tokens=6, max_new_tokens=36, max_steps=6, batch_size=4)
    problems = [Prompted(i, q, q) for i, q in enumerate(QUESTIONS[:8])]
    reference = StepwiseDecoder(target, config, proposer_role="target").run(problems[:1])
    finished = []

    def cut_after_the_first(traj: Trajectory) -> None:
        finished.append(traj)
        if len(finished) == 1:
            forwarder.cut()

    with caplog.at_level(logging.WARNING, logger="rsd.served"):
        results = AsyncStepwiseDecoder(target, config, proposer_role="target").run(problems, cut_after_the_first)
    assert len(results) == 8 and all(t.finished for t in results)
    assert results[0].text == reference[0].text
    assert target.pool.servers[0].requests > 0 and target.pool.servers[1].requests > 0
    assert target.pool.retried >= 1 and any("retry 1 of 2" in r.getMessage() for r in caplog.records)


def cli_json(args: list[str]) -> dict:
    """`rsd ARGS --json` through the same `main` as the console script."""
    import contextlib
    import io

    from rsd.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--json"]) == 0
    return json.loads(out.getvalue())


@vllm
def test_cli_generate_through_servers_matches_the_in_process_cli(checkpoints, servers):
    draft = HFStepGenerator(str(checkpoints["draft"]), device="cpu", dtype="float32")
    delimiter = delimiter_the_model_writes(draft, [draft.encode(q) for q in QUESTIONS[:4]])
    common = [
        "generate", "--prm", str(checkpoints["skywork"]), "--question", QUESTIONS[0], "--template", "none",
        "--delimiter", delimiter, "--max-new-tokens", "40", "--step-max-tokens", "8", "--delta", "0.5",
        "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip
    served = cli_json([
        *common, "--draft", servers["draft"].url, "--target", servers["target"].url,
        "--draft-tokenizer", str(checkpoints["draft"]), "--target-tokenizer", str(checkpoints["target"]),
    ])  # fmt: skip
    local = cli_json([*common, "--draft", str(checkpoints["draft"]), "--target", str(checkpoints["target"])])
    assert served["text"] == local["text"]
    assert [(s["source"], s["kept"]) for s in served["steps"]] == [(s["source"], s["kept"]) for s in local["steps"]]
    assert [s["reward"] for s in served["steps"]] == pytest.approx([s["reward"] for s in local["steps"]], abs=1e-4)


@vllm
def test_a_server_stopped_mid_run_is_retried_then_one_clear_error(checkpoints, servers, caplog):
    """Runs last: it stops the Skywork PRM server."""
    config = RunConfig(delimiter="\n\n", step_max_tokens=8, max_new_tokens=64, max_steps=8, batch_size=2)
    draft = ServedStepGenerator(servers["draft"].url, role="draft")
    target = ServedStepGenerator(servers["target"].url, role="target")
    prm = ServedRewardModel(servers["skywork"].url, options=FAST_FAIL)
    problems = [Prompted(i, q, q) for i, q in enumerate(QUESTIONS[:6])]
    finished = []

    def stop_the_prm_server(traj: Trajectory) -> None:
        finished.append(traj)
        if len(finished) == 1:
            servers["skywork"].stop(timeout_s=5.0)  # a quick end: in-flight requests die with it

    decoder = AsyncStepwiseDecoder(draft, config, prm, target, Threshold(0.5))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rsd.served"), pytest.raises(RSDError) as error:
        decoder.run(problems, on_finish=stop_the_prm_server)
    assert time.monotonic() - start < 120
    root = servers["skywork"].root
    assert type(error.value) is RSDError  # one error, not a group of them or a bare transport error
    assert f"the prm server {root} failed 3 times in a row" in str(error.value)
    assert "check that it is running" in str(error.value)
    # Each failed PRM request was logged, then retried after a backoff, twice, before the run gave up.
    retries = [r for r in caplog.records if r.name == "rsd.served"]
    assert retries and all(r.levelno == logging.WARNING for r in retries)
    logged = re.compile(rf"prm server {re.escape(root)} failed \(.+\); retry (\d) of 2 in .+ s")
    attempts = [logged.fullmatch(r.getMessage()) for r in retries]
    assert all(attempts) and {m.group(1) for m in attempts} == {"1", "2"}
    assert prm.pool.retried == len(retries)
    assert draft.pool.retried == target.pool.retried == 0  # only the stopped server failed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # nothing else went wrong on the side
    # Work that finished before the error was handed over, whole; the rest did not finish.
    assert 1 <= len(finished) < len(problems) and all(t.finished for t in finished)
