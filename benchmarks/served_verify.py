"""A served target's rewrites: plain requests, verifying the rejected draft step first (vLLM, greedy), and a server
that speculates itself with the draft (vLLM's --speculative-config).

    RSD_VLLM_PYTHON=/path/to/vllm-venv/bin/python python benchmarks/served_verify.py [--problems 50]
        [--repeats 5] [--speculative] [--widths 1 4 8] [--end-to-end]

1. RSD runs tiny-world problems in process (the committed draft, target and PRM, plain rewrites, greedy) and records
   every rejected step: its prefix and the draft's step, the proposal a served rewrite verifies.
2. A vLLM CPU server of the tiny world's target (started here with `tests/vllm_servers.py`, or `--target URL`)
   rewrites each of them, one request at a time, the variants in turn, `--repeats` times:
     plain     the usual request (`ServedStepGenerator` with `verify="never"`);
     verified  one request with `prompt_logprobs` reads prefix + proposal, then the usual request from the kept part
               if the step goes on (`verify="always"`; the default, "auto", verifies proposals of at least
               `verify_min_tokens` tokens on an idle replica of a server that does not speculate itself).
   `--speculative` adds a second server of the target started with `--speculative-config` (the tiny world's draft,
   `--speculative-tokens` a round) and both variants on it. Every variant must give the same step (checked).
   Printed: per variant, the median latency of a rewrite and the server's CPU seconds for it, overall and by the
   proposal tokens the target kept; the prices of a plain request, a decode step and a verifying request, and from
   them and from the rewrites, how many kept tokens a verifying request needs to pay.
   Then the rejected steps in groups of `--widths` sent at once, plain and verified: the groups' summed wall time
   and server CPU seconds (a busy server: every verifying request's prefill competes with the others).
3. `--end-to-end`: RSD on each server (draft and PRM in process, one thread) with `--rewrite plain`, `auto`, and
   every greedy rewrite verified (`always`), at batch sizes `--batches`: run wall time, the target's time (the sum
   of its requests' latencies), its requests, and identical trajectories (checked).

A plain request finds its whole prefix in the server's prefix cache here (after the first repeat); in a real run,
the draft steps kept since the target's last step are not cached there. A verifying request reads no cache (vLLM
computes prompt logprobs over the whole prompt). Both favour the plain path. The servers share the machine's cores
with this process and with whatever else runs: the server CPU seconds (read from /proc for the servers started here,
or `--server-group`) are the steadier figure on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rsd.api import RSD
from rsd.backends.openai import ServedStepGenerator, run_sync
from rsd.core import Prompted, RunConfig, StepParams, StepRequest
from rsd.eval.harness import default_tinyworld_model
from rsd.eval.prompts import DEFAULT_TEMPLATE, build_prompt
from rsd.tinyworld.task import load_tinyworld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the vLLM test servers' helpers
from vllm_servers import prometheus_counter, serving, start_vllm_server  # noqa: E402

CONFIG = RunConfig(step_max_tokens=64, max_new_tokens=384, max_steps=16)


@dataclass
class Rejected:
    key: str
    prefix: list[int]
    proposal: list[int]
    cap: int


def problems(n: int, tokenizer) -> list[Prompted]:
    return [
        Prompted(p.id, p.question, build_prompt(DEFAULT_TEMPLATE, p.question, tokenizer))
        for p in load_tinyworld(split="test", n=n, seed=0)
    ]


def rejected_steps(n: int) -> tuple[list[Rejected], list[Prompted]]:
    """Every rejected step of an in-process RSD run on `n` tiny-world problems, with its prefix and cap."""
    rsd = RSD(*(default_tinyworld_model(r) for r in ("draft", "target", "prm")), config=CONFIG, rewrite="plain")
    prompted = problems(n, rsd.draft.tokenizer)
    out = []
    for traj in rsd.decoder("rsd").run(prompted):
        prefix = list(traj.prompt_ids)
        for i, step in enumerate(traj.steps):
            if not step.kept:
                cap = min(CONFIG.step_max_tokens, CONFIG.max_new_tokens - (len(prefix) - len(traj.prompt_ids)))
                out.append(Rejected(f"{traj.key}/{i}", list(prefix), list(step.draft_token_ids or []), cap))
            prefix += step.token_ids
    return out, prompted


def server_cpu_s(group: int | None) -> float:
    """CPU seconds (user + system) the server's processes have used: its API process and engine, one process group.
    On a shared machine this is the server's own work, whatever else runs beside it."""
    if group is None:
        return 0.0
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        if int(fields[2]) == group:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def timed(generator: ServedStepGenerator, request: StepRequest, params: StepParams, group: int | None):
    """A step's latency, the server's CPU seconds for it, and the step."""
    cpu, start = server_cpu_s(group), time.perf_counter()
    out = run_sync(generator.agenerate_step(request, params))
    return time.perf_counter() - start, server_cpu_s(group) - cpu, out


