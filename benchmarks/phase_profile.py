"""Where the time of RSD's model calls goes, phase by phase.

One RSD run per batch size (the `gpu_speed.py` setup: random models of the real configurations, 256-token
prompts, 8 steps of 64 tokens, the threshold keeping 70% of draft steps), after two untimed runs, with the
engine's phases timed (`rsd.engine`: a call's prefill, its forwards of several tokens a row, decode forwards, token
reads, stop checks, rows leaving, the capture of a CUDA graph for a forward of a shape not yet replayed; the PRM's
calls and forwards). A phase that touches the GPU is timed between two device synchronisations. That removes the
overlap the decode loop relies on, so the phases of a profiled run add up to more than an unprofiled run takes.
Host-only phases (the stop checks) are timed without synchronising.

For each (model, phase): seconds in all, host seconds (from the call to its return, before the closing
synchronisation; a phase whose host seconds are close to its total is bound by the host) and calls; and the
shapes of each model's forwards in the arena (rows and tokens over the arena's columns, with how often).

`--kernels` also profiles the kernels of every forward in the arena, the PRM's scoring included (torch.profiler,
each call its own profile, so only those phases pay for it): GPU milliseconds per kind (matrix products,
attention, ...) and the largest kernels, per model.

`--rewrite speculative` profiles RSD whose target verifies a rejected step and then speculates with the draft
(`rsd.speculative`): its rounds' phases (proposals, the verification forward, the verdicts, the rollbacks, the
draft catching up) are timed too; `--target` picks the target's shape.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/phase_profile.py --batches 64 16 --kernels --out $OUT
    PYTHONPATH=src python benchmarks/phase_profile.py --target 14b --rewrite speculative --batches 16 1 --out $OUT
    PYTHONPATH=src python benchmarks/phase_profile.py --tiny   # the CPU smoke test's sizes
    PYTHONPATH=src python benchmarks/phase_profile.py --tiny --real-lengths --batches 64   # host work, real lengths
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_kernels  # noqa: E402
import gpu_speed  # noqa: E402

from rsd.backends.hf import HFStepGenerator  # noqa: E402
from rsd.engine.forward import ModelForward  # noqa: E402
from rsd.engine.kv_cache import Arena  # noqa: E402
from rsd.engine.runner import ModelRunner  # noqa: E402
from rsd.engine.sampler import DeviceChoice  # noqa: E402
from rsd.engine.steps import StepModel, StopRule  # noqa: E402
from rsd.engine.transformers_runner import TransformersRunner  # noqa: E402
from rsd.rewards.hf import HFRewardModel  # noqa: E402
from rsd.speculative import SpeculativeStepGenerator  # noqa: E402

ARENA_FORWARD = "forward in the arena"  # a forward of several tokens a row: prefills, the PRM's scoring
GRAPH_CAPTURE = "graph capture"  # a forward of a shape with no graph yet, captured (a GPU only)
# (class, method, phase name, whether it touches the GPU). The model is the generator's role, or "prm".
ENGINE_PHASES = (
    (HFStepGenerator, "generate_steps", "call", True),
    (StepModel, "open", "prefill", True),  # cached prefixes taken back and placed, the tails run
    (Arena, "open", "prefill: cached prefixes into the arena", True),
    (ModelForward, "hidden", ARENA_FORWARD, True),
    (TransformersRunner, "_forward", "transformers forward", True),  # other layouts, RSD_DECODE=eager
    (ModelRunner, "decode", "decode forward (graphs on a GPU)", True),
    (ModelRunner, "_capture", GRAPH_CAPTURE, True),  # inside the forward it captures
    (DeviceChoice, "receive", "token read", True),
    (StopRule, "__call__", "stop checks (host)", False),
    (StepModel, "leave", "row cache out", True),
    (ModelRunner, "keep", "rows to a smaller bucket", True),
    (HFRewardModel, "score_steps", "call", True),
    (ModelRunner, "row_cache", "row cache out (copy)", True),
)
# A speculative rewrite's phases (`--rewrite speculative`): (class, method, phase name, whether it touches the GPU,
# the model whose work it is). A round is one "verification forward".
SPECULATION_PHASES = (
    (SpeculativeStepGenerator, "generate_steps", "call", True, "target"),
    (SpeculativeStepGenerator, "_verify_proposals", "rewrite: prefill and the rejected step read", True, "target"),
    (SpeculativeStepGenerator, "_open_draft", "rewrite: draft opens its rows", True, "draft"),
    (SpeculativeStepGenerator, "_propose", "rewrite: proposals", True, "draft"),
    (SpeculativeStepGenerator, "_verify", "rewrite: verification forward", True, "target"),
    (SpeculativeStepGenerator, "_verify_round", "rewrite: verdicts (host, rows leaving)", False, "target"),
    (SpeculativeStepGenerator, "_roll_target_back", "rewrite: rollback", True, "target"),
    (SpeculativeStepGenerator, "_park_idle", "rewrite: idle slots parked", True, "target"),
    (SpeculativeStepGenerator, "_catch_up_draft", "rewrite: draft catches up", True, "draft"),
)
# The phases whose kernels `--kernels` profiles, and how a call's shape is named for the shape counts.
KERNEL_PHASES = (ARENA_FORWARD,)
TOP_KERNELS = 8


def forward_shape(args: tuple) -> str:
    """A forward in the arena, `ModelForward.hidden(self, arena, feed, keep)`: its rows and their tokens (packed,
    no padding) over the arena's columns."""
    arena, feed = args[1], args[2]
    return f"{len(feed.rows)} rows, {len(feed.ids)} tokens over {arena.width}"


