"""Where the time of RSD's model calls goes, phase by phase.

One RSD run per batch size (the `gpu_speed.py` setup: random models of the real configurations, 256-token
prompts, 8 steps of 64 tokens, the threshold keeping 70% of draft steps), after two untimed runs, with the
backend's phases timed. A phase that touches the GPU is timed between two device synchronisations. That removes
the overlap the decode loop relies on, so the phases of a profiled run add up to more than an unprofiled run
takes. Host-only phases (the stop checks) are timed without synchronising.

For each (model, phase): seconds in all, host seconds (from the call to its return, before the closing
synchronisation; a phase whose host seconds are close to its total is bound by the host) and calls.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/phase_profile.py --batches 64 16 --out $OUT
    PYTHONPATH=src python benchmarks/phase_profile.py --tiny   # the CPU smoke test's sizes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_speed  # noqa: E402

from rsd.backends import hf  # noqa: E402
from rsd.backends.sampling import DeviceChoice  # noqa: E402
from rsd.backends.static_decode import StaticDecoder  # noqa: E402
from rsd.rewards.hf import HFRewardModel  # noqa: E402

# (class, method, phase name, whether it touches the GPU). The model is the generator's role, or "prm".
GENERATOR_PHASES = (
    (hf.HFStepGenerator, "generate_steps", "call", True),
    (hf.HFStepGenerator, "_prefill_arena", "prefill", True),  # the static path: straight into the arena
    (StaticDecoder, "begin", "prefill: cached prefixes into the arena", True),
    (StaticDecoder, "prefill", "prefill: own forward in the arena", True),
    (hf.HFStepGenerator, "_prefill", "prefill", True),  # transformers' forward (eager path, or arena_prefill off)
    (hf.HFStepGenerator, "_forward", "eager transformers forward", True),
    (StaticDecoder, "load", "arena load", True),
    (StaticDecoder, "advance", "decode forward (static, graphs on a GPU)", True),
    (DeviceChoice, "receive", "token read", True),
    (hf.HFStepGenerator, "_stop_reason", "stop checks (host)", False),
    (hf.HFStepGenerator, "_leave_arena", "row cache out", True),
    (HFRewardModel, "score_steps", "call", True),
)


class PhaseClock:
    """Seconds, host seconds and calls per (model, phase), from wrapped backend methods."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.model = "?"  # the model whose call is running (set by the "call" phases)
        self.totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])

    def timed(self, phase: str, function: Callable, synchronised: bool, model: str | None = None) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer = self.model
            if model is not None:
                self.model = model
            elif phase == "call":
                self.model = getattr(args[0], "role", "prm")
            if synchronised:
                gpu_speed.synchronize(self.device)
            start = time.perf_counter()
            try:
                result = function(*args, **kwargs)
            finally:
                issued = time.perf_counter()
                if synchronised:
                    gpu_speed.synchronize(self.device)
                entry = self.totals[(self.model, phase)]
                entry[0] += time.perf_counter() - start
                entry[1] += issued - start
                entry[2] += 1
                self.model = outer
            return result

        return wrapper

    def table(self) -> dict[str, list[float]]:
        return {
            f"{model}/{phase}": [round(total, 4), round(host, 4), int(calls)]
            for (model, phase), (total, host, calls) in sorted(self.totals.items())
        }


@contextmanager
def profiled(clock: PhaseClock, prm_body: Any) -> Iterator[None]:
    """The backend's phases wrapped for the duration, then put back as they were."""
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _, _ in GENERATOR_PHASES]
    for owner, name, phase, synchronised in GENERATOR_PHASES:
        setattr(owner, name, clock.timed(phase, owner.__dict__[name], synchronised))
    body_forward = prm_body.forward
    prm_body.forward = clock.timed("forward", body_forward, True, model="prm")
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
        prm_body.forward = body_forward


def profile_batch(models: gpu_speed.Models, config: gpu_speed.BenchConfig, batch: int) -> dict:
    problems = gpu_speed.make_problems(models.tokenizer, batch, config.prompt_tokens, config.seed, tag=f"b{batch}")
    delta, _ = gpu_speed.calibrate(models, config, problems)

    def run() -> gpu_speed.DecodeRun:
        decoder = gpu_speed.rsd_decoder(models, gpu_speed.run_config(config, batch, config.steps), delta)
        return gpu_speed.run_decoder(decoder, gpu_speed.fresh(problems, config.steps), config.device)

    plain = [run() for _ in range(2)][-1]  # the first one warms up
    clock = PhaseClock(config.device)
    with profiled(clock, models.prm.body):
        profiled_run = run()
    return {
        "batch": batch,
        "seconds": plain.seconds,
        "seconds_profiled": profiled_run.seconds,
        "split_profiled": profiled_run.split,
        "phases [seconds, host seconds, calls]": clock.table(),
    }


def lines(result: dict) -> str:
    out = [
        f"batch {result['batch']}: RSD {result['seconds']:.2f} s unprofiled, {result['seconds_profiled']:.2f} s "
        "profiled; per model and phase: seconds, host seconds, calls"
    ]
    for name, (total, host, calls) in result["phases [seconds, host seconds, calls]"].items():
        out.append(f"  {name:42s} {total:8.3f} {host:8.3f} {calls:7d}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test)")
    parser.add_argument("--out", type=Path, help="folder for phase_profile.json")
    args = parser.parse_args(argv)
    config = gpu_speed.tiny_config(profile=False) if args.tiny else gpu_speed.BenchConfig(profile=False)
    models = gpu_speed.build_models(config)
    results = []
    for batch in args.batches:
        results.append(profile_batch(models, config, batch))
        print(lines(results[-1]), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"environment": gpu_speed.environment(config), "results": results}
        (args.out / "phase_profile.json").write_text(json.dumps(report, indent=2))
    return results


if __name__ == "__main__":
    main()
