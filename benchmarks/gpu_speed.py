"""GPU speed of RSD at real model sizes, side by side with what a user would pick instead.

Random-weight models built from the real configurations, bf16 on one GPU: a Qwen2.5-Math-1.5B draft, a 1.5B PRM in
the Qwen2ForProcessRewardModel layout, and a target of Qwen2.5-Math-7B, Qwen2.5-14B or Qwen2.5-32B shapes
(`--target`). Prompts of 256 tokens, steps of 64 tokens (random text never writes the delimiter, so the step cap
ends every step), 8 steps a problem; the PRM scores every draft step for real, and a fixed pattern keeps 70% of
them (3 of every 10 steps, counted across problems, are rejected): the same decisions for every RSD variant and
every round, whatever the text, at every batch size. Per batch size, in one run, every round times each method
once:

- `target_only`: the target alone through rsd's engine (one call writing every token, CUDA graphs);
- `sd`: the target alone with token-level speculation from the draft, batched (`rsd.speculative`);
- `rsd_plain`: RSD whose target rewrites a rejected step one forward per token;
- `rsd`: RSD whose target verifies the rejected step, then speculates with the draft (`--rewrite speculative`).

Random weights never agree, so a proposed token's acceptance is a seeded draw at `--token-acceptance` (default 0.8),
made through the speculative generator's acceptance rule: the GPU runs exactly the forwards, rollbacks and copies
of a real run at that acceptance. Timings: synchronised host clocks, a warm-up round of every method first,
medians over `--repeats` rounds. FLOPs are what each model really ran (2 x parameters x tokens + attention).

    python benchmarks/gpu_speed.py --target 7b --out results/     # one H100/H200, a few minutes
    python benchmarks/gpu_speed.py --tiny                         # tiny models on the CPU (the smoke test)

Results and what limits RSD: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rsd.backends.hf import HFStepGenerator
from rsd.continuous import ContinuousDecoder, runs_continuously
from rsd.core import (
    Prompted,
    RewardOutput,
    RewardRequest,
    RunConfig,
    StepOutput,
    StepParams,
    StepRequest,
    TrajectoryStats,
)
from rsd.engine.runner import GraphStats, ModelRunner
from rsd.engine.sampler import Draw
from rsd.loop import StepwiseDecoder
from rsd.policies import Threshold
from rsd.rewards.formats import QwenPRMInput
from rsd.rewards.hf import HFRewardModel, QwenPRMHead
from rsd.rewards.hf import model_cost as prm_model_cost
from rsd.speculative import SpeculativeStepGenerator

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
METHODS = ("target_only", "sd", "rsd_plain", "rsd")
SPECULATING = ("sd", "rsd")  # the methods whose target speculates with the draft
COMMIT_ENV = "RSD_BENCH_COMMIT"  # the commit a run measured (a device's copy of the tree has no git)


@dataclass(frozen=True)
class Shape:
    """The fields of a Qwen2 configuration that decide its speed."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # input embedding shared with the LM head (the 1.5B models tie, the larger ones do not)


DRAFT = Shape(1536, 28, 12, 2, 8960, 151936, True)  # Qwen2.5-Math-1.5B; the PRM's body has the same shape
TARGETS = {
    "7b": Shape(3584, 28, 28, 4, 18944, 152064, False),  # Qwen2.5-Math-7B
    "14b": Shape(5120, 48, 40, 8, 13824, 152064, False),  # Qwen2.5-14B
    "32b": Shape(5120, 64, 40, 8, 27648, 152064, False),  # Qwen2.5-32B
}
TINY_DRAFT = Shape(128, 2, 2, 1, 256, 512, True)
TINY_TARGET = Shape(256, 3, 4, 1, 512, 512, False)
REAL_SHAPES = {"draft": DRAFT, "prm": DRAFT, "target": TARGETS["7b"]}  # the kernel profile's models
TINY_SHAPES = {"draft": TINY_DRAFT, "prm": TINY_DRAFT, "target": TINY_TARGET}