SHAPES = {ARENA_FORWARD: forward_shape}


class PhaseClock:
    """Seconds, host seconds and calls per (model, phase), from wrapped engine methods."""

    def __init__(self, device: str, kernels: bool = False) -> None:
        self.device = device
        self.kernels = kernels  # profile the kernels of `KERNEL_PHASES`
        self.model = "?"  # the model whose call is running (set by the "call" phases)
        self.totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        self.shapes: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        # Per (model, phase): kernel name -> [milliseconds, launches], summed over the phase's calls.
        self.kernel_ms: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(dict)

    def timed(self, phase: str, function: Callable, synchronised: bool, model: str | None = None) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer = self.model
            if model is not None:
                self.model = model
            elif phase == "call":
                self.model = getattr(args[0], "role", "prm")
            if phase in SHAPES:
                self.shapes[(self.model, phase)][SHAPES[phase](args)] += 1
            if synchronised:
                gpu_speed.synchronize(self.device)
            start = time.perf_counter()
            try:
                if self.kernels and phase in KERNEL_PHASES:
                    result = self.with_kernels((self.model, phase), function, args, kwargs)
                else:
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

    def with_kernels(self, key: tuple[str, str], function: Callable, args: tuple, kwargs: dict) -> Any:
        """`function(*args, **kwargs)` under its own profile, its kernels added to `kernel_ms[key]`."""
        result = []
        table = decode_kernels.kernel_table(lambda: result.append(function(*args, **kwargs)), self.device, 1)
        totals = self.kernel_ms[key]
        for name, (ms, launches) in table.items():
            entry = totals.setdefault(name, [0.0, 0.0])
            entry[0] += ms
            entry[1] += launches
        return result[0]

    def kernel_report(self) -> dict[str, dict]:
        """Per model and phase: GPU milliseconds by kind of kernel, and the largest kernels."""
        report = {}
        for (model, phase), table in sorted(self.kernel_ms.items()):
            kinds: dict[str, float] = defaultdict(float)
            for name, (ms, _) in table.items():
                kinds[decode_kernels.kernel_kind(name)] += ms
            top = sorted(table.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
            report[f"{model}/{phase}"] = {
                "kernel_ms": round(sum(ms for ms, _ in table.values()), 3),
                "launches": int(sum(n for _, n in table.values())),
                "kinds_ms": {kind: round(ms, 3) for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])},
                "top_kernels": [[name[:90], round(ms, 3), int(n)] for name, (ms, n) in top],
            }
        return report

    def shape_counts(self) -> dict[str, dict[str, int]]:
        return {
            f"{model}/{phase}": dict(counts.most_common()) for (model, phase), counts in sorted(self.shapes.items())
        }

    def table(self) -> dict[str, list[float]]:
        return {
            f"{model}/{phase}": [round(total, 4), round(host, 4), int(calls)]
            for (model, phase), (total, host, calls) in sorted(self.totals.items())
        }


@contextmanager
def profiled(clock: PhaseClock, prm_body: Any) -> Iterator[None]:
    """The engine's phases wrapped for the duration, then put back as they were. The PRM's body forward is
    transformers' (a body the engine does not run, or RSD_DECODE=eager)."""
    phases = [(*entry, None) for entry in ENGINE_PHASES] + list(SPECULATION_PHASES)
    originals = [(owner, name, owner.__dict__[name]) for owner, name, *_ in phases]
    for owner, name, phase, synchronised, model in phases:
        setattr(owner, name, clock.timed(phase, owner.__dict__[name], synchronised, model))
    body_forward = prm_body.forward
    prm_body.forward = clock.timed("transformers forward", body_forward, True, model="prm")
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
        prm_body.forward = body_forward


