"""`rsd serve` under load: closed-loop clients at 1, 8, 32 and 128 concurrent, each sending its next request the
moment its last one is answered.

    python benchmarks/serve_load.py                        # the in-process tiny world (starts `rsd serve` itself)
    RSD_VLLM_PYTHON=/path/to/vllm-venv/bin/python python benchmarks/serve_load.py --backend vllm
    python benchmarks/serve_load.py --url http://HOST:PORT  # a server already running

Every request is a streamed, greedy chat completion of one tiny-world test problem (the problems taken in turn),
with `stream_options.include_usage`. Per level, over `--seconds` after `--warmup` seconds: requests/s and generated
tokens/s of the requests completed in the window, p50 and p99 latency (to `[DONE]`) and time to first step (the
first step's chunk), and failures (any answer that is not a 200 ending in `[DONE]`, over the whole level).
`--repeats N` runs the levels in turn N times and pools each level's runs; each run prints the load average.
`--reference N` first times N problems through the in-process decoder alone (no server) at batch 1, 8 and 32: the
batching the models themselves allow on this machine, against which the server's ratio reads.

`--backend tinyworld` serves the committed tiny-world models in process (`rsd serve` with no model arguments);
`--backend vllm` puts each of them behind a vLLM CPU server (`tests/vllm_servers.py`, PRM with STEP pooling, as
`tests/test_served.py` does) and serves RSD over those (`rsd serve --draft URL --target URL --prm URL`).
Prints a markdown table per backend and three checks: throughput at 32 at least 4x that at 1, no failed
request, p99 latency at 8 at most 3x the median latency at 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the vLLM test servers' helpers

from vllm_servers import free_port  # noqa: E402

from rsd.eval.harness import default_tinyworld_model
from rsd.tinyworld.task import load_tinyworld

LEVELS = (1, 8, 32, 128)


@dataclass
class Outcome:
    ok: bool
    started: float
    ended: float
    first_step: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Level:
    clients: int
    completed: int
    failed: int
    requests_per_s: float
    tokens_per_s: float
    latency_p50: float
    latency_p99: float
    first_step_p50: float
    first_step_p99: float
    errors: list[str] = field(default_factory=list)


# -- one request --------------------------------------------------------------------------------------------------
async def ask(client: httpx.AsyncClient, question: str) -> Outcome:
    body = {
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    outcome = Outcome(False, time.perf_counter(), 0.0)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return outcome
            async for line in response.aiter_lines():
                read_event(line, outcome)
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.ended = time.perf_counter()
    return outcome


def read_event(line: str, outcome: Outcome) -> None:
    if not line.startswith("data: "):
        return
    data = line.removeprefix("data: ")
    if data == "[DONE]":
        outcome.ok = outcome.error is None
        return
    chunk = json.loads(data)
    if "error" in chunk:
        outcome.error = chunk["error"]["message"]
    elif chunk.get("usage"):
        outcome.tokens = chunk["usage"]["completion_tokens"]
    elif outcome.first_step is None and chunk["choices"] and "step" in (chunk["choices"][0].get("rsd") or {}):
        outcome.first_step = time.perf_counter() - outcome.started


# -- one level ------------------------------------------------------------------------------------------------------
async def run_level(url: str, clients: int, questions: list[str], warmup: float, seconds: float):
    """`clients` closed loops; the outcomes and the measured window [warmup, warmup + seconds] from the start."""
    outcomes: list[Outcome] = []
    turn = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + warmup + seconds

        async def loop() -> None:
            while time.perf_counter() < stop_at:
                outcomes.append(await ask(client, questions[next(turn) % len(questions)]))

        await asyncio.gather(*(loop() for _ in range(clients)))
    return outcomes, (start + warmup, stop_at)


def summarize(clients: int, runs: list[tuple[list[Outcome], tuple[float, float]]]) -> Level:
    """One level over all its repeats: requests completed inside their run's window, failures anywhere."""
    done = [o for outcomes, (lo, hi) in runs for o in outcomes if o.ok and lo <= o.ended <= hi]
    failed = [o for outcomes, _ in runs for o in outcomes if not o.ok]
    seconds = sum(hi - lo for _, (lo, hi) in runs)
    latency = [o.ended - o.started for o in done]
    first = [o.first_step for o in done if o.first_step is not None]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return Level(
        clients=clients,
        completed=len(done),
        failed=len(failed),
        requests_per_s=len(done) / seconds,
        tokens_per_s=sum(o.tokens for o in done) / seconds,
        latency_p50=pct(latency, 50),
        latency_p99=pct(latency, 99),
        first_step_p50=pct(first, 50),
        first_step_p99=pct(first, 99),
        errors=sorted({o.error or "no [DONE]" for o in failed})[:5],
    )