@dataclass
class Served:
    """A server of the target: its URL and its process group (for its CPU seconds; None: not counted)."""

    suffix: str  # "" for the plain server, "+spec" for the speculating one
    url: str
    group: int | None


def variants(servers: list[Served]) -> dict[str, tuple[ServedStepGenerator, int | None]]:
    """Name -> (generator, the server's process group): plain and verifying requests on every server."""
    out = {}
    for server in servers:
        out[f"plain{server.suffix}"] = (ServedStepGenerator(server.url, "target", verify="never"), server.group)
        out[f"verified{server.suffix}"] = (ServedStepGenerator(server.url, "target", verify="always"), server.group)
    return out


def per_rewrite(servers: list[Served], steps: list[Rejected], repeats: int) -> dict:
    """Each rejected step rewritten by every variant in turn (the order rotating); medians per step."""
    ways = variants(servers)
    names = list(ways)
    params = StepParams(delimiter=CONFIG.delimiter)
    rows = []
    for step in steps:
        request = StepRequest(step.key, step.prefix, step.cap, step.proposal)
        times: dict[str, list[float]] = {}
        for r in range(repeats + 1):  # the first round warms the prefix caches and is not counted
            outs = {}
            for name in names[r % len(names) :] + names[: r % len(names)]:
                generator, group = ways[name]
                seconds, cpu, outs[name] = timed(generator, request, params, group)
                if r:
                    times.setdefault(f"{name}_s", []).append(seconds)
                    times.setdefault(f"{name}_cpu_s", []).append(cpu)
            if len({(tuple(o.token_ids), o.stop) for o in outs.values()}) != 1:
                raise SystemExit(f"step {step.key}: the variants wrote different steps")
        verified = outs["verified"]
        rows.append({
            "key": step.key, "prefix": len(step.prefix), "proposal": len(step.proposal),
            "step": len(verified.token_ids), "kept": verified.speculation.from_proposal if verified.speculation else 0,
            "requests": 1 if verified.forwards == 1 else 2,
            **{key: statistics.median(values) for key, values in times.items()},
        })  # fmt: skip
    return {"variants": names, "rows": rows}


def unit_costs(server: Served, steps: list[Rejected], repeats: int) -> dict:
    """Median latency and server CPU of three requests on the rejected steps' prefixes: plain, writing 1 and 17
    tokens (a delimiter that never occurs; the difference over 16 is a decode step's price), and verifying 16
    tokens the target agrees with (one request). Verifying a proposal of which the target keeps k tokens saves k + 1
    decode steps and costs one verifying request: it pays from k = verify / decode step - 1 on."""
    plain = ServedStepGenerator(server.url, role="target", verify="never")
    verified = ServedStepGenerator(server.url, role="target", verify="always")
    params = StepParams(delimiter="\x00")
    samples: dict[str, list[float]] = {}
    for step in steps:
        own = run_sync(plain.agenerate_step(StepRequest(step.key, step.prefix, 17), params)).token_ids
        if len(own) < 17:
            continue  # the model's EOS came first
        for r in range(repeats + 1):
            for name, generator, request in (
                ("plain_1", plain, StepRequest(step.key, step.prefix, 1)),
                ("plain_17", plain, StepRequest(step.key, step.prefix, 17)),
                ("verify_16", verified, StepRequest(step.key, step.prefix, 17, own[:16])),
            ):
                seconds, cpu, out = timed(generator, request, params, server.group)
                assert out.token_ids == own[: request.max_tokens]
                if r:
                    samples.setdefault(f"{name}_s", []).append(seconds)
                    samples.setdefault(f"{name}_cpu_s", []).append(cpu)
    return {name: statistics.median(values) for name, values in samples.items()}