@dataclass(frozen=True)
class BenchConfig:
    target: str = "7b"
    prompt_tokens: int = 256
    step_tokens: int = 64  # the step cap; random text has no delimiter, so every step is this long
    steps: int = 8
    keep_share: float = 0.7  # share of draft steps the calibrated threshold keeps
    token_acceptance: float = 0.8  # the rate at which a proposed token stays (random weights never agree)
    batches: tuple[int, ...] = (1, 16, 64)
    repeats: int = 3  # timed rounds of every method; medians are reported
    # untimed rounds first: kernels compiled, allocator grown, arenas grown (each growth drops its model's graphs)
    # and graphs captured; a second one recaptures the shapes the first's last new arena dropped
    warmups: int = 1
    methods: tuple[str, ...] = METHODS
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0
    tiny: bool = False


def tiny_config(**overrides: Any) -> BenchConfig:
    settings: dict[str, Any] = dict(
        prompt_tokens=12, step_tokens=6, steps=3, batches=(1, 3), repeats=1, device="cpu", dtype="float32", tiny=True
    )
    settings.update(overrides)
    return BenchConfig(**settings)


# -- random models in the real layouts ----------------------------------------------------------------------------


def make_word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer of exactly `vocab_size` ids: `<unk>` = 0, words `w1`... and the Qwen special tokens
    last. Decoding joins words with spaces, so step texts re-encode to the same ids (the PRM re-reads them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocab_size - len(SPECIAL_TOKENS)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def qwen2_config(shape: Shape, tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=shape.tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


@contextlib.contextmanager
def building_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on the device in the dtype: a 7B model initialised on the host takes minutes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_lm(shape: Shape, tokenizer: Any, device: str, dtype: torch.dtype, seed: int) -> Any:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with building_on(device, dtype):
        model = Qwen2ForCausalLM(qwen2_config(shape, tokenizer))
    banned = [0, *tokenizer.all_special_ids, *range(len(tokenizer), shape.vocab)]
    with torch.no_grad():
        # A zero row scores 0 while the best of many random logits is far above it: greedy never picks these
        # (`<unk>`, EOS, which would end a trajectory early, and the padding rows past the tokenizer).
        model.lm_head.weight[banned] = 0.0
    return model.eval()


def build_prm(shape: Shape, tokenizer: Any, config: BenchConfig, seed: int) -> HFRewardModel:
    """A Qwen2 body and the Qwen2.5-Math-PRM head (score.0 / score.2), random, as `rsd.rewards.hf` runs them."""
    from transformers import Qwen2Model

    torch.manual_seed(seed)
    with building_on(config.device, getattr(torch, config.dtype)):
        body = Qwen2Model(qwen2_config(shape, tokenizer)).eval()
    hidden = shape.hidden
    head = QwenPRMHead(
        {
            "score.0.weight": torch.randn(hidden, hidden) / math.sqrt(hidden),
            "score.0.bias": torch.zeros(hidden),
            "score.2.weight": torch.randn(2, hidden) / math.sqrt(hidden),
            "score.2.bias": torch.zeros(2),
        }
    ).to(config.device)
    cost = prm_model_cost(body, head)
    return HFRewardModel("random-qwen-prm-1.5b", "qwen-prm", body, head, QwenPRMInput(tokenizer), cost, 64)


def pattern_keeps(problem: int, step: int, steps: int, keep_share: float) -> bool:
    """Whether the fixed pattern keeps problem `problem`'s step `step`: of the steps counted across problems (number
    problem x steps + step), a share `1 - keep_share` is rejected, evenly spread."""
    n, rejected = problem * steps + step, 1.0 - keep_share
    return math.floor((n + 1) * rejected + 1e-9) == math.floor(n * rejected + 1e-9)


class PatternedPRM:
    """The PRM, run for real, its rewards replaced by a fixed pattern: of the steps counted across problems (problem
    p's step i is number p x steps + i), a share `1 - keep_share` scores 0, evenly spread, the others 1."""

    def __init__(self, prm: HFRewardModel, keep_share: float, steps: int) -> None:
        self.prm, self.keep_share, self.steps = prm, keep_share, steps
        self.name, self.cost = prm.name, prm.cost

    def score_steps(self, requests: Sequence[RewardRequest]) -> list[RewardOutput]:
        outputs = self.prm.score_steps(requests)
        for request, out in zip(requests, outputs, strict=True):
            out.reward = 1.0 if self.kept(int(str(request.key).rsplit("-", 1)[1]), len(request.steps) - 1) else 0.0
        return outputs

    def kept(self, problem: int, step: int) -> bool:
        return pattern_keeps(problem, step, self.steps, self.keep_share)

    def release(self, keys: Sequence[Any]) -> None:
        self.prm.release(keys)


class SeededAcceptance:
    """The acceptance rule of a run at a set token acceptance: each proposed token stays with probability `rate`,
    until the first that does not (the target's own token follows it). A token's draw is fixed by (seed, round,
    trajectory, position), not taken from a stream: the same round of two runs, of two commits say, meets the same
    draws whatever k their rounds chose, and their times pair up round by round."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate, self.seed = rate, seed
        self.round = 0  # set before each round of the benchmark: each round its own draws

    def __call__(self, proposal: Sequence[int], choices: Sequence[int], start: Draw) -> int:
        key, position = start
        kept = 0
        while kept < len(proposal) and self.draw(key, position + kept) < self.rate:
            kept += 1
        return kept

    def draw(self, key: Hashable, position: int) -> float:
        return random.Random(f"{self.seed}/{self.round}/{key}/{position}").random()


@dataclass
class Models:
    tokenizer: Any
    draft: HFStepGenerator
    target: HFStepGenerator
    prm: HFRewardModel
    speculative: SpeculativeStepGenerator
    acceptance: SeededAcceptance  # the speculative generator's acceptance rule


def build_models(config: BenchConfig) -> Models:
    draft_shape, target_shape = (TINY_DRAFT, TINY_TARGET) if config.tiny else (DRAFT, TARGETS[config.target])
    tokenizer = make_word_tokenizer(draft_shape.vocab)
    dtype = getattr(torch, config.dtype)
    draft = build_lm(draft_shape, tokenizer, config.device, dtype, config.seed)
    target = build_lm(target_shape, tokenizer, config.device, dtype, config.seed + 1)
    prm = build_prm(draft_shape, tokenizer, config, config.seed + 2)
    draft_gen = HFStepGenerator.from_model(draft, tokenizer, name="random-qwen2.5-math-1.5b", role="draft")
    target_gen = HFStepGenerator.from_model(target, tokenizer, name=f"random-qwen2.5-{config.target}", role="target")
    accept = SeededAcceptance(config.token_acceptance, config.seed)
    speculative = SpeculativeStepGenerator(target_gen, draft_gen, accept)
    return Models(tokenizer, draft_gen, target_gen, prm, speculative, accept)


def make_problems(tokenizer: Any, count: int, tokens: int, seed: int, tag: str) -> list[Prompted]:
    """Prompts of `tokens` random words (the question, the PRM's context, is the same text)."""
    rng = random.Random(seed)
    words = len(tokenizer) - len(SPECIAL_TOKENS)
    texts = [" ".join(f"w{rng.randrange(1, words)}" for _ in range(tokens)) for _ in range(count)]
    return [Prompted(key=f"{tag}-{i}", question=text, prompt=text) for i, text in enumerate(texts)]


# -- one measured run of each method ------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of a method: its wall time, split by model where it has several, and what it did."""

    seconds: float
    stats: TrajectoryStats
    forward_ms: dict[str, float] | None = None  # what the speculation rounds measured (`forward_ms`)
    graphs: dict[str, dict[str, Any]] | None = None  # per model: graphs captured in the run, and held after it


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clocked(device: str, work: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of `work` between two device synchronisations, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - start, result


def timed(device: str, work: Callable[[], TrajectoryStats], models: Models) -> Run:
    before = graph_stats(models)
    seconds, stats = clocked(device, work)
    return Run(seconds, stats, graphs=graphs_of_run(before, graph_stats(models)))


def graph_stats(models: Models) -> dict[str, GraphStats]:
    """Each model's CUDA graphs so far (`ModelRunner.graph_stats`)."""
    runners = {"draft": models.draft.engine.runner, "prm": models.prm.runner, "target": models.target.engine.runner}
    return {role: runner.graph_stats for role, runner in runners.items() if isinstance(runner, ModelRunner)}


def graphs_of_run(before: dict[str, GraphStats], after: dict[str, GraphStats]) -> dict[str, dict[str, Any]]:
    """Per model: the graphs a run captured and the seconds they took, the graphs held after it with their GiB, and
    the tokens a slot its forwards ran without graphs for (a capture failed)."""
    return {
        role: {
            "captured": now.captures - before[role].captures,
            "capture_s": now.capture_seconds - before[role].capture_seconds,
            "held": now.held,
            "held_gib": now.held_bytes / 2**30,
            "eager": list(now.eager),
        }
        for role, now in after.items()
    }


def without_graphs(runs_graphs: Iterable[dict[str, dict[str, Any]] | None]) -> dict[str, list[int]]:
    """Per model, the tokens a slot whose forwards ran without CUDA graphs in any of the runs whose `graphs` these
    are (none when every capture worked): times measured so are not the engine's."""
    eager: dict[str, set[int]] = {}
    for graphs_of_models in runs_graphs:
        for role, graphs in (graphs_of_models or {}).items():
            if graphs.get("eager"):
                eager.setdefault(role, set()).update(graphs["eager"])
    return {role: sorted(tokens) for role, tokens in sorted(eager.items())}


def forward_ms(speculative: SpeculativeStepGenerator) -> dict[str, float] | None:
    """The medians of the draft's and the target's forwards that the speculation rounds timed (their most recent
    ones, on a GPU) and their ratio, the draft price that set k: what the rounds really paid, for the ceiling."""
    times = speculative.times
    medians = None if times is None else times.medians()
    if medians is None:
        return None
    return {"draft": medians[0], "target": medians[1], "draft_price": times.draft_price()}


def alone(generator: Any, problems: list[Prompted], config: BenchConfig) -> TrajectoryStats:
    """The target alone (`generator`: plain or speculating): one call writing every token of every problem (no
    delimiter), caches released after. Its statistics as a trajectory's would be."""
    requests = [StepRequest(p.key, generator.encode(p.prompt), config.steps * config.step_tokens) for p in problems]
    try:
        outputs = generator.generate_steps(requests, StepParams(delimiter=""))
    finally:
        generator.release([request.key for request in requests])
    return call_stats(generator, outputs)


def call_stats(generator: Any, outputs: list[StepOutput]) -> TrajectoryStats:
    from rsd.core import ModelUsage

    stats = TrajectoryStats()
    for out in outputs:
        run = out.prefill_tokens + out.decode_tokens
        stats.models["target"].add(
            ModelUsage(out.prefill_tokens, out.decode_tokens, generator.cost.flops(run, out.context_sum))
        )
        stats.target_tokens += len(out.token_ids)
        stats.target_forwards += out.forwards
        if out.speculation is not None:
            stats.speculation.add(out.speculation)
            stats.models["draft"].add(out.speculation.draft)
    return stats


def rsd(models: Models, problems: list[Prompted], config: BenchConfig, plain: bool) -> TrajectoryStats:
    run = RunConfig(step_max_tokens=config.step_tokens, max_new_tokens=config.steps * config.step_tokens,
                    max_steps=config.steps, batch_size=len(problems), seed=config.seed)  # fmt: skip
    fallback = models.target if plain else models.speculative
    prm = PatternedPRM(models.prm, config.keep_share, config.steps)
    # The library's "auto" schedule: rows each on their own with speculative rewrites on a GPU, else lock-step.
    decoder_class = ContinuousDecoder if runs_continuously(fallback, run.batch_size) else StepwiseDecoder
    decoder = decoder_class(models.draft, run, prm, fallback, Threshold(0.5))
    trajectories = decoder.run(problems)  # caches are released as trajectories end: keys can repeat
    stats = TrajectoryStats()
    for traj in trajectories:
        stats.add(traj.stats)
    return stats


def measure_batch(models: Models, config: BenchConfig, batch: int, log: Callable[[str], None]) -> dict:
    problems = make_problems(models.tokenizer, batch, config.prompt_tokens, config.seed, tag=f"b{batch}")
    work: dict[str, Callable[[], TrajectoryStats]] = {
        "target_only": lambda: alone(models.target, problems, config),
        "sd": lambda: alone(models.speculative, problems, config),
        "rsd_plain": lambda: rsd(models, problems, config, plain=True),
        "rsd": lambda: rsd(models, problems, config, plain=False),
    }
    work = {name: work[name] for name in config.methods}
    for warmup in range(config.warmups):
        models.acceptance.round = -1 - warmup
        for run in work.values():
            timed(config.device, run, models)
    runs: dict[str, list[Run]] = {name: [] for name in work}
    for round_index in range(1, config.repeats + 1):
        models.acceptance.round = round_index
        for name, run in work.items():
            runs[name].append(timed(config.device, run, models))
            if name in SPECULATING:
                runs[name][-1].forward_ms = forward_ms(models.speculative)
        log(f"batch {batch}: round {round_index}: " + ", ".join(f"{k} {round_line(v[-1])}" for k, v in runs.items()))
    return summarize_batch(batch, runs)


def round_line(run: Run) -> str:
    """A run's seconds, the graphs it captured (each a device synchronisation and an extra forward) if any, and the
    forwards it ran without graphs if any."""
    line = f"{run.seconds:.3f}s"
    captured = {role: g["captured"] for role, g in (run.graphs or {}).items() if g["captured"]}
    if captured:
        seconds = sum(g["capture_s"] for g in (run.graphs or {}).values())
        line += f" (captured {captured}, {seconds:.2f}s)"
    eager = without_graphs([run.graphs])
    if eager:
        line += f" (without graphs, tokens a slot: {eager})"
    return line


# -- figures ----------------------------------------------------------------------------------------------------------


def median_round(runs: list[Run]) -> Run:
    """The round of median time (the faster of the middle two for an even count): the round the figures describe."""
    return sorted(runs, key=lambda run: run.seconds)[(len(runs) - 1) // 2]


def summarize_batch(batch: int, runs: dict[str, list[Run]]) -> dict:
    seconds = {name: statistics.median(r.seconds for r in rs) for name, rs in runs.items()}
    result: dict[str, Any] = {"batch": batch, "seconds": seconds, "methods": {}}
    for name, rs in runs.items():
        middle = median_round(rs)  # its counts, FLOPs and split: those of the round whose time is reported
        stats = middle.stats
        split = {role: stats.models[role].wall_time_s for role in ("draft", "prm", "target")}
        result["methods"][name] = {
            "seconds": seconds[name],
            "seconds_all": [r.seconds for r in rs],
            "flops": {**{role: u.flops for role, u in stats.models.items()}, "total": stats.total_flops},
            "kept_share": stats.acceptance_rate,
            "target_tokens": stats.target_tokens,
            "target_forwards": stats.target_forwards,
            "target_forwards_per_target_token": stats.target_forwards_per_token,
            "token_acceptance": stats.speculation.token_acceptance_rate,
            "speculation": stats.speculation.to_dict(),
            "split_s": split if name.startswith("rsd") else None,
            "forward_ms": middle.forward_ms,
            "graphs": [r.graphs for r in rs],
        }
    base = seconds.get("target_only")
    for name in seconds:
        if base:
            result["methods"][name]["speedup_vs_target_only"] = base / seconds[name]
    if "rsd" in seconds and "sd" in seconds:
        result["rsd_over_sd"] = seconds["sd"] / seconds["rsd"]
    if "rsd" in seconds and "rsd_plain" in seconds:
        result["rsd_over_rsd_plain"] = seconds["rsd_plain"] / seconds["rsd"]
    return result


def environment(config: BenchConfig) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get(COMMIT_ENV) or git_commit(),
    }
    if config.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def table(results: list[dict], config: BenchConfig) -> str:
    lines = [
        "| batch | method | seconds | vs target-only | target fwd/token | token acc. | kept | "
        "FLOPs (x1e12) | target share of time | draft price (draft / target ms) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for name, m in r["methods"].items():
            split = m["split_s"]
            share = f"{split['target'] / m['seconds']:.0%}" if split else ""
            ms = m["forward_ms"]
            price = f"{ms['draft_price']:.2f} ({ms['draft']:.2f} / {ms['target']:.2f})" if ms else ""
            speedup = m.get("speedup_vs_target_only")  # none where target-only did not run (--methods)
            versus = "" if speedup is None else f"{speedup:.2f}x"
            lines.append(
                f"| {r['batch']} | {name} | {m['seconds']:.2f} | {versus} | "
                f"{fmt(m['target_forwards_per_target_token'])} | {fmt(m['token_acceptance'], '.0%')} | "
                f"{fmt(m['kept_share'], '.0%')} | {m['flops']['total'] / 1e12:.4g} | {share} | {price} |"
            )
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


# -- the run ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test, seconds)")
    parser.add_argument("--target", choices=tuple(TARGETS), help="the target's shape (default 7b)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 16 64)")
    parser.add_argument("--repeats", type=int, help="timed rounds per batch size (default 3)")
    parser.add_argument("--warmups", type=int, help="untimed rounds before them (default 1)")
    parser.add_argument("--steps", type=int, help="steps per problem (default 8)")
    parser.add_argument("--token-acceptance", type=float, help="rate at which a proposed token stays (default 0.8)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to time (default all)")
    parser.add_argument("--out", type=Path, help="folder for gpu_speed_<target>.json")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for name in ("target", "repeats", "warmups", "steps", "token_acceptance"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.batches:
        overrides["batches"] = tuple(args.batches)
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    config = tiny_config(**overrides) if args.tiny else BenchConfig(**overrides)
    if not 0.0 <= config.token_acceptance <= 1.0:
        parser.error("--token-acceptance is a rate in [0, 1]")
    if config.warmups < 0 or config.repeats < 1:
        parser.error("--warmups 0 or more and --repeats 1 or more, please")
    return config, args.out


def main(argv: Sequence[str] | None = None) -> dict:
    config, out_dir = parse_args(argv)
    threads = torch.get_num_threads()
    if config.tiny:
        torch.set_num_threads(1)  # tiny matrices on a busy machine run fastest on one thread
    try:
        return run_benchmark(config, out_dir)
    finally:
        torch.set_num_threads(threads)


def run_benchmark(config: BenchConfig, out_dir: Path | None) -> dict:
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run with --tiny for the CPU smoke test")
    models = build_models(config)
    report: dict[str, Any] = {"config": asdict(config), "environment": environment(config), "results": []}
    log(f"models built ({config.target} target, {config.dtype}); {report['environment']}")
    path = None if out_dir is None else out_dir / f"gpu_speed_{'tiny' if config.tiny else config.target}.json"
    for batch in config.batches:
        report["results"].append(measure_batch(models, config, batch, log))
        if path is not None:  # after every batch size, so a cut-off run keeps what it measured
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2, default=str))
    report["table"] = table(report["results"], config)
    runs_graphs = (graphs for result in report["results"] for m in result["methods"].values() for graphs in m["graphs"])
    report["without_graphs"] = without_graphs(runs_graphs)
    if path is not None:
        path.write_text(json.dumps(report, indent=2, default=str))
    gpu = report["environment"].get("gpu", config.device)
    target = "tiny" if config.tiny else config.target
    print(f"\n{gpu}; target {target}; medians of {config.repeats} rounds; token acceptance {config.token_acceptance}")
    print(report["table"])
    if report["without_graphs"]:
        print(
            f"Without CUDA graphs (a capture failed; the warnings above say why), tokens a slot: "
            f"{report['without_graphs']}. These times are not the engine's."
        )
    return report


if __name__ == "__main__":
    main()
