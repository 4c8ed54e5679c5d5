"""GPU speed of RSD at real model sizes: target-only, RSD and a lock-step re-encoding RSD, side by side.

Random-weight models built from the real configurations (Qwen2.5-Math-1.5B draft, a 1.5B PRM in the
Qwen2ForProcessRewardModel layout, Qwen2.5-Math-7B target), bf16 on one GPU. Prompts of 256 tokens, steps of 64
tokens (random text never writes the delimiter, so the step cap ends every step), 8 steps per problem. The PRM
threshold is calibrated so that 70% of draft steps are kept.

Printed per batch size, in one run:
- target-only: the target alone through the same backend (`HFStepGenerator`, one call writing every token with its
  KV cache, CUDA graphs on a GPU), same tokens, same batch; and, for reference, transformers' own forward in a
  lean greedy loop on a `DynamicCache` (`target_only_hf`);
- RSD: `StepwiseDecoder` with `HFStepGenerator` draft/target and the in-process PRM, its time split between
  draft, PRM, target and the controller (everything between model calls);
- lock-step RSD: the same decoder whose three models forget every cache after each call, so each step re-reads
  the whole trajectory (the paper script's scheme, on the same backend);
- the bound on RSD's speed-up, target-only / (draft + PRM + 0.3 x target), each term timed alone on the same work
  (the draft through the backend like the target, the PRM in a lean loop), and a bandwidth-aware variant whose
  target term is the target alone on the rows RSD actually gives it (see `target_rewrite_term`);
- peak GPU memory of each method.
Timings: synchronised host clocks, a warm-up of every method first, medians over `--repeats` rounds.

    python benchmarks/gpu_speed.py --batches 16 --out results/   # real sizes: ~23 GiB of GPU memory, ~8 minutes
    python benchmarks/gpu_speed.py --tiny                        # tiny models on the CPU, seconds (the smoke test)

Results and what limits RSD: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rsd.backends.hf import HFStepGenerator
from rsd.backends.static_decode import DECODE_MODES, MAX_GRAPHS, StaticDecoder, bucket_width
from rsd.calibration import delta_for_keep_share, step_rewards
from rsd.core import RewardOutput, RewardRequest, StepOutput, StepParams, StepRequest, TrajectoryStats
from rsd.hf_loading import CUDNN_ATTENTION_ENV
from rsd.loop import Prompted, RunConfig, StepwiseDecoder
from rsd.policies import Threshold
from rsd.rewards.formats import QwenPRMInput
from rsd.rewards.hf import HFRewardModel, QwenPRMHead
from rsd.rewards.hf import model_cost as prm_model_cost

# The Qwen chat template, as the tiny test tokenizers carry it (the Qwen PRM input builder renders it).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
GOAL_BATCHES = (16, 64)  # the batch sizes the goals are stated for
# --kernels ab: one decode token each way: transformers' modules; fused norm and rotation; also the projections
# fused (as shipped); that compiled.
REPLAY_VARIANTS = ("modules", "fused", "projections", "compiled")
# BenchConfig fields that a command-line flag of the same name sets.
FLAG_SETTINGS = ("repeats", "steps", "warmup_steps", "deadline_s", "device", "sdpa", "decode", "prefill", "ride")
FLAG_SETTINGS += ("overlap", "kernels", "prefill_scale", "projections", "arena_prefill", "triton", "packed_prefill")
# RSD runs with one setting changed, timed side by side with RSD as shipped (`rsd_eager` with --decode ab, the
# others from `rsd_variant_settings`).
RSD_VARIANTS = ("rsd_cudnn", "rsd_eager", "rsd_one_prefill", "rsd_no_ride", "rsd_no_overlap", "rsd_prefill_scaled")
RSD_VARIANTS += ("rsd_unfused", "rsd_transformers_prefill", "rsd_no_triton", "rsd_padded_prefill")
COMMIT_ENV = "RSD_BENCH_COMMIT"  # the commit a run measured, recorded in its environment
ONE_FORWARD = 10**12  # a price per prefill forward, in tokens, that no padding reaches: never split
RUN_IDS = itertools.count(1)  # makes every decoder run's trajectory keys new


# -- what to run --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The fields of a Qwen2 configuration that decide its speed."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # input embedding shared with the LM head (the 1.5B models tie, the 7B does not)


REAL_SHAPES = {
    "draft": Shape(1536, 28, 12, 2, 8960, 151936, True),  # Qwen2.5-Math-1.5B
    "prm": Shape(1536, 28, 12, 2, 8960, 151936, True),  # a 1.5B Qwen2ForProcessRewardModel body
    "target": Shape(3584, 28, 28, 4, 18944, 152064, False),  # Qwen2.5-Math-7B
}
TINY_SHAPES = {
    "draft": Shape(128, 2, 2, 1, 256, 512, True),
    "prm": Shape(128, 2, 2, 1, 256, 512, True),
    "target": Shape(256, 3, 4, 1, 512, 640, False),
}


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 256
    step_tokens: int = 64  # the step cap; random text has no delimiter, so every step is this long
    steps: int = 8
    keep_share: float = 0.7  # share of draft steps the calibrated threshold keeps
    batches: tuple[int, ...] = (16, 64, 1)  # goal sizes first, so a deadline cuts the least useful one
    repeats: int = 3  # timed rounds of every method; medians are reported
    # Steps per problem in the untimed warm-up of each method. Full length by default: with torch >= 2.11 on
    # Hopper, SDPA may go to cuDNN, which builds a plan for every new (batch, length) shape, so a shorter warm-up
    # leaves the first timed round paying for the longer shapes (seen on an H200: 27 s against 15 s).
    warmup_steps: int = 8
    deadline_s: float = 0.0  # stop starting new rounds past this many seconds (0: none); one round always runs
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0
    profile: bool = True  # per-forward wall time against GPU kernel time and a CUDA-graph replay
    # The target alone in transformers' own lean loop, for reference (about 10 s a round at real sizes).
    lean_reference: bool = True
    # The backend keeps SDPA off cuDNN (rsd.hf_loading.attention_without_cudnn). "no-cudnn" also takes cuDNN out
    # for the lean loops here; "ab" adds the method `rsd_cudnn`: RSD with cuDNN allowed, side by side in every
    # round, which is how the backend's choice was measured.
    sdpa: str = "default"
    # How the backend decodes (rsd.backends.static_decode): auto (CUDA graphs on a GPU), eager, static, graphs; "ab"
    # runs auto and adds RSD and target-only through transformers' eager forward, side by side in every round.
    decode: str = "auto"
    # Prefill forwards (rsd.backends.packing): "split" by tail length as shipped, "one" forward per call whatever
    # the tails, "ab": split, plus RSD with one forward per call (`rsd_one_prefill`), side by side in every round.
    prefill: str = "split"
    # The kept steps ride along the target's decoding as cache-only requests (StepRequest.cache_only): "on" as
    # shipped on GPUs, "off", or "ab": on, plus RSD without riding (`rsd_no_ride`), side by side in every round.
    ride: str = "on"
    # Above 0: also RSD with every model's price of one more prefill forward scaled by this (`rsd_prefill_scaled`).
    prefill_scale: float = 0.0
    # Static decoding queues each forward before the host reads the tokens before it: "on" as shipped, or "ab":
    # plus RSD with the host's stop checks and the GPU taking turns (`rsd_no_overlap`), side by side.
    overlap: str = "on"
    # "ab" adds RSD whose prefills (generators' and PRM's) run transformers' forward over a stacked cache
    # (`rsd_transformers_prefill`), side by side with rsd's own forward in a KV arena as shipped on a GPU.
    arena_prefill: str = "on"
    # "ab" adds a table of one decode token's CUDA-graph replay time per model, with the static forward's fused
    # RMSNorm and rotation against transformers' own modules, at the batch sizes run (`replay_ms`).
    kernels: str = "fused"
    # "ab" adds RSD and target-only with each projection its own matrix product in the static decode forward
    # (`rsd_unfused`, `target_only_unfused`), side by side with the fused products as shipped.
    projections: str = "on"
    # "ab" adds RSD and target-only decoding without rsd's Triton kernels (`rsd_no_triton`, `target_only_no_triton`:
    # attention through SDPA, each layer's small operations as torch operations), side by side with them as shipped.
    triton: str = "on"
    packed_prefill: str = "on"  # ab: also RSD with padded arena prefills (torch operations, SDPA), side by side
    tiny: bool = False

    @property
    def new_tokens(self) -> int:
        return self.steps * self.step_tokens


def tiny_config(**overrides: Any) -> BenchConfig:
    settings: dict[str, Any] = dict(
        prompt_tokens=12, step_tokens=4, steps=3, batches=(1, 3), repeats=1, warmup_steps=3,
        device="cpu", dtype="float32", profile=False, tiny=True,
    )  # fmt: skip
    settings.update(overrides)
    return BenchConfig(**settings)


# -- the threshold ------------------------------------------------------------------------------------------------


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
    assert len(tokenizer) == vocab_size
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
        attn_implementation="sdpa",
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


def banned_token_ids(tokenizer: Any, vocab: int) -> list[int]:
    """Ids a random model must never write: `<unk>`, the special tokens (EOS would end a trajectory early) and the
    padding rows past the tokenizer (the 7B's vocabulary is padded; the draft could not read those ids)."""
    return [0, *tokenizer.all_special_ids, *range(len(tokenizer), vocab)]


def build_lm(shape: Shape, tokenizer: Any, device: str, dtype: torch.dtype, seed: int) -> Any:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with building_on(device, dtype):
        model = Qwen2ForCausalLM(qwen2_config(shape, tokenizer))
    with torch.no_grad():
        # A zero row scores 0 while the best of ~150k random logits is far above it: greedy never picks these.
        model.lm_head.weight[banned_token_ids(tokenizer, shape.vocab)] = 0.0
    return model.eval()


def build_prm(shape: Shape, tokenizer: Any, device: str, dtype: torch.dtype, seed: int, batch: int) -> HFRewardModel:
    """A Qwen2 body and the Qwen2.5-Math-PRM head (score.0 / score.2), random, as `rsd.rewards.hf` runs them."""
    from transformers import Qwen2Model

    torch.manual_seed(seed)
    with building_on(device, dtype):
        body = Qwen2Model(qwen2_config(shape, tokenizer)).eval()
    hidden = shape.hidden
    head_tensors = {
        "score.0.weight": torch.randn(hidden, hidden) / math.sqrt(hidden),
        "score.0.bias": torch.zeros(hidden),
        "score.2.weight": torch.randn(2, hidden) / math.sqrt(hidden),
        "score.2.bias": torch.zeros(2),
    }
    head = QwenPRMHead(head_tensors).to(device).eval()
    builder = QwenPRMInput(tokenizer)
    cost = prm_model_cost(body, head)
    return HFRewardModel("random-qwen-prm-1.5b", "qwen-prm", body, head, builder, cost, max_batch_size=batch)


@dataclass
class Models:
    tokenizer: Any
    draft: HFStepGenerator
    target: HFStepGenerator
    prm: HFRewardModel

    def eager(self) -> Models:
        """The same models and caches-to-be, decoding through transformers' own forward."""
        draft, target = (
            HFStepGenerator.from_model(g.model, self.tokenizer, name=g.name, role=g.role, decode="eager")
            for g in (self.draft, self.target)
        )
        return Models(self.tokenizer, draft, target, self.prm)


def build_models(config: BenchConfig) -> Models:
    shapes = TINY_SHAPES if config.tiny else REAL_SHAPES
    dtype = getattr(torch, config.dtype)
    tokenizer = make_word_tokenizer(shapes["draft"].vocab)
    draft = build_lm(shapes["draft"], tokenizer, config.device, dtype, config.seed)
    target = build_lm(shapes["target"], tokenizer, config.device, dtype, config.seed + 1)
    prm = build_prm(shapes["prm"], tokenizer, config.device, dtype, config.seed + 2, max(config.batches))
    decode = "auto" if config.decode == "ab" else config.decode
    models = Models(
        tokenizer,
        HFStepGenerator.from_model(draft, tokenizer, name="random-qwen2.5-math-1.5b", role="draft", decode=decode),
        HFStepGenerator.from_model(target, tokenizer, name="random-qwen2.5-math-7b", role="target", decode=decode),
        prm,
    )
    if config.prefill == "one":
        for holder in (models.draft, models.target, models.prm):
            holder.prefill_forward_tokens = ONE_FORWARD
    models.target.ride_along = config.ride != "off"
    return models


def random_text(rng: random.Random, words: int, tokens: int) -> str:
    """`tokens` random words of the word-level tokenizer: exactly `tokens` ids, no special token, no delimiter."""
    return " ".join(f"w{rng.randrange(1, words)}" for _ in range(tokens))


def make_problems(tokenizer: Any, count: int, tokens: int, seed: int, tag: str) -> list[Prompted]:
    """Prompts of `tokens` random words (the question, the PRM's context, is the same text)."""
    rng = random.Random(seed)
    words = len(tokenizer) - len(SPECIAL_TOKENS)
    problems = []
    for i in range(count):
        text = random_text(rng, words, tokens)
        problems.append(Prompted(key=f"{tag}-{i}", question=text, prompt=text))
    return problems


# -- timing -------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, work: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of `work` between two device synchronisations, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - start, result


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


# -- the lean reference loops: one model, no controller, no host round trip per token ---------------------------


def cache_kwarg(model: Any) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.2x.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_decode(model: Any, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Prefill the prompts, then decode `new_tokens` greedily with a DynamicCache; tokens stay on the device."""
    from transformers import DynamicCache

    cache = DynamicCache()
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    token = model(input_ids=prompt_ids, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    for _ in range(new_tokens - 1):
        token = model(input_ids=token, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def backend_decode(generator: HFStepGenerator, prompts: list[list[int]], new_tokens: int) -> list[StepOutput]:
    """One model alone through the backend: one call per batch writing `new_tokens` per row (no delimiter), the
    way RSD's own calls run, caches released after."""
    run = next(RUN_IDS)
    requests = [StepRequest(f"alone-{run}-{i}", ids, new_tokens) for i, ids in enumerate(prompts)]
    try:
        return generator.generate_steps(requests, StepParams(delimiter=""))
    finally:
        generator.release([request.key for request in requests])


@torch.inference_mode()
def prm_scoring(prm: HFRewardModel, chunks: list[torch.Tensor]) -> list[list[float]]:
    """The PRM's work in RSD without the adapter: the first chunk (prompt and first step), then one chunk per
    step on a growing cache, the head at each chunk's last position (the step tag), rewards read back each step."""
    from transformers import DynamicCache

    cache = DynamicCache()
    kwargs = {cache_kwarg(prm.body): cache, "use_cache": True}
    rewards = []
    for chunk in chunks:
        hidden = prm.body(input_ids=chunk, **kwargs).last_hidden_state[:, -1]
        rewards.append(prm.head(hidden).float().tolist())
    return rewards


def prm_chunks(models: Models, problems: list[Prompted], config: BenchConfig, seed: int) -> list[torch.Tensor]:
    """The PRM inputs of `steps` random steps, split where each step's reward is read (after its tag)."""
    rng = random.Random(seed)
    words = len(models.tokenizer) - len(SPECIAL_TOKENS)
    tag = models.tokenizer.convert_tokens_to_ids("<extra_0>")
    rows = []
    for problem in problems:
        steps = [random_text(rng, words, config.step_tokens) for _ in range(config.steps)]
        ids = models.prm.builder.build_ids(problem.question, steps)
        ends = [i + 1 for i, t in enumerate(ids) if t == tag]
        rows.append([ids[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)])
    device = models.prm.device
    # Every row has the same lengths (same prompt and step sizes), so chunks stack without padding.
    return [torch.tensor([row[k] for row in rows], device=device) for k in range(config.steps)]


def prompt_tensor(models: Models, problems: list[Prompted], device: str) -> torch.Tensor:
    return torch.tensor([models.draft.encode(p.prompt) for p in problems], device=device)


# -- the lock-step scheme: the same backend, every cache forgotten after each call ------------------------------


class Reencoding:
    """A step generator that releases every trajectory's cache after each call: each step re-reads its prefix."""

    def __init__(self, inner: HFStepGenerator) -> None:
        self.inner = inner
        self.name = inner.name
        self.cost = inner.cost

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def vocabulary_fingerprint(self) -> str:
        return self.inner.vocabulary_fingerprint()

    def generate_steps(self, requests: Sequence[StepRequest], params: StepParams) -> list[StepOutput]:
        try:
            return self.inner.generate_steps(requests, params)
        finally:
            self.inner.release([r.key for r in requests])

    def release(self, keys: Sequence[Hashable]) -> None:
        self.inner.release(keys)


class ReencodingPRM:
    """A PRM that forgets every prefix after each call: each step's score re-reads the whole trajectory."""

    def __init__(self, inner: HFRewardModel) -> None:
        self.inner = inner
        self.name = inner.name
        self.cost = inner.cost

    def score_steps(self, requests: Sequence[RewardRequest]) -> list[RewardOutput]:
        try:
            return self.inner.score_steps(requests)
        finally:
            self.inner.release([r.key for r in requests])

    def release(self, keys: Sequence[Hashable]) -> None:
        self.inner.release(keys)


# -- one measured run of each method ------------------------------------------------------------------------------


@dataclass
class DecodeRun:
    """One `StepwiseDecoder.run`: wall time, its split, the tokens it wrote and how many proposals it kept."""

    seconds: float
    split: dict[str, float]  # draft, prm, target, controller (seconds)
    tokens: int
    kept: int
    proposed: int
    rewards: list[float] = field(default_factory=list)


def run_decoder(decoder: StepwiseDecoder, problems: list[Prompted], device: str) -> DecodeRun:
    seconds, trajectories = timed(device, lambda: decoder.run(problems))
    total = TrajectoryStats()
    for traj in trajectories:
        total.add(traj.stats)
    split = {role: total.models[role].wall_time_s for role in ("draft", "prm", "target")}
    split["controller"] = seconds - sum(split.values())
    return DecodeRun(
        seconds=seconds,
        split=split,
        tokens=sum(t.num_generated_tokens for t in trajectories),
        kept=total.steps_kept,
        proposed=total.steps_kept + total.steps_rejected,
        rewards=step_rewards(trajectories),
    )


def run_config(config: BenchConfig, batch: int, steps: int) -> RunConfig:
    return RunConfig(
        step_max_tokens=config.step_tokens,
        max_new_tokens=steps * config.step_tokens,
        max_steps=steps,
        batch_size=batch,
        seed=config.seed,
    )


def rsd_decoder(models: Models, run: RunConfig, delta: float, lockstep: bool = False) -> StepwiseDecoder:
    if lockstep:
        draft, target, prm = Reencoding(models.draft), Reencoding(models.target), ReencodingPRM(models.prm)
        return StepwiseDecoder(draft, run, reward_model=prm, fallback=target, policy=Threshold(delta))  # type: ignore[arg-type]
    return StepwiseDecoder(models.draft, run, reward_model=models.prm, fallback=models.target, policy=Threshold(delta))


def calibrate(models: Models, config: BenchConfig, problems: list[Prompted]) -> tuple[float, int]:
    """Score every draft step of a keep-all pass (delta 0 keeps every reward in [0, 1]); delta keeps 70% of them."""
    decoder = rsd_decoder(models, run_config(config, len(problems), config.steps), delta=0.0)
    rewards = run_decoder(decoder, problems, config.device).rewards
    return delta_for_keep_share(rewards, config.keep_share), len(rewards)


def target_rewrite_term(config: BenchConfig, batch: int, time_on_rows: Callable[[int], float]) -> float:
    """The target's time alone on the work RSD hands it, while decoding is bandwidth-bound (a forward costs about
    the same for 1 or 64 rows): per step, the rejected rows, about (1 - keep) x batch of them, decode together, and
    the target runs at all only in steps with at least one rejection, which happen with probability 1 - keep^batch.
    """
    reject = 1.0 - config.keep_share
    rows = max(1, math.ceil(reject * batch))
    return (1.0 - config.keep_share**batch) * time_on_rows(rows)


# -- one batch size -------------------------------------------------------------------------------------------------


def measure_batch(models: Models, config: BenchConfig, batch: int, started: float, log: Callable[[str], None]) -> dict:
    device = config.device
    problems = make_problems(models.tokenizer, batch, config.prompt_tokens, config.seed, tag=f"b{batch}")
    delta, scored = calibrate(models, config, problems)
    log(f"batch {batch}: delta {delta:.6f} keeps {config.keep_share:.0%} of {scored} calibration rewards")

    prompts = prompt_tensor(models, problems, device)
    prompt_ids = prompts.tolist()
    rewrite_rows = max(1, math.ceil((1.0 - config.keep_share) * batch))
    chunks = prm_chunks(models, problems, config, config.seed)
    tokens = lambda steps: steps * config.step_tokens  # noqa: E731

    def rsd(steps: int, on: Models = models, lockstep: bool = False) -> DecodeRun:
        decoder = rsd_decoder(on, run_config(config, batch, steps), delta, lockstep=lockstep)
        return run_decoder(decoder, fresh(problems, steps), device)

    methods: dict[str, Callable[[int], Any]] = {
        "target_only": lambda steps: backend_decode(models.target, prompt_ids, tokens(steps)),
        "rsd": rsd,
        "lockstep": lambda steps: rsd(steps, lockstep=True),
        "draft_alone": lambda steps: backend_decode(models.draft, prompt_ids, tokens(steps)),
        "prm_alone": lambda steps: prm_scoring(models.prm, chunks[:steps]),
    }
    if config.lean_reference:
        methods["target_only_hf"] = lambda steps: greedy_decode(models.target.model, prompts, tokens(steps))
    if config.decode == "ab":
        eager = models.eager()
        methods["target_only_eager"] = lambda steps: backend_decode(eager.target, prompt_ids, tokens(steps))
        methods["rsd_eager"] = lambda steps: rsd(steps, eager)
    if config.projections == "ab":
        methods["target_only_unfused"] = lambda steps: without_fused_projections(
            models, lambda: backend_decode(models.target, prompt_ids, tokens(steps))
        )
    if config.triton == "ab":
        methods["target_only_no_triton"] = lambda steps: without_triton_kernels(
            models, lambda: backend_decode(models.target, prompt_ids, tokens(steps))
        )
    for name, setting in rsd_variant_settings(config, models).items():  # RSD with one setting changed
        methods[name] = lambda steps, setting=setting: setting(lambda: rsd(steps))
    if rewrite_rows < batch:  # else it is target-only's work, already timed
        methods["target_rewrite_rows"] = lambda steps: backend_decode(
            models.target, prompt_ids[:rewrite_rows], tokens(steps)
        )
    for work in methods.values():  # warm-up: kernels chosen, allocator grown, handles made
        timed(device, lambda work=work: work(min(config.warmup_steps, config.steps)))

    seconds: dict[str, list[float]] = {name: [] for name in methods}
    runs: dict[str, list[DecodeRun]] = {name: [] for name in ("rsd", "lockstep", *RSD_VARIANTS)}
    peaks: dict[str, float | None] = {}
    for round_index in range(config.repeats):
        if round_index > 0 and config.deadline_s and time.perf_counter() - started > config.deadline_s:
            log(f"batch {batch}: deadline reached after {round_index} round(s)")
            break
        for name, work in methods.items():
            reset_peak_memory(device)
            elapsed, result = timed(device, lambda work=work: work(config.steps))
            peak = peak_memory_gib(device)
            peaks[name] = max(peaks.get(name) or 0.0, peak) if peak is not None else None
            if isinstance(result, DecodeRun):
                runs[name].append(result)
                elapsed = result.seconds
            seconds[name].append(elapsed)
        log(f"batch {batch}: round {round_index + 1} " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in seconds.items()))
    return summarize_batch(config, batch, delta, seconds, runs, peaks)


def rsd_variant_settings(config: BenchConfig, models: Models) -> dict[str, Callable[[Callable[[], Any]], Any]]:
    """The RSD variants this run times side by side (each flag's "ab"), as settings that run some work with one
    thing changed and put it back."""
    wanted = {
        "rsd_one_prefill": config.prefill == "ab",
        "rsd_prefill_scaled": bool(config.prefill_scale),
        "rsd_no_ride": config.ride == "ab",
        "rsd_no_overlap": config.overlap == "ab",
        "rsd_cudnn": config.sdpa == "ab",
        "rsd_unfused": config.projections == "ab",
        "rsd_transformers_prefill": config.arena_prefill == "ab",
        "rsd_no_triton": config.triton == "ab",
        "rsd_padded_prefill": config.packed_prefill == "ab",
    }
    settings: dict[str, Callable[[Callable[[], Any]], Any]] = {
        "rsd_one_prefill": lambda work: with_one_prefill_forward(models, work),
        "rsd_prefill_scaled": lambda work: with_prefill_prices(
            models, lambda price: max(1, round(price * config.prefill_scale)), work
        ),
        "rsd_no_ride": lambda work: without_riding(models, work),
        "rsd_no_overlap": lambda work: without_overlap(models, work),
        "rsd_transformers_prefill": lambda work: with_transformers_prefill(models, work),
        "rsd_cudnn": with_cudnn_attention,
        "rsd_unfused": lambda work: without_fused_projections(models, work),
        "rsd_no_triton": lambda work: without_triton_kernels(models, work),
        "rsd_padded_prefill": lambda work: with_padded_prefills(models, work),
    }
    return {name: setting for name, setting in settings.items() if wanted[name]}


def with_one_prefill_forward(models: Models, work: Callable[[], Any]) -> Any:
    """Run `work` with every model prefilling each call's rows in one padded forward (no split by length)."""
    return with_prefill_prices(models, lambda price: ONE_FORWARD, work)


def with_prefill_prices(models: Models, new_price: Callable[[int], int], work: Callable[[], Any]) -> Any:
    """Run `work` with each model's price of one more prefill forward (packing.py) set to new_price(its price)."""
    holders = (models.draft, models.target, models.prm)
    prices = [holder.prefill_forward_tokens for holder in holders]
    for holder, price in zip(holders, prices, strict=True):
        holder.prefill_forward_tokens = new_price(price)
    try:
        return work()
    finally:
        for holder, price in zip(holders, prices, strict=True):
            holder.prefill_forward_tokens = price


def without_riding(models: Models, work: Callable[[], Any]) -> Any:
    """Run `work` with the target catching up on kept steps only when it next writes a step (a prefill then)."""
    models.target.ride_along = False
    try:
        return work()
    finally:
        models.target.ride_along = True


def without_overlap(models: Models, work: Callable[[], Any]) -> Any:
    """Run `work` with the host reading each decode forward's tokens before it queues the next one."""
    return with_generators(models, work, overlap_decode=False)


def with_transformers_prefill(models: Models, work: Callable[[], Any]) -> Any:
    """Run `work` with every model's prefills through transformers' forward over a stacked cache (the generators'
    then copied into their arenas) instead of rsd's own forward in a KV arena."""
    scored_in_arena = models.prm.arena_prefill
    models.prm.arena_prefill = False
    try:
        return with_generators(models, work, arena_prefill=False)
    finally:
        models.prm.arena_prefill = scored_in_arena


def with_generators(models: Models, work: Callable[[], Any], **settings: Any) -> Any:
    """Run `work` with the draft's and target's generator attributes `settings` changed, then put them back."""
    generators = (models.draft, models.target)
    before = [{name: getattr(generator, name) for name in settings} for generator in generators]
    for generator in generators:
        for name, value in settings.items():
            setattr(generator, name, value)
    try:
        return work()
    finally:
        for generator, values in zip(generators, before, strict=True):
            for name, value in values.items():
                setattr(generator, name, value)


def without_fused_projections(models: Models, work: Callable[[], Any]) -> Any:
    """Run `work` with each of the draft's and target's projections its own matrix product when decoding. Each
    setting keeps its own CUDA graphs (twice as many kept), so neither pays for capturing again."""
    decoders = [d for d in (models.draft.static_decoder, models.target.static_decoder) if d is not None]
    for decoder in decoders:
        decoder.fuse_projections = False
        decoder.max_graphs = 2 * MAX_GRAPHS
    try:
        return work()
    finally:
        for decoder in decoders:
            decoder.fuse_projections = True


def without_triton_kernels(models: Models, work: Callable[[], Any]) -> Any:
    """Run `work` with the draft's and target's decode tokens attending through SDPA and each layer's small
    operations as torch operations, instead of rsd's Triton kernels. Each setting keeps its own CUDA graphs (twice
    as many kept), so neither pays for capturing again."""
    decoders = [d for d in (models.draft.static_decoder, models.target.static_decoder) if d is not None]
    before = [(d.attention, d.layer_kernels) for d in decoders]
    for decoder in decoders:
        decoder.attention, decoder.layer_kernels = "sdpa", False
        decoder.max_graphs = 2 * MAX_GRAPHS
    try:
        return work()
    finally:
        for decoder, (kind, layer_kernels) in zip(decoders, before, strict=True):
            decoder.attention, decoder.layer_kernels = kind, layer_kernels


def with_padded_prefills(models: Models, work: Callable[[], Any]) -> Any:
    """Run `work` with every arena prefill (the draft's, the target's, the PRM's) padded to its longest tail and run
    through torch operations and SDPA, in forwards grouped by tail length, instead of packed through rsd's Triton
    kernels."""
    decoders = [d for d in (models.draft.static_decoder, models.target.static_decoder) if d is not None]
    if models.prm.arena_prefill:
        decoders.append(models.prm.arena_decoder())
    for decoder in decoders:
        decoder.pack_prefill = False
    try:
        return work()
    finally:
        for decoder in decoders:
            decoder.pack_prefill = True


def with_cudnn_attention(work: Callable[[], Any]) -> Any:
    """Run `work` with the backend leaving SDPA's choice alone, cuDNN attention included."""
    previous = os.environ.get(CUDNN_ATTENTION_ENV)
    os.environ[CUDNN_ATTENTION_ENV] = "1"
    try:
        return work()
    finally:
        if previous is None:
            del os.environ[CUDNN_ATTENTION_ENV]
        else:
            os.environ[CUDNN_ATTENTION_ENV] = previous


def fresh(problems: list[Prompted], steps: int) -> list[Prompted]:
    """The same problems under keys never seen before, so no run finds another run's caches."""
    run = next(RUN_IDS)
    return [Prompted(f"{p.key}-run{run}-s{steps}", p.question, p.prompt) for p in problems]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def median_split(runs: Sequence[DecodeRun]) -> dict[str, float]:
    """Per role, the median over runs of its seconds."""
    return {role: median([run.split[role] for run in runs]) for role in runs[0].split}


def summarize_batch(
    config: BenchConfig,
    batch: int,
    delta: float,
    seconds: dict[str, list[float]],
    runs: dict[str, list[DecodeRun]],
    peaks: dict[str, float | None],
) -> dict:
    t = {name: median(values) for name, values in seconds.items()}
    tokens = batch * config.new_tokens
    rsd_runs, lock_runs = runs["rsd"], runs["lockstep"]
    split = median_split(rsd_runs)
    rewrite = target_rewrite_term(config, batch, lambda rows: t.get("target_rewrite_rows", t["target_only"]))
    bound = t["target_only"] / (t["draft_alone"] + t["prm_alone"] + (1.0 - config.keep_share) * t["target_only"])
    bandwidth_bound = t["target_only"] / (t["draft_alone"] + t["prm_alone"] + rewrite)
    speedup = t["target_only"] / t["rsd"]
    kept = sum(r.kept for r in rsd_runs) / max(1, sum(r.proposed for r in rsd_runs))
    figures = {
        "batch": batch,
        "delta": delta,
        "tokens_per_run": tokens,
        "rsd_tokens_checked": [r.tokens for r in rsd_runs],
        "seconds_median": t,
        "seconds_all": seconds,
        "tokens_per_s": {name: tokens / t[name] for name in ("target_only", "rsd", "lockstep")},
        "rsd_split_s": split,
        "rsd_split_share": {role: value / t["rsd"] for role, value in split.items()},
        "lockstep_split_s": median_split(lock_runs),
        "rsd_split_per_round_s": [r.split for r in rsd_runs],
        "lockstep_split_per_round_s": [r.split for r in lock_runs],
        "rsd_kept_share": kept,
        "lockstep_kept_share": sum(r.kept for r in lock_runs) / max(1, sum(r.proposed for r in lock_runs)),
        "speedup": speedup,
        "bound": bound,
        "speedup_over_bound": speedup / bound,
        "target_rewrite_term_s": rewrite,
        "bandwidth_bound": bandwidth_bound,
        "speedup_over_bandwidth_bound": speedup / bandwidth_bound,
        "rsd_over_lockstep": t["lockstep"] / t["rsd"],
        "peak_memory_gib": peaks,
        "rounds": len(seconds["rsd"]),
        **{key: value for name in RSD_VARIANTS for key, value in variant_figures(t, runs[name], name).items()},
    }
    if "target_only_hf" in t:
        figures["target_only_hf_over_backend"] = t["target_only_hf"] / t["target_only"]
    if runs["rsd_eager"]:
        figures["target_only_over_eager"] = t["target_only_eager"] / t["target_only"]
    if runs["rsd_unfused"]:
        figures["target_only_over_unfused"] = t["target_only_unfused"] / t["target_only"]
    if runs["rsd_no_triton"]:
        figures["target_only_over_no_triton"] = t["target_only_no_triton"] / t["target_only"]
    return figures


def variant_figures(t: dict[str, float], runs: list[DecodeRun], name: str) -> dict:
    """An RSD variant timed side by side in the same rounds (`RSD_VARIANTS`, each with its --flag ab): its time,
    split, speed-up and share of steps kept, and how much faster RSD as shipped is."""
    if not runs:
        return {}
    return {
        f"{name}_s": t[name],
        f"{name}_split_s": median_split(runs),
        f"{name}_speedup": t["target_only"] / t[name],
        f"rsd_over_{name}": t[name] / t["rsd"],
        # Another kernel rounds differently in bf16, so a reward near the threshold can flip: a variant may keep
        # other steps than RSD as shipped, and its target then has other work.
        f"{name}_kept_share": sum(r.kept for r in runs) / max(1, sum(r.proposed for r in runs)),
    }


def goals(result: dict) -> dict[str, bool]:
    """The issue's goals, for one batch size."""
    share = result["rsd_split_share"]
    return {
        "speedup >= 85% of bound": result["speedup_over_bound"] >= 0.85,
        "rsd >= 1.5x lock-step": result["rsd_over_lockstep"] >= 1.5,
        "prm <= 10% of time": share["prm"] <= 0.10,
        "controller <= 5% of time": share["controller"] <= 0.05,
    }


# -- what limits a forward: wall time, GPU kernel time, CUDA-graph replay ------------------------------------------


@torch.inference_mode()
def profile_forward(model: Any, batch: int, context: int, device: str, vocab: int) -> dict:
    """One decode forward at `context` cached tokens: synchronised wall time, the time its kernels keep the GPU
    busy (torch.profiler), and a replay of the same forward captured as a CUDA graph (no launch overhead)."""
    from transformers import DynamicCache

    ids = torch.randint(1, vocab // 2, (batch, context), device=device)
    cache = DynamicCache()
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    model(input_ids=ids, **kwargs)
    token = ids[:, -1:]
    walls = []
    for _ in range(8):
        seconds, _ = timed(device, lambda: model(input_ids=token, **kwargs))
        walls.append(seconds)
        cache.crop(-1)  # keep the context fixed
    out = {"wall_ms": 1e3 * median(walls[2:])}
    out["kernel_ms"] = kernel_time_ms(lambda: (model(input_ids=token, **kwargs), cache.crop(-1)), device)
    try:
        out["graph_ms"] = graph_replay_ms(model, batch, context, device, vocab)
    except Exception as exc:  # the probe is optional: a transformers version may not capture; say why
        out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def kernel_time_ms(work: Callable[[], Any], device: str, repeats: int = 3) -> float | None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            work()
        synchronize(device)
    events = prof.events()
    # Kernels are events of their own on the device; where a version attaches them to the CPU ops instead, each
    # op's self device time counts its kernels once.
    kernels = [e for e in events if e.device_type.name != "CPU"]
    busy_us = sum(e.device_time_total for e in kernels) if kernels else sum(e.self_device_time_total for e in events)
    return busy_us / 1e3 / repeats


def graph_replay_ms(model: Any, batch: int, context: int, device: str, vocab: int) -> float:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + 64)
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    prompt = torch.randint(1, vocab // 2, (batch, context), device=device)
    model(input_ids=prompt, position_ids=torch.arange(context, device=device)[None].expand(batch, -1), **kwargs)
    token = prompt[:, -1:].clone()
    position = torch.full((batch, 1), context, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(input_ids=token, position_ids=position, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(input_ids=token, position_ids=position, **kwargs)
    replays = 16
    seconds, _ = timed(device, lambda: [graph.replay() for _ in range(replays)])
    return 1e3 * seconds / replays


# -- one decode token of the static forward: fused kernels against transformers' modules ----------------------------


@torch.inference_mode()
def replay_seconds(model: Any, rows: int, width: int, variant: str, device: str, replays: int, rounds: int) -> float:
    """Median over `rounds` of one decode token's time through a fresh static decoder (a CUDA graph replay on a
    GPU), the arena half full. `variant`: "modules" (transformers' RMSNorm, rotation and projections), "fused"
    (fused RMSNorm and rotation, each projection its own product), "projections" (also the projections fused: as
    shipped), or "compiled" (as shipped, the layers through torch.compile: inductor on a GPU, its tracing alone on
    the CPU)."""
    cuda = device.startswith("cuda")
    static = StaticDecoder(model, use_graphs=cuda)
    static.fused_kernels = variant != "modules"
    static.fuse_projections = variant in ("projections", "compiled")
    if variant == "compiled":
        static.compile_layers(backend="inductor" if cuda else "aot_eager")
    static.load_blank(rows, filled=width // 2, new_tokens=width - width // 2)
    static.replay()  # captures the graph on a GPU
    times = []
    for _ in range(rounds):
        elapsed, _ = timed(device, lambda: [static.replay() for _ in range(replays)])
        times.append(elapsed / replays)
    return median(times)


def replay_table(models: Models, config: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    """Per model and batch size (1, 16, 64 and those run): one decode token with transformers' modules, with the
    fused RMSNorm and rotation, with the projections fused too, and with that compiled."""
    width = bucket_width(config.prompt_tokens + config.new_tokens)
    replays, rounds = (50, 5) if config.device.startswith("cuda") else (2, 1)
    table = []
    sizes = set(config.batches) if config.tiny else {1, *GOAL_BATCHES, *config.batches}
    for name, gen in (("draft", models.draft), ("target", models.target)):
        for rows in sorted(sizes):
            row: dict[str, Any] = {"model": name, "rows": rows, "width": width}
            for variant in REPLAY_VARIANTS:
                seconds = replay_seconds(gen.model, rows, width, variant, config.device, replays, rounds)
                row[f"{variant}_ms"] = seconds * 1e3
            row["speedup"] = row["modules_ms"] / row["fused_ms"]
            row["projections_speedup"] = row["fused_ms"] / row["projections_ms"]
            row["compiled_speedup"] = row["projections_ms"] / row["compiled_ms"]
            if config.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the two decoders' arenas
            log(f"replay {name} rows {rows}: {row}")
            table.append(row)
    return table


def replay_lines(table: list[dict]) -> str:
    lines = [
        "model | rows | modules ms/token | fused norm, rotation | gain | and projections | gain | compiled | gain",
        "---|---:|---:|---:|---:|---:|---:|---:|---:",
    ]
    for r in table:
        lines.append(
            f"{r['model']} | {r['rows']} | {r['modules_ms']:.2f} | {r['fused_ms']:.2f} | {r['speedup']:.2f}x | "
            f"{r['projections_ms']:.2f} | {r['projections_speedup']:.2f}x | "
            f"{r['compiled_ms']:.2f} | {r['compiled_speedup']:.2f}x"
        )
    return "\n".join(lines)


def profile_models(models: Models, config: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    context = config.prompt_tokens + config.new_tokens // 2  # the average context of a decode step
    rows = []
    for name, gen in (("draft", models.draft), ("target", models.target)):
        for batch in sorted(config.batches):
            vocab = len(models.tokenizer)
            row = {"model": name, "batch": batch, "context": context}
            row.update(profile_forward(gen.model, batch, context, config.device, vocab))
            log(f"profile {name} batch {batch}: {row}")
            rows.append(row)
    return rows


# -- output -----------------------------------------------------------------------------------------------------------


def environment(config: BenchConfig) -> dict:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": config.device,
        "decode": config.decode,
        # The device machine gets a copy of the working tree without git: the caller names the commit.
        "commit": os.environ.get(COMMIT_ENV, "unknown"),
    }
    if config.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        env.update(cudnn=torch.backends.cudnn.version(), cudnn_sdpa=torch.backends.cuda.cudnn_sdp_enabled())
    return env


def table(results: list[dict]) -> str:
    lines = [
        "batch | target-only tok/s | RSD tok/s | lock-step tok/s | speed-up | bound | /bound | bw-bound | /bw-bound"
        " | RSD/lock | draft | prm | target | ctrl | kept | peak GiB (T/RSD/lock)",
    ]
    for r in sorted(results, key=lambda r: r["batch"]):
        tps, share, peak = r["tokens_per_s"], r["rsd_split_share"], r["peak_memory_gib"]
        peaks = "/".join("-" if peak.get(k) is None else f"{peak[k]:.1f}" for k in ("target_only", "rsd", "lockstep"))
        lines.append(
            f"{r['batch']:>5} | {tps['target_only']:>17.1f} | {tps['rsd']:>9.1f} | {tps['lockstep']:>15.1f} | "
            f"{r['speedup']:>8.2f} | {r['bound']:>5.2f} | {r['speedup_over_bound']:>6.0%} | "
            f"{r['bandwidth_bound']:>8.2f} | {r['speedup_over_bandwidth_bound']:>9.0%} | "
            f"{r['rsd_over_lockstep']:>8.2f} | {share['draft']:>5.0%} | {share['prm']:>3.0%} | "
            f"{share['target']:>6.0%} | {share['controller']:>4.0%} | {r['rsd_kept_share']:>4.0%} | {peaks}"
        )
    return "\n".join(lines)


def goal_lines(results: list[dict]) -> str:
    lines = []
    for r in sorted(results, key=lambda r: r["batch"]):
        if r["batch"] in GOAL_BATCHES:
            verdicts = ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in goals(r).items())
            lines.append(f"batch {r['batch']}: {verdicts}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test, seconds)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 16 64 1)")
    parser.add_argument("--repeats", type=int, help="timed rounds per batch size (default 3)")
    parser.add_argument("--steps", type=int, help="steps per problem (default 8)")
    parser.add_argument("--deadline-s", type=float, help="start no new round after this many seconds")
    parser.add_argument("--device", help="torch device (default cuda; cpu with --tiny)")
    parser.add_argument("--warmup-steps", type=int, help="steps per problem of each warm-up run (default 8)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-forward profile")
    parser.add_argument(
        "--no-lean-reference", action="store_true", help="skip the target alone in transformers' own lean loop"
    )
    parser.add_argument(
        "--sdpa",
        choices=("default", "no-cudnn", "ab"),
        help="no-cudnn: keep the lean loops off cuDNN too; ab: also time RSD with cuDNN allowed, side by side",
    )
    parser.add_argument(
        "--decode",
        choices=(*DECODE_MODES, "ab"),
        help="the backend's decode path (default auto: CUDA graphs on a GPU); ab: auto, plus RSD and target-only "
        "through transformers' eager forward, side by side",
    )
    parser.add_argument(
        "--prefill",
        choices=("split", "one", "ab"),
        help="split (default): prefill forwards split by tail length; one: one forward per call; ab: split, plus RSD "
        "with one forward per call, side by side",
    )
    parser.add_argument(
        "--ride",
        choices=("on", "off", "ab"),
        help="on (default): the target caches kept steps while it decodes rejected ones; off: only when it next "
        "writes a step; ab: on, plus RSD with it off, side by side",
    )
    parser.add_argument(
        "--prefill-scale",
        type=float,
        help="also time RSD with each model's price of one more prefill forward multiplied by this, side by side",
    )
    parser.add_argument(
        "--overlap",
        choices=("on", "ab"),
        help="ab: also time RSD with the host's stop checks and the GPU's next decode forward taking turns",
    )
    parser.add_argument(
        "--arena-prefill",
        choices=("on", "ab"),
        help="ab: also time RSD with every model's prefills through transformers' forward over a stacked cache",
    )
    parser.add_argument(
        "--projections",
        choices=("on", "ab"),
        help="ab: also time RSD and target-only with each projection its own matrix product when decoding",
    )
    parser.add_argument(
        "--triton",
        choices=("on", "ab"),
        help="ab: also time RSD and target-only decoding without rsd's Triton kernels (SDPA attention, torch's "
        "operations in each layer; CUDA)",
    )
    parser.add_argument(
        "--packed-prefill",
        choices=("on", "ab"),
        help="ab: also time RSD with its arena prefills padded to the longest tail through torch operations and "
        "SDPA instead of packed through rsd's Triton kernels (CUDA)",
    )
    parser.add_argument(
        "--kernels",
        choices=("fused", "ab"),
        help="ab: also time one decode token per model with the fused RMSNorm and rotation and with transformers' "
        "modules",
    )
    parser.add_argument("--out", type=Path, help="folder for gpu_speed.json")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.batches:
        overrides["batches"] = tuple(args.batches)
    for name in FLAG_SETTINGS:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.no_profile:
        overrides["profile"] = False
    if args.no_lean_reference:
        overrides["lean_reference"] = False
    config = tiny_config(**overrides) if args.tiny else BenchConfig(**overrides)
    return config, args.out


def main(argv: Sequence[str] | None = None) -> dict:
    config, out_dir = parse_args(argv)
    # Tiny matrices on a busy machine run many times faster on one thread than on contending ones.
    threads, cudnn_sdpa = torch.get_num_threads(), torch.backends.cuda.cudnn_sdp_enabled()
    if config.tiny:
        torch.set_num_threads(1)
    if config.sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)  # for the whole run: an A/B of cuDNN's per-shape plans
    try:
        return run_benchmark(config, out_dir)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdpa)


def run_benchmark(config: BenchConfig, out_dir: Path | None) -> dict:
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run with --tiny for the CPU smoke test")
    models = build_models(config)
    log(f"models built on {config.device} ({config.dtype}); {environment(config)}")
    report: dict[str, Any] = {"config": asdict(config), "environment": environment(config), "results": []}
    if config.profile:
        report["profile"] = profile_models(models, config, log)
    if config.kernels == "ab":
        report["replay_ms"] = replay_table(models, config, log)
    for batch in config.batches:
        report["results"].append(measure_batch(models, config, batch, started, log))
        if out_dir is not None:  # after every batch size, so a cut-off run keeps what it measured
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "gpu_speed.json").write_text(json.dumps(report, indent=2, default=str))
    report["table"] = table(report["results"])
    if out_dir is not None:
        (out_dir / "gpu_speed.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\n{report['environment'].get('gpu', config.device)}; medians of up to {config.repeats} rounds")
    print(report["table"])
    print(goal_lines(report["results"]))
    if "replay_ms" in report:
        print(replay_lines(report["replay_ms"]))
    for r in report["results"]:
        t = r["seconds_median"]
        if "target_only_hf" in t:
            print(
                f"batch {r['batch']}: target-only {t['target_only']:.2f} s through the backend, "
                f"{t['target_only_hf']:.2f} s in transformers' lean loop ({r['target_only_hf_over_backend']:.2f}x)"
            )
        if "rsd_padded_prefill_s" in r:
            print(
                f"batch {r['batch']}: padded prefills: RSD {r['rsd_padded_prefill_s']:.2f} s (PRM "
                f"{r['rsd_padded_prefill_split_s']['prm']:.2f} s, kept {r['rsd_padded_prefill_kept_share']:.0%}); "
                f"packed: {t['rsd']:.2f} s (PRM {r['rsd_split_s']['prm']:.2f} s, kept {r['rsd_kept_share']:.0%}): "
                f"{r['rsd_over_rsd_padded_prefill']:.2f}x"
            )
        if "rsd_eager_s" in r:
            print(
                f"batch {r['batch']}: eager decode: RSD {r['rsd_eager_s']:.2f} s, target-only "
                f"{t['target_only_eager']:.2f} s; the decode path makes RSD {r['rsd_over_rsd_eager']:.2f}x and "
                f"target-only {r['target_only_over_eager']:.2f}x faster"
            )
        if "rsd_one_prefill_s" in r:
            print(
                f"batch {r['batch']}: RSD with one prefill forward per call {r['rsd_one_prefill_s']:.2f} s; split by "
                f"length (as shipped) is {r['rsd_over_rsd_one_prefill']:.2f}x faster"
            )
        if "rsd_no_ride_s" in r:
            print(
                f"batch {r['batch']}: RSD without riding {r['rsd_no_ride_s']:.2f} s (target "
                f"{r['rsd_no_ride_split_s']['target']:.2f} s); riding (as shipped) is {r['rsd_over_rsd_no_ride']:.2f}x "
                f"faster (target {r['rsd_split_s']['target']:.2f} s)"
            )
        if "rsd_prefill_scaled_s" in r:
            roles = ("draft", "prm", "target")
            scaled = ", ".join(f"{r['rsd_prefill_scaled_split_s'][role]:.2f}" for role in roles)
            shipped = ", ".join(f"{r['rsd_split_s'][role]:.2f}" for role in roles)
            print(
                f"batch {r['batch']}: RSD with prefill prices x{config.prefill_scale:g} "
                f"{r['rsd_prefill_scaled_s']:.2f} s (draft, PRM, target: {scaled} s; as shipped {shipped} s); "
                f"as shipped is {r['rsd_over_rsd_prefill_scaled']:.2f}x faster"
            )
        if "rsd_no_overlap_s" in r:
            print(
                f"batch {r['batch']}: RSD with host checks and GPU taking turns {r['rsd_no_overlap_s']:.2f} s; "
                f"overlapped (as shipped) is {r['rsd_over_rsd_no_overlap']:.2f}x faster"
            )
        if "rsd_transformers_prefill_s" in r:
            print(
                f"batch {r['batch']}: RSD with transformers' prefill forward {r['rsd_transformers_prefill_s']:.2f} s; "
                f"the arena prefill (as shipped) is {r['rsd_over_rsd_transformers_prefill']:.2f}x faster"
            )
        if "rsd_unfused_s" in r:
            print(
                f"batch {r['batch']}: projections one by one: RSD {r['rsd_unfused_s']:.2f} s, target-only "
                f"{t['target_only_unfused']:.2f} s; fused (as shipped) makes RSD {r['rsd_over_rsd_unfused']:.2f}x and "
                f"target-only {r['target_only_over_unfused']:.2f}x faster"
            )
        if "rsd_no_triton_s" in r:
            print(
                f"batch {r['batch']}: decoding without rsd's Triton kernels: RSD {r['rsd_no_triton_s']:.2f} s, "
                f"target-only {t['target_only_no_triton']:.2f} s; the kernels (as shipped) make RSD "
                f"{r['rsd_over_rsd_no_triton']:.2f}x and target-only {r['target_only_over_no_triton']:.2f}x faster"
            )
        if "rsd_cudnn_s" in r:
            print(
                f"batch {r['batch']}: RSD with cuDNN attention allowed {r['rsd_cudnn_s']:.2f} s; RSD as shipped "
                f"(without) is {r['rsd_over_rsd_cudnn']:.2f}x faster"
            )
    return report


if __name__ == "__main__":
    main()