# -- servers ----------------------------------------------------------------------------------------------------------
@contextmanager
def rsd_serve(model_args: list[str], extra: list[str], log_dir: Path):
    port = free_port()
    command = [sys.executable, "-m", "rsd.cli", "serve", "--port", str(port), "--no-access-log", *model_args, *extra]
    log = log_dir / f"rsd-serve-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise SystemExit(f"rsd serve exited:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"rsd serve not ready:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, " ".join(["rsd serve", *model_args, *extra])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


@contextmanager
def vllm_tinyworld(log_dir: Path):
    """The tiny world's draft, target and PRM behind vLLM CPU servers; yields their `rsd serve` model arguments."""
    from transformers import AutoTokenizer
    from vllm_servers import serving, start_vllm_server

    from rsd.rewards.formats import QWEN_PRM_STEP_TAG

    models = {r: Path(shutil.copytree(default_tinyworld_model(r), log_dir / r)) for r in ("draft", "target", "prm")}
    tag_id = AutoTokenizer.from_pretrained(models["prm"]).convert_tokens_to_ids(QWEN_PRM_STEP_TAG)
    generating = ["--enable-prompt-tokens-details"]
    pooling = ["--runner", "pooling", "--pooler-config", json.dumps({"pooling_type": "STEP", "step_tag_id": tag_id})]
    started = {
        "draft": start_vllm_server(models["draft"], log_dir=log_dir, extra_args=generating),
        "target": start_vllm_server(models["target"], log_dir=log_dir, extra_args=generating),
        "prm": start_vllm_server(models["prm"], log_dir=log_dir, extra_args=pooling),
    }
    with serving(started) as servers:
        yield [arg for role in ("draft", "target", "prm") for arg in (f"--{role}", servers[role].url)]


# -- report -----------------------------------------------------------------------------------------------------------
def table(levels: list[Level]) -> str:
    rows = [
        "| concurrent | completed | failed | requests/s | generated tokens/s | latency p50 (s) | latency p99 (s) "
        "| first step p50 (s) | first step p99 (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        rows.append(
            f"| {lv.clients} | {lv.completed} | {lv.failed} | {lv.requests_per_s:.2f} | {lv.tokens_per_s:.0f} "
            f"| {lv.latency_p50:.2f} | {lv.latency_p99:.2f} | {lv.first_step_p50:.2f} | {lv.first_step_p99:.2f} |"
        )
    return "\n".join(rows)


def checks(levels: list[Level]) -> list[str]:
    by = {lv.clients: lv for lv in levels}
    lines = [f"no failed request: {'yes' if all(lv.failed == 0 for lv in levels) else 'NO'} "
             f"({sum(lv.failed for lv in levels)} failed)"]  # fmt: skip
    if 1 in by and 32 in by:
        ratio = by[32].requests_per_s / by[1].requests_per_s
        lines.append(f"throughput at 32 / at 1 = {ratio:.2f}x (>= 4x: {'yes' if ratio >= 4 else 'NO'})")
    if 1 in by and 8 in by:
        ratio = by[8].latency_p99 / by[1].latency_p50
        lines.append(f"p99 latency at 8 / median latency at 1 = {ratio:.2f}x (<= 3x: {'yes' if ratio <= 3 else 'NO'})")
    return lines


def measure(url: str, args: argparse.Namespace, questions: list[str]) -> list[Level]:
    """Every level in turn, `--repeats` times over (so a shared machine's load weighs on every level alike)."""
    runs: dict[int, list] = {clients: [] for clients in args.levels}
    for repeat in range(args.repeats):
        for clients in args.levels:
            outcomes, window = asyncio.run(run_level(url, clients, questions, args.warmup, args.seconds))
            runs[clients].append((outcomes, window))
            ok = sum(o.ok and window[0] <= o.ended <= window[1] for o in outcomes)
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"  repeat {repeat + 1}, {clients:>4} concurrent: {ok / (window[1] - window[0]):.2f} req/s, "
                  f"{sum(not o.ok for o in outcomes)} failed (load average {load})", flush=True)  # fmt: skip
    levels = [summarize(clients, runs[clients]) for clients in args.levels]
    for level in levels:
        for error in level.errors:
            print(f"  {level.clients} concurrent, error: {error}", flush=True)
    return levels