def concurrent_rewrites(servers: list[Served], steps: list[Rejected], repeats: int, width: int) -> dict:
    """The rejected steps in groups of `width` sent at once (as a busy run sends its rewrites), plain and verified in
    turn: the groups' summed wall time and server CPU seconds, medians over `repeats` rounds after a warm-up."""
    ways = variants(servers[:1])
    params = StepParams(delimiter=CONFIG.delimiter)
    groups = [steps[i : i + width] for i in range(0, len(steps), width)]
    totals: dict[str, list[float]] = {}
    for r in range(repeats + 1):
        sums = {f"{name}{m}": 0.0 for name in ways for m in ("_s", "_cpu_s")}
        for group in groups:
            requests = [StepRequest(f"{s.key}#{r}", s.prefix, s.cap, s.proposal) for s in group]
            for name in list(ways)[r % 2 :] + list(ways)[: r % 2]:
                generator, pid_group = ways[name]
                cpu, start = server_cpu_s(pid_group), time.perf_counter()
                run_sync(gather_steps(generator, requests, params))
                sums[f"{name}_s"] += time.perf_counter() - start
                sums[f"{name}_cpu_s"] += server_cpu_s(pid_group) - cpu
        if r:
            for key, value in sums.items():
                totals.setdefault(key, []).append(value)
    return {"width": width} | {key: statistics.median(values) for key, values in totals.items()}


async def gather_steps(generator: ServedStepGenerator, requests: list[StepRequest], params: StepParams) -> list:
    """All requests at once; "always" verifies each (ServedStepGenerator's "auto" would verify the first only)."""
    return list(await asyncio.gather(*(generator.agenerate_step(r, params) for r in requests)))


BUCKETS = {
    "all": lambda kept: True,
    "0": lambda kept: kept == 0,
    "1-3": lambda kept: 1 <= kept <= 3,
    "4-7": lambda kept: 4 <= kept <= 7,
    "8-15": lambda kept: 8 <= kept <= 15,
    "16+": lambda kept: kept >= 16,
}