def profile_batch(
    models: gpu_speed.Models, config: gpu_speed.BenchConfig, batch: int, kernels: bool = False, plain: bool = True
) -> dict:
    problems = gpu_speed.make_problems(models.tokenizer, batch, config.prompt_tokens, config.seed, tag=f"b{batch}")

    def run() -> gpu_speed.Run:
        return gpu_speed.timed(config.device, lambda: gpu_speed.rsd(models, problems, config, plain=plain), models)

    unprofiled = [run() for _ in range(2)][-1]  # the first one warms up
    clock = PhaseClock(config.device)
    with profiled(clock, models.prm.body):
        profiled_run = run()
    result = {
        "batch": batch,
        "rewrite": "plain" if plain else "speculative",
        "seconds": unprofiled.seconds,
        "seconds_profiled": profiled_run.seconds,
        "split_profiled": {role: profiled_run.stats.models[role].wall_time_s for role in ("draft", "prm", "target")},
        "phases [seconds, host seconds, calls]": clock.table(),
        "forward shapes": clock.shape_counts(),
    }
    if kernels:  # a run of its own: the profiles' own cost would blur the phases above
        kernel_clock = PhaseClock(config.device, kernels=True)
        with profiled(kernel_clock, models.prm.body):
            run()
        result["forward kernels"] = kernel_clock.kernel_report()
    return result


def lines(result: dict) -> str:
    out = [
        f"batch {result['batch']}, {result['rewrite']} rewrites: RSD {result['seconds']:.2f} s unprofiled, "
        f"{result['seconds_profiled']:.2f} s profiled; per model and phase: seconds, host seconds, calls"
    ]
    for name, (total, host, calls) in result["phases [seconds, host seconds, calls]"].items():
        out.append(f"  {name:42s} {total:8.3f} {host:8.3f} {calls:7d}")
    for name, counts in result["forward shapes"].items():
        out.append(f"  {name} shapes: " + ", ".join(f"{shape} x{n}" for shape, n in list(counts.items())[:12]))
    for name, entry in result.get("forward kernels", {}).items():
        kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in entry["kinds_ms"].items())
        out.append(f"  {name} kernels: {entry['kernel_ms']:.1f} ms in {entry['launches']} launches ({kinds})")
        out.extend(f"      {ms:8.2f} ms x{n:<5d} {kernel}" for kernel, ms, n in entry["top_kernels"])
    return "\n".join(out)


def profile_config(tiny: bool, real_lengths: bool, batches: Sequence[int], target: str = "7b") -> gpu_speed.BenchConfig:
    """The benchmark's setup; tiny models on the CPU, at the smoke test's lengths or the real ones. The PRM takes
    every row of the largest batch in one forward, as in `gpu_speed.py`."""
    if not tiny:
        return gpu_speed.BenchConfig(batches=tuple(batches), target=target)
    if not real_lengths:
        return gpu_speed.tiny_config(batches=tuple(batches))
    real = gpu_speed.BenchConfig()
    lengths = dict(prompt_tokens=real.prompt_tokens, step_tokens=real.step_tokens, steps=real.steps)
    return gpu_speed.tiny_config(batches=tuple(batches), **lengths)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test)")
    parser.add_argument(
        "--kernels", action="store_true", help="also profile the kernels of the forwards in the arena (one more run)"
    )
    parser.add_argument(
        "--real-lengths",
        action="store_true",
        help="with --tiny: the real lengths (256-token prompts, 8 steps of 64), so the phases show the host's work "
        "at those lengths",
    )
    parser.add_argument("--target", choices=tuple(gpu_speed.TARGETS), default="7b", help="the target's shape")
    parser.add_argument(
        "--rewrite",
        choices=("plain", "speculative"),
        default="plain",
        help="how the target rewrites a rejected step: one forward a token, or verifying then speculating",
    )
    parser.add_argument("--out", type=Path, help="folder for phase_profile.json")
    args = parser.parse_args(argv)
    if args.real_lengths and not args.tiny:
        parser.error("--real-lengths goes with --tiny: the real models run at the real lengths already")
    config = profile_config(args.tiny, args.real_lengths, args.batches, args.target)
    models = gpu_speed.build_models(config)
    results = []
    for batch in args.batches:
        results.append(profile_batch(models, config, batch, args.kernels, plain=args.rewrite == "plain"))
        print(lines(results[-1]), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"environment": gpu_speed.environment(config), "results": results}
        (args.out / "phase_profile.json").write_text(json.dumps(report, indent=2))
    return results


if __name__ == "__main__":
    main()