def reference(questions: list[str], batches: list[int], count: int, threads: int) -> dict[int, float]:
    """The in-process decoder alone, no server: problems/s of `StepwiseDecoder.run` over the first `count`
    questions at each batch size, on the tiny world with the server's torch threads (1 unless --threads)."""
    import torch

    from rsd.api import RSD
    from rsd.cli import quiet_libraries
    from rsd.core import Prompted

    quiet_libraries()
    torch.set_num_threads(threads)
    models = RSD(*(default_tinyworld_model(r) for r in ("draft", "target", "prm")), device="cpu")
    problems = [Prompted(i, q, models.prompt(q)) for i, q in enumerate(questions[:count])]
    models.decoder(batch_size=8).run(problems[:8])  # warm-up
    rates = {}
    for batch in batches:
        started = time.perf_counter()
        models.decoder(batch_size=batch).run(problems)
        rates[batch] = count / (time.perf_counter() - started)
        print(f"  reference, in process without a server, batch {batch}: {rates[batch]:.2f} problems/s", flush=True)
    return rates


def environment() -> dict:
    """The machine and the code a run measured: CPU, Python, torch, and the commit (RSD_BENCH_COMMIT or git's)."""
    import subprocess

    import torch

    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        commit = git.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "machine": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": os.environ.get("RSD_BENCH_COMMIT") or commit,
    }


def server_threads(serve_args: list[str]) -> int:
    """The torch threads `rsd serve` runs the tiny world with: its --threads, else 1."""
    for i, arg in enumerate(serve_args):
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
        if arg == "--threads" and i + 1 < len(serve_args):
            return int(serve_args[i + 1])
    return 1


def reference_bounds(rates: dict[int, float]) -> list[str]:
    """What the models' own batching allows a server on this machine. Throughput at 32 cannot beat the decoder's
    own batch 32 over batch 1; and among 8 steady clients each problem shares every round with 7 others, so its
    latency is at least 8 / (rate at batch 8) against 1 / (rate at batch 1) alone."""
    return [
        f"\nreference without a server: {rates[1]:.2f} problems/s at batch 1, {rates[8]:.2f} at 8, "
        f"{rates[32]:.2f} at 32",
        f"  batching alone gives {rates[32] / rates[1]:.2f}x at 32 (a ceiling for the server's throughput ratio)",
        f"  a problem among 8 takes {8 / rates[8]:.2f} s against {1 / rates[1]:.2f} s alone: "
        f"{8 * rates[1] / rates[8]:.2f}x (a floor under the latency ratio at 8)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="tinyworld", choices=("tinyworld", "vllm", "both"))
    parser.add_argument("--url", default=None, help="measure a running server instead (http://HOST:PORT)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients per level")
    parser.add_argument("--seconds", type=float, default=45.0, help="measured window per level")
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="seconds per level before the window (longer than a request)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="run every level this many times, in turn")
    parser.add_argument("--serve-args", default="", help="extra `rsd serve` options, e.g. '--max-concurrency 128'")
    parser.add_argument(
        "--reference", type=int, default=0, metavar="N",
        help="first time N problems through the in-process decoder without a server at batch 1, 8 and 32",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="also write the results as JSON: a file, or a folder")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    questions = [p.question for p in load_tinyworld(split="test", n=200, seed=0)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    results = {}
    threads = server_threads(args.serve_args.split())
    rates = reference(questions, [1, 8, 32], args.reference, threads) if args.reference else {}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp, ExitStack() as stack:
        if args.url:
            results["server"] = (args.url, measure(args.url, args, questions))
        backends = [] if args.url else (["tinyworld", "vllm"] if args.backend == "both" else [args.backend])
        for backend in backends:
            model_args = [] if backend == "tinyworld" else stack.enter_context(vllm_tinyworld(Path(tmp)))
            with rsd_serve(model_args, args.serve_args.split(), Path(tmp)) as (url, command):
                print(f"{backend}: {command}", flush=True)
                results[backend] = (command, measure(url, args, questions))
    if rates:
        print("\n".join(reference_bounds(rates)))
    for name, (command, levels) in results.items():
        print(f"\n### {name}: `{command}`\n")
        print(table(levels))
        print()
        print("\n".join(checks(levels)))
    if args.out:
        payload = {name: {"command": c, "levels": [asdict(lv) for lv in lvs]} for name, (c, lvs) in results.items()}
        payload["reference_problems_per_s"] = rates
        payload["environment"] = environment()
        out = Path(args.out) / "serve_load.json" if Path(args.out).is_dir() else Path(args.out)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