def summarize(result: dict) -> None:
    rows = result["rows"]
    kept = sum(r["kept"] for r in rows) / max(1, sum(r["step"] for r in rows))
    ended = sum(r["requests"] == 1 for r in rows)
    print(f"\n{len(rows)} rewrites; rewrite tokens taken from the rejected step: {kept:.1%}; "
          f"rewrites done by the verifying request alone: {ended}")  # fmt: skip
    unit = result["unit_costs"]
    for measure, what in {"_s": "latency", "_cpu_s": "server CPU"}.items():
        one, step = unit[f"plain_1{measure}"], (unit[f"plain_17{measure}"] - unit[f"plain_1{measure}"]) / 16
        verify = unit[f"verify_16{measure}"]
        print(f"{what}: a plain request of 1 token {one * 1e3:.1f} ms, each further token {step * 1e3:.1f} ms; a "
              f"verifying request (16 tokens) {verify * 1e3:.1f} ms: it pays once the target keeps "
              f"{verify / step - 1:.1f} tokens" if step > 0 else "")  # fmt: skip
    for measure, what in {"_s": "latency", "_cpu_s": "server CPU"}.items():
        kept_tokens = [r["kept"] for r in rows]
        saved = [r[f"plain{measure}"] - r[f"verified{measure}"] for r in rows]
        if len(set(kept_tokens)) > 1:
            fit = statistics.linear_regression(kept_tokens, saved)
            print(f"{what} saved by verifying, least squares over the rewrites: {fit.intercept * 1e3:.1f} ms + "
                  f"{fit.slope * 1e3:.1f} ms per token kept from the proposal; it pays from "
                  f"{-fit.intercept / fit.slope:.1f} tokens kept" if fit.slope > 0 else "")  # fmt: skip
    names = result["variants"]
    print("\n| tokens kept from the proposal | rewrites | step tokens (median) | "
          + " | ".join(f"{name}: latency / server CPU (ms)" for name in names)
          + " | " + " | ".join(f"{name} / plain: latency / CPU" for name in names[1:]) + " |")  # fmt: skip
    print("| --- | ---: | ---: |" + " ---: |" * (2 * len(names) - 1))
    for bucket, test in BUCKETS.items():
        chosen = [r for r in rows if test(r["kept"])]
        if not chosen:
            continue
        cells = [bucket, str(len(chosen)), f"{statistics.median(r['step'] for r in chosen):.0f}"]
        for name in names:
            latency = statistics.median(r[f"{name}_s"] for r in chosen) * 1e3
            cpu = statistics.median(r[f"{name}_cpu_s"] for r in chosen) * 1e3
            cells.append(f"{latency:.0f} / {cpu:.0f}")
        for name in names[1:]:
            ratios = [ratio(chosen, name, measure) for measure in ("_s", "_cpu_s")]
            cells.append(" / ".join(f"{x:.2f}" for x in ratios))
        print("| " + " | ".join(cells) + " |")


def ratio(rows: list[dict], name: str, measure: str) -> float:
    """Summed over the rewrites: the variant's total against the plain request's."""
    plain = sum(r[f"plain{measure}"] for r in rows)
    return sum(r[f"{name}{measure}"] for r in rows) / plain if plain else float("nan")


REWRITES = ("plain", "auto", "always")  # the served target's `verify`: never, where it pays, wherever it is exact


def end_to_end(servers: list[Served], n: int, batches: list[int], repeats: int) -> list[dict]:
    """RSD over each served target with `--rewrite plain` and `auto`, and with every greedy rewrite verified
    (`always`), in turn, a warm-up round then `repeats` measured ones (medians reported); the same trajectories every
    way (checked)."""
    samples: dict[tuple, list[dict]] = {}
    texts: set[tuple[str, ...]] = set()
    for batch, server in ((b, s) for b in batches for s in servers):
        for attempt in range(1 + repeats):
            for rewrite in REWRITES[attempt % 3 :] + REWRITES[: attempt % 3]:
                rsd = RSD(default_tinyworld_model("draft"), server.url, default_tinyworld_model("prm"),
                          rewrite="auto" if rewrite == "always" else rewrite, config=CONFIG)  # fmt: skip
                rsd.target.verify = {"plain": "never", "auto": "auto", "always": "always"}[rewrite]
                start = time.perf_counter()
                results = rsd.decoder("rsd", batch_size=batch).run(problems(n, rsd.draft.tokenizer))
                wall = time.perf_counter() - start
                texts.add(tuple(t.text for t in results))
                stats = [t.stats for t in results]
                if attempt:
                    samples.setdefault((batch, f"target{server.suffix}", rewrite), []).append({
                        "wall_s": wall,
                        "target_s": sum(s.models["target"].wall_time_s for s in stats),
                        "rewrites": sum(s.steps_rejected for s in stats),
                        "target_requests": rsd.target.pool.servers[0].requests,
                        "target_forwards_per_token": sum(s.target_forwards for s in stats)
                        / max(1, sum(s.target_tokens for s in stats)),
                    })  # fmt: skip
    if len(texts) != 1:
        raise SystemExit("the runs wrote different trajectories")
    rows = [
        {"batch": batch, "server": server, "rewrite": rewrite}
        | {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for (batch, server, rewrite), runs in samples.items()
    ]
    print(f"\n| batch | server | rewrite | run wall (s) | target time (s) | rewrites | "
          f"target requests | target forwards/token |  (medians of {repeats} runs)")  # fmt: skip
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['batch']} | {row['server']} | {row['rewrite']} | {row['wall_s']:.2f} | {row['target_s']:.2f} | "
              f"{row['rewrites']:.0f} | {row['target_requests']:.0f} | "
              f"{row['target_forwards_per_token']:.2f} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", default=None, help="a running vLLM server of the tiny world's target")
    parser.add_argument("--server-group", type=int, default=None, help="the --target server's process group id, "
                        "to count its CPU seconds")  # fmt: skip
    parser.add_argument("--speculative", action="store_true", help="also a target server with --speculative-config")
    parser.add_argument("--speculative-tokens", type=int, default=4, help="draft tokens a round on that server")
    parser.add_argument("--end-to-end", action="store_true", help="also time RSD runs, plain against verified")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 4, 8], help="rewrites sent at once")
    parser.add_argument("--run-repeats", type=int, default=3, help="measured RSD runs per setting (--end-to-end)")
    parser.add_argument("--out", default=None, help="write every figure as JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, _ = rejected_steps(args.problems)
    print(f"{len(steps)} rejected steps on {args.problems} tiny-world problems ({platform.processor() or 'cpu'})")
    with tempfile.TemporaryDirectory() as folder:
        started = {}
        target = default_tinyworld_model("target")
        details = ["--enable-prompt-tokens-details"]
        if not args.target:
            started["target"] = start_vllm_server(target, log_dir=folder, extra_args=details)
        if args.speculative:
            config = json.dumps(
                {"model": default_tinyworld_model("draft"), "num_speculative_tokens": args.speculative_tokens}
            )
            started["+spec"] = start_vllm_server(
                target, log_dir=folder, extra_args=[*details, "--speculative-config", config]
            )
        with serving(started) as up:
            servers = [Served("", args.target, args.server_group)] if args.target else []
            servers += [Served("" if k == "target" else k, s.url, s.process.pid) for k, s in up.items()]
            servers.sort(key=lambda s: s.suffix)  # the plain server first
            result = run(servers, steps, args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def run(servers: list[Served], steps: list[Rejected], args: argparse.Namespace) -> dict:
    result = per_rewrite(servers, steps, args.repeats)
    result["unit_costs"] = unit_costs(servers[0], steps[:10], args.repeats)
    summarize(result)
    result["concurrent"] = [concurrent_rewrites(servers, steps, args.repeats, width) for width in args.widths]
    print("\n| rewrites sent at once | plain: wall / server CPU (s) | verified: wall / server CPU (s) | "
          "verified / plain |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: |")
    for row in result["concurrent"]:
        print(f"| {row['width']} | {row['plain_s']:.2f} / {row['plain_cpu_s']:.2f} | {row['verified_s']:.2f} / "
              f"{row['verified_cpu_s']:.2f} | {row['verified_s'] / row['plain_s']:.2f} / "
              f"{row['verified_cpu_s'] / max(row['plain_cpu_s'], 1e-9):.2f} |")  # fmt: skip
    if args.end_to_end:
        result["end_to_end"] = end_to_end(servers, args.problems, args.batches, args.run_repeats)
    for server in servers:
        if server.suffix:  # the speculating server: what its draft proposed and the target kept, over all requests
            root = server.url.removesuffix("/v1")
            drafted = prometheus_counter(root, "vllm:spec_decode_num_draft_tokens_total")
            accepted = prometheus_counter(root, "vllm:spec_decode_num_accepted_tokens_total")
            rounds = prometheus_counter(root, "vllm:spec_decode_num_drafts_total")
            result["speculating_server"] = {"drafted": drafted, "accepted": accepted, "rounds": rounds}
            share, per_round = accepted / max(drafted, 1), (accepted + rounds) / max(rounds, 1)
            print(f"\nspeculating server: {accepted:.0f} of {drafted:.0f} draft tokens accepted ({share:.1%}), "
                  f"{per_round:.2f} tokens a target forward")  # fmt: skip
    return result


if __name__ == "__main__":
    sys.exit(main())
