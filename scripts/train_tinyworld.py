"""Train the tiny world's draft, target and PRM from a seed, check them on held-out problems, save them.

    python scripts/train_tinyworld.py --seed 0 --out DIR    # 504 s on one H200 (the committed models)
    python scripts/train_tinyworld.py --quick --out DIR     # every stage at toy scale on a CPU, to check code

The models it writes are the ones `rsd` ships in `rsd/tinyworld/models/`; the task itself is `rsd.tinyworld.task`.

Stages:
1. a byte-level BPE tokenizer with exactly Qwen2's pre-tokenizer (digits one per token; transformers 5 imposes
   that pipeline on every qwen2 checkpoint), Qwen's special tokens and a Qwen chat template;
2. the generators (`Qwen2ForCausalLM`) on the Qwen2.5-Math CoT prompt and reference solutions ending with
   `<|im_end|><|endoftext|>`. The target (10x the draft's compute per token) learns from every problem; the
   draft only from the problems whose starting product is in half of the multiplication table (chosen by a
   hash of the factor pair), so it is as good as the target at additions and subtractions but guesses half of
   the products: its errors sit in one step kind, the first step;
3. the PRM (`Qwen2ForProcessRewardModel` layout): its body first learns the reference solutions as a language
   model in the PRM's input format, then body and head learn step labels from sampled and greedy rollouts of
   the draft and the target on fresh training problems, each step labelled by `task.check_step`. A step that
   builds on an earlier wrong value is labelled wrong (its operand is not the true value). Reference solutions
   cut after one slipped addition or subtraction (a result off by a carry or a digit, or an operand copied
   wrong) join those rollouts: the draft's rare slips there are what RSD lets through when the PRM has only
   seen the draft's own mistakes, which sit in the products. Products are not slipped: checking any product
   needs the whole multiplication table, which a PRM of this size does not hold (tried: it then rejected 6% of
   correct steps and the target wrote 24% of them);
4. checks on held-out test problems: greedy accuracy of both generators, the PRM's AUROC on the draft's greedy
   steps, and a greedy RSD loop at delta 0.7 with the target's step share and its FLOPs against target-only.

Weights are stored in bfloat16 and every check runs on the stored weights. Runs are reproducible from the seed
up to the GPU's non-deterministic kernels.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rsd.core import ModelCost
from rsd.tinyworld.task import (
    OPERATORS,
    SYSTEM_PROMPT,
    Problem,
    chat_prompt,
    is_correct_answer,
    label_steps,
    make_problems,
    split_steps,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
STEP_TAG = "<extra_0>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
IGNORE = -100


# -- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A Qwen2 body; head_dim is 64 everywhere because vLLM's CPU attention refuses smaller heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass
class TrainConfig:
    seed: int = 0
    lm_problems: int = 150_000  # training problems whose reference solutions teach the generators and PRM body
    vocab_size: int = 640  # BPE stops earlier, once every word of the task is one token
    draft: Shape = Shape(hidden=192, layers=2, heads=3, kv_heads=1, intermediate=512)
    target: Shape = Shape(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024)
    prm: Shape = Shape(hidden=192, layers=4, heads=3, kv_heads=1, intermediate=384)
    # The draft's weakness: it learns only from problems whose starting product is one of this share of the
    # factor pairs, so it knows part of the multiplication table and guesses the rest. Its errors then sit in
    # the product step; the other steps it learns as well as the target does.
    draft_known_products: float = 0.5
    batch_size: int = 256
    lr: float = 1e-3
    target_steps: int = 2200
    draft_steps: int = 3000  # more passes over its half of the data: fewer carry slips in additions
    eval_every: int = 1000  # logs the generators' validation accuracy while they train
    prm_lm_steps: int = 1500
    prm_steps: int = 3000
    prm_lr: float = 5e-4
    prm_lm_weight: float = 0.3  # auxiliary LM loss on reference solutions, so the body keeps its arithmetic
    # Weight of wrong-step labels in the PRM loss. 1 keeps its probabilities calibrated; 2 (tried with the slipped
    # references) made it reject 4% of correct steps, which cost FLOPs and bought no accuracy.
    prm_wrong_weight: float = 1.0
    rollout_draft_greedy: int = 8_000  # fresh training problems the draft solves greedily for PRM labels
    rollout_draft_sampled: int = 16_000  # ... that the draft solves by sampling at temperature 1
    rollout_target_sampled: int = 8_000  # ... that the target solves by sampling at temperature 1
    slipped_references: int = 16_000  # reference solutions of fresh problems cut after one slipped step
    val_problems: int = 256  # training-split problems unseen in training, for the logs
    eval_problems: int = 1000  # held-out test problems for the final checks
    eval_seed: int = 0  # the test problems are load_tinyworld("test", eval_problems, eval_seed)
    delta: float = 0.7
    max_new_tokens: int = 160  # reference solutions have at most 120 tokens
    step_max_tokens: int = 48
    max_steps: int = 12
    gen_batch: int = 4096
    workers: int = 16  # processes that generate problems

    @classmethod
    def quick(cls) -> TrainConfig:
        """Every stage at toy scale: checks the code on a CPU in a couple of minutes, learns nothing useful."""
        return cls(
            lm_problems=3000,
            draft=Shape(64, 1, 1, 1, 128),
            target=Shape(128, 1, 2, 1, 256),
            prm=Shape(64, 1, 1, 1, 128),
            batch_size=32,
            target_steps=40,
            draft_steps=40,
            eval_every=20,
            prm_lm_steps=20,
            prm_steps=20,
            rollout_draft_greedy=32,
            rollout_draft_sampled=32,
            rollout_target_sampled=32,
            slipped_references=64,
            val_problems=16,
            eval_problems=24,
            max_new_tokens=120,
            gen_batch=64,
            workers=2,
        )


# -- tokenizer -----------------------------------------------------------------------------------------------


# Qwen2's pre-tokenizer, exactly. transformers 5 rebuilds this pipeline (and an NFC normalizer) for every qwen2
# checkpoint whatever its tokenizer.json says, so a tokenizer for Qwen2 models must be trained with it. It reads
# numbers one digit per token.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_tokenizer(texts: Sequence[str], vocab_size: int, folder: Path):
    """A byte-level BPE with Qwen2's pipeline, saved to `folder` and loaded back through AutoTokenizer: every
    later stage uses the tokenizer that the saved checkpoints will give, and a mismatch stops the run."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
    )
    save_tokenizer(fast, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}) + "\n")
    loaded = AutoTokenizer.from_pretrained(folder)
    sample = list(texts[:300])
    if [e.ids for e in tok.encode_batch(sample, add_special_tokens=False)] != [
        loaded.encode(t, add_special_tokens=False) for t in sample
    ]:
        raise RuntimeError(f"AutoTokenizer ({type(loaded).__name__}) does not reproduce the trained tokenizer")
    return loaded


def tokenizer_corpus(problems: Sequence[Problem]) -> list[str]:
    return [chat_prompt(p.question) + p.solution for p in problems] + [
        prm_text(p.question, p.solution_steps) for p in problems[:200]
    ]


class Vocab:
    """The ids the training code needs, and encoding without special-token surprises."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.tag = tokenizer.convert_tokens_to_ids(STEP_TAG)
        self.eos_ids = (self.im_end, self.endoftext)
        # A step ends where the text first holds "\n\n": inside one token ("\n\n", ".\n\n") or across two.
        texts = [self.decode([i]) for i in range(len(tokenizer))]
        self.holds_delimiter = torch.tensor(["\n\n" in t for t in texts])
        self.ends_newline = torch.tensor([t.endswith("\n") for t in texts])
        self.starts_newline = torch.tensor([t.startswith("\n") for t in texts])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def prm_text(question: str, steps: Sequence[str]) -> str:
    """The Qwen2.5-Math-PRM input up to the last step tag (what the project's qwen-prm adapter builds)."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        f"<|im_start|>assistant\n" + "".join(step + STEP_TAG for step in steps)
    )


# -- models --------------------------------------------------------------------------------------------------


def qwen2_config(shape: Shape, vocab: Vocab, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(vocab.tokenizer),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=64,
        intermediate_size=shape.intermediate,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=vocab.im_end,
        pad_token_id=vocab.endoftext,
        bos_token_id=None,
        **extra,
    )


def new_causal_lm(shape: Shape, vocab: Vocab, seed: int):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(qwen2_config(shape, vocab))


class ProcessRewardModel(nn.Module):
    """Qwen2ForProcessRewardModel: a Qwen2 body and `score` = Linear(H, H) -> ReLU -> Linear(H, 2)."""

    def __init__(self, config):
        super().__init__()
        from transformers import Qwen2Model

        self.config = config
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(), nn.Linear(config.hidden_size, 2)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.score(hidden)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The body's tied embedding table doubles as an LM head for the auxiliary loss; it is not saved as one.
        return hidden @ self.model.embed_tokens.weight.T


def load_prm(folder: Path | str) -> ProcessRewardModel:
    """A saved tiny-world PRM in float32 (tests and checks; the project's PRM adapters load it for real)."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config

    prm = ProcessRewardModel(Qwen2Config.from_pretrained(folder))
    state = load_file(str(Path(folder) / "model.safetensors"))
    prm.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return prm.eval()


def compute_parameters(model: nn.Module) -> int:
    """Parameters that multiply each token: all but the input embedding table, which still counts when it is
    tied to the LM head (the accounting of `rsd.backends.hf.model_cost`)."""
    total = sum(p.numel() for p in model.parameters())  # a tied table is counted once
    if isinstance(model, ProcessRewardModel):
        return total - model.model.embed_tokens.weight.numel()
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    return total if tied else total - embedding.weight.numel()


def model_cost(model: nn.Module) -> ModelCost:
    config = model.config
    return ModelCost(compute_parameters(model), config.num_hidden_layers, config.num_attention_heads * 64)


def stored_in_bf16(model: nn.Module) -> nn.Module:
    """Round the weights to bfloat16 and back: every check runs on what the checkpoint stores."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


# -- data ----------------------------------------------------------------------------------------------------


@dataclass
class Sequences:
    """Token sequences padded into one tensor; the loss covers [loss_start, length)."""

    ids: torch.Tensor  # [N, T] long
    lengths: torch.Tensor  # [N]
    loss_start: torch.Tensor  # [N]

    @classmethod
    def build(cls, prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad: int) -> Sequences:
        rows = [list(p) + list(c) for p, c in zip(prefixes, completions, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(r) for r in rows])
        return cls(ids, lengths, torch.tensor([len(p) for p in prefixes]))

    def to(self, device: str) -> Sequences:
        return Sequences(self.ids.to(device), self.lengths.to(device), self.loss_start.to(device))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token labels of the rows `index`, cut to their longest row."""
        width = int(self.lengths[index].max())
        ids = self.ids[index, :width]
        position = torch.arange(width, device=ids.device)
        labels = ids.clone()
        outside = (position < self.loss_start[index, None]) | (position >= self.lengths[index, None])
        labels[outside] = IGNORE
        return ids, labels


def generator_sequences(problems: Sequence[Problem], vocab: Vocab) -> Sequences:
    prompts = vocab.encode_batch([chat_prompt(p.question) for p in problems])
    solutions = vocab.encode_batch([p.solution for p in problems])
    ends = [vocab.im_end, vocab.endoftext]  # chat models end at <|im_end|>; <|endoftext|> serves plain EOS lists
    return Sequences.build(prompts, [s + ends for s in solutions], vocab.endoftext)


def prm_lm_sequences(problems: Sequence[Problem], vocab: Vocab) -> Sequences:
    heads = vocab.encode_batch([prm_text(p.question, []) for p in problems])
    full = vocab.encode_batch([prm_text(p.question, p.solution_steps) for p in problems])
    return Sequences.build(heads, [f[len(h) :] for h, f in zip(heads, full, strict=True)], vocab.endoftext)


PROBLEM_CHUNK = 5000


def training_problems(count: int, seed: int, stream: int, workers: int = 1) -> list[Problem]:
    """Training-split problems of one stream, made in chunks of distinct generator seeds by `workers`
    processes (the same problems for any number of workers)."""
    from concurrent.futures import ProcessPoolExecutor

    sizes = [min(PROBLEM_CHUNK, count - start) for start in range(0, count, PROBLEM_CHUNK)]
    seeds = [(seed * 1000 + stream) * 1000 + chunk for chunk in range(len(sizes))]
    if workers <= 1 or len(sizes) <= 1:
        chunks = list(map(training_chunk, sizes, seeds))
    else:
        with ProcessPoolExecutor(min(workers, len(sizes))) as pool:
            chunks = list(pool.map(training_chunk, sizes, seeds))
    return [problem for chunk in chunks for problem in chunk]


def training_chunk(size: int, seed: int) -> list[Problem]:
    return make_problems("train", size, seed=seed)


def draft_knows(problem: Problem, share: float) -> bool:
    """Whether the starting product's factor pair is in the draft's share of the multiplication table."""
    product = problem.operations[0]
    digest = hashlib.sha256(f"{product.left}*{product.right}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


# -- training ------------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, min(200, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def autocast(device: str):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )


def train_lm(
    model: nn.Module,
    data: Sequences,
    steps: int,
    cfg: TrainConfig,
    device: str,
    log: Callable[[str], None],
    name: str,
    on_eval: Callable[[int], bool] | None = None,
    eval_every: int = 0,
) -> int:
    """Next-token training on the completions; `on_eval(step)` returning True stops early. Returns steps run."""
    model.train()
    optimizer = make_optimizer(model, cfg.lr)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, cfg.lr)
        index = torch.randint(len(data.lengths), (cfg.batch_size,), device=device, generator=generator)
        ids, labels = data.batch(index)
        with autocast(device):
            loss = lm_loss(model(input_ids=ids).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"  {name} step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
        if on_eval and eval_every and (step + 1) % eval_every == 0:
            model.eval()
            stop = on_eval(step + 1)
            model.train()
            if stop:
                return step + 1
    return steps


# -- generation ----------------------------------------------------------------------------------------------


def forward_cached(model, ids, mask, positions, cache):
    """One forward that extends `cache`."""
    key = cache_argument(type(model))
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{key: cache}).logits


@functools.cache
def cache_argument(model_class: type) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.2x; older versions take `past_key_values`.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    vocab: Vocab,
    max_new_tokens: int,
    device: str,
    batch_size: int,
    temperature: float = 0.0,
    stop_at_step: bool = False,
    seed: int = 0,
) -> list[list[int]]:
    """Greedy or sampled continuations, each ending with (and including) an EOS token, or the step delimiter
    "\\n\\n" when `stop_at_step`, or cut at `max_new_tokens`."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out.extend(_generate_chunk(model, chunk, vocab, max_new_tokens, device, temperature, stop_at_step, generator))
    return out


def _generate_chunk(model, prompts, vocab, max_new_tokens, device, temperature, stop_at_step, generator):
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), vocab.endoftext, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token sits in the last column
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    with autocast(device):
        logits = forward_cached(model, ids, mask, positions, cache)[:, -1].float()
    eos = torch.tensor(vocab.eos_ids, device=device)
    holds, ends, starts = (t.to(device) for t in (vocab.holds_delimiter, vocab.ends_newline, vocab.starts_newline))
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    previous_ends = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    next_position = positions[:, -1] + 1
    tokens = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, -1), token)
        tokens.append(token)
        finished = torch.isin(token, eos)
        safe = token.clamp(min=0)
        if stop_at_step:
            finished |= holds[safe] | (previous_ends & starts[safe])
        done |= finished
        if bool(done.all()):
            break
        previous_ends = ends[safe]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        with autocast(device):
            logits = forward_cached(model, token.clamp(min=0)[:, None], mask, next_position[:, None], cache)
        logits = logits[:, -1].float()
        next_position = next_position + 1
    table = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in prompts]
    return [[t for t in row if t >= 0] for row in table]


def solve(
    model,
    problems: Sequence[Problem],
    vocab: Vocab,
    cfg: TrainConfig,
    device: str,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[int]]:
    prompts = vocab.encode_batch([chat_prompt(p.question) for p in problems])
    return generate(model, prompts, vocab, cfg.max_new_tokens, device, cfg.gen_batch, temperature, seed=seed)


# -- checks of the generators --------------------------------------------------------------------------------


@dataclass
class SolveReport:
    accuracy: float
    first_error_kinds: dict[str, int]  # how often each step kind holds a solution's first wrong step
    mean_tokens: float


def grade(problems: Sequence[Problem], outputs: Sequence[Sequence[int]], vocab: Vocab) -> SolveReport:
    correct, kinds, tokens = 0, {}, 0
    for problem, ids in zip(problems, outputs, strict=True):
        text = vocab.decode(ids)
        tokens += len(ids)
        if is_correct_answer(problem, text):
            correct += 1
            continue
        labels = label_steps(problem, split_steps(text))
        first = labels.index(False) if False in labels else len(labels)
        kind = problem.step_kinds()[first] if first < len(problem.step_kinds()) else "extra"
        kinds[kind] = kinds.get(kind, 0) + 1
    return SolveReport(correct / len(problems), kinds, tokens / len(problems))


# -- PRM -----------------------------------------------------------------------------------------------------


@dataclass
class LabelledTrajectory:
    problem: Problem
    steps: list[str]
    labels: list[bool]


def rollouts(model, problems, vocab, cfg, device, temperature, seed) -> list[LabelledTrajectory]:
    outputs = solve(model, problems, vocab, cfg, device, temperature, seed)
    result = []
    for problem, ids in zip(problems, outputs, strict=True):
        steps = split_steps(vocab.decode(ids))[: cfg.max_steps]
        if steps:
            result.append(LabelledTrajectory(problem, steps, label_steps(problem, steps)))
    return result


RESULT = re.compile(r"(=\s*)(\d+)")


def slipped_value(value: int, rng: random.Random) -> int:
    """A wrong number of the kinds small models write: off by a power of ten (a dropped or extra carry), one
    digit replaced, or two neighbouring digits swapped."""
    digits = str(value)
    kind = rng.random()
    if kind < 0.5 or len(digits) == 1:
        slipped = value + rng.choice((-1, 1)) * 10 ** rng.randrange(len(digits))
    elif kind < 0.8:
        i = rng.randrange(len(digits))
        choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
        slipped = int(digits[:i] + rng.choice(choices) + digits[i + 1 :])
    else:
        i = rng.randrange(len(digits) - 1)
        slipped = int(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :])
    return slipped if slipped >= 0 and slipped != value else value + 1


def slipped_step(problem: Problem, index: int, rng: random.Random) -> str:
    """Reference step `index` (an addition or subtraction) with its result slipped or, in a third of the cases,
    its first operand copied wrong and then computed correctly from the wrong copy."""
    step, operation = problem.solution_steps[index], problem.operations[index]
    if rng.random() < 1 / 3:
        left = slipped_value(operation.left, rng)
        result = OPERATORS[operation.op](left, operation.right)
        if result >= 0:
            equation = f"{operation.left} {operation.op} {operation.right} = {operation.result}"
            return step.replace(equation, f"{left} {operation.op} {operation.right} = {result}")
    return RESULT.sub(lambda m: m.group(1) + str(slipped_value(operation.result, rng)), step, count=1)


def slipped_references(problems: Sequence[Problem], seed: int) -> list[LabelledTrajectory]:
    """Each problem's reference solution up to one slipped addition or subtraction, which ends it."""
    rng = random.Random(seed)
    result = []
    for problem in problems:
        if len(problem.operations) < 2:
            continue
        index = rng.randrange(1, len(problem.operations))  # operation 0 is the starting product
        steps = [*problem.solution_steps[:index], slipped_step(problem, index, rng)]
        labels = label_steps(problem, steps)
        assert labels == [True] * index + [False], f"a slipped step must be the only wrong one: {steps}"
        result.append(LabelledTrajectory(problem, steps, labels))
    return result


@dataclass
class PRMData:
    ids: torch.Tensor  # [N, T]
    lengths: torch.Tensor
    labels: torch.Tensor  # [N, T]: 1/0 at step tags, IGNORE elsewhere

    @classmethod
    def build(cls, trajectories: Sequence[LabelledTrajectory], vocab: Vocab) -> PRMData:
        rows = vocab.encode_batch([prm_text(t.problem.question, t.steps) for t in trajectories])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), vocab.endoftext, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (row, trajectory) in enumerate(zip(rows, trajectories, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            tags = [j for j, t in enumerate(row) if t == vocab.tag]
            assert len(tags) == len(trajectory.labels), "every step must end at exactly one step tag"
            labels[i, tags] = torch.tensor([int(x) for x in trajectory.labels])
        return cls(ids, torch.tensor([len(r) for r in rows]), labels)

    def to(self, device: str) -> PRMData:
        return PRMData(self.ids.to(device), self.lengths.to(device), self.labels.to(device))


def train_prm(
    prm: ProcessRewardModel,
    data: PRMData,
    lm_data: Sequences,
    cfg: TrainConfig,
    device: str,
    log,
    steps: int,
    lr: float,
    batch_size: int,
    name: str = "prm",
) -> None:
    prm.train()
    optimizer = make_optimizer(prm, lr)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    class_weight = torch.tensor([cfg.prm_wrong_weight, 1.0], device=device)
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        index = torch.randint(len(data.lengths), (batch_size,), device=device, generator=generator)
        width = int(data.lengths[index].max())
        ids, labels = data.ids[index, :width], data.labels[index, :width]
        lm_ids, lm_labels = lm_data.batch(
            torch.randint(len(lm_data.lengths), (max(1, batch_size // 2),), device=device, generator=generator)
        )
        with autocast(device):
            logits = prm(ids)
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), weight=class_weight, ignore_index=IGNORE
            )
            hidden = prm.model(input_ids=lm_ids).last_hidden_state
            aux = lm_loss(prm.lm_logits(hidden), lm_labels)
        total = loss + cfg.prm_lm_weight * aux
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(prm.parameters(), 1.0)
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"  {name} step {step:5d} loss {loss.item():.4f} lm {aux.item():.4f} ({time.time() - start:.0f} s)")


@torch.no_grad()
def prm_rewards(prm, rows: Sequence[Sequence[int]], vocab: Vocab, device: str, batch_size: int) -> list[list[float]]:
    """P(correct) at every step tag of each input row."""
    prm.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), vocab.endoftext, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)  # right padding: a causal model never sees it
        ids = ids.to(device)
        with autocast(device):
            probs = torch.softmax(prm(ids).float(), -1)[..., 1]
        for i, r in enumerate(chunk):
            tags = [j for j, t in enumerate(r) if t == vocab.tag]
            out.append(probs[i, tags].tolist())
    return out


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Probability that a random correct step outscores a random wrong one (ties count half)."""
    pairs = sorted(zip(scores, labels, strict=True))
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        mean_rank = (i + j + 1) / 2  # ranks are 1-based
        rank_sum += mean_rank * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


# -- RSD simulation ------------------------------------------------------------------------------------------


@dataclass
class Usage:
    """Tokens one model runs through for one trajectory under ideal KV caching."""

    seen: list[int] = field(default_factory=list)  # the ids whose keys and values it holds
    tokens: int = 0
    context_sum: int = 0

    def run(self, ids: Sequence[int]) -> None:
        """Process `ids` as the model's whole input now: only the tail past the common prefix costs."""
        common = 0
        for a, b in zip(self.seen, ids, strict=False):
            if a != b:
                break
            common += 1
        self.tokens += len(ids) - common
        self.context_sum += sum(range(common + 1, len(ids) + 1))
        self.seen = list(ids)


@dataclass
class RSDState:
    problem: Problem
    prompt: list[int]
    steps: list[list[int]] = field(default_factory=list)  # committed step token ids
    sources: list[str] = field(default_factory=list)
    done: bool = False
    draft: Usage = field(default_factory=Usage)
    target: Usage = field(default_factory=Usage)
    prm: Usage = field(default_factory=Usage)

    @property
    def prefix(self) -> list[int]:
        return self.prompt + [t for step in self.steps for t in step]


def simulate_rsd(draft, target, prm, problems, vocab, cfg, device, delta) -> list[RSDState]:
    """Greedy RSD with the binary rule: keep the draft's step iff its reward >= delta, else the target writes
    the step from the same prefix. Usage counts the tokens each model would run with ideal prefix caching."""
    states = [RSDState(p, vocab.encode(chat_prompt(p.question))) for p in problems]
    for _ in range(cfg.max_steps):
        active = [s for s in states if not s.done]
        if not active:
            break
        proposals = step_outputs(draft, active, vocab, cfg, device)
        texts = [[vocab.decode(step).strip() for step in s.steps] for s in active]
        prm_rows = [
            vocab.encode(prm_text(s.problem.question, prev + [vocab.decode(p).strip()]))
            for s, prev, p in zip(active, texts, proposals, strict=True)
        ]
        rewards = [r[-1] for r in prm_rewards(prm, prm_rows, vocab, device, cfg.gen_batch)]
        rejected = [i for i, r in enumerate(rewards) if r < delta]
        rewrites = step_outputs(target, [active[i] for i in rejected], vocab, cfg, device)
        rewrite_of = dict(zip(rejected, rewrites, strict=True))
        for i, state in enumerate(active):
            state.draft.run(state.prefix + proposals[i][:-1])  # the last sampled token is never run
            state.prm.run(prm_rows[i])
            if i in rewrite_of:
                state.target.run(state.prefix + rewrite_of[i][:-1])
            commit(state, rewrite_of.get(i, proposals[i]), "target" if i in rewrite_of else "draft", vocab, cfg)
    return states


def step_outputs(model, states: Sequence[RSDState], vocab, cfg, device) -> list[list[int]]:
    if not states:
        return []
    prompts = [s.prefix for s in states]
    return generate(model, prompts, vocab, cfg.step_max_tokens, device, cfg.gen_batch, stop_at_step=True)


def commit(state: RSDState, step: list[int], source: str, vocab: Vocab, cfg: TrainConfig) -> None:
    state.steps.append(step)
    state.sources.append(source)
    ended = bool(step) and step[-1] in vocab.eos_ids
    total = len(state.prefix) - len(state.prompt)
    state.done = ended or not step or len(state.steps) >= cfg.max_steps or total >= cfg.max_new_tokens


def rsd_report(states, target_outputs, draft, target, prm, vocab) -> dict:
    costs = {"draft": model_cost(draft), "target": model_cost(target), "prm": model_cost(prm)}
    flops = {
        role: sum(costs[role].flops(getattr(s, role).tokens, getattr(s, role).context_sum) for s in states)
        for role in costs
    }
    target_only = 0.0
    for state, output in zip(states, target_outputs, strict=True):
        length = len(state.prompt) + len(output) - 1
        target_only += costs["target"].flops(length, length * (length + 1) // 2)
    sources = [src for s in states for src in s.sources]
    correct = sum(is_correct_answer(s.problem, "".join(vocab.decode(step) for step in s.steps)) for s in states)
    return {
        "accuracy": correct / len(states),
        "target_step_share": sources.count("target") / len(sources),
        "steps_per_problem": len(sources) / len(states),
        "flops_ratio_vs_target_only": sum(flops.values()) / target_only,
        "flops_share": {role: value / target_only for role, value in flops.items()},
    }


# -- saving --------------------------------------------------------------------------------------------------


def save_generator(model, vocab: Vocab, out: Path) -> None:
    from transformers import GenerationConfig

    model = copy.deepcopy(model).to("cpu", torch.bfloat16)
    model.config.architectures = ["Qwen2ForCausalLM"]
    model.generation_config = GenerationConfig(
        eos_token_id=[vocab.im_end, vocab.endoftext],
        pad_token_id=vocab.endoftext,
        bos_token_id=None,
        do_sample=False,
    )
    model.save_pretrained(out)
    save_tokenizer(vocab.tokenizer, out)


def save_prm(prm: ProcessRewardModel, vocab: Vocab, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in prm.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = prm.config.to_dict()
    config.update(
        architectures=["Qwen2ForProcessRewardModel"],
        torch_dtype="bfloat16",
        dtype="bfloat16",
        num_labels=2,
        tie_word_embeddings=False,
    )
    config.pop("transformers_version", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tokenizer(vocab.tokenizer, out)


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json that names Qwen2's tokenizer class (whose pipeline the
    tokenizer has) and carries the chat template, also in chat_template.jinja where transformers 5 looks."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("extra_special_tokens", "is_local", "local_files_only"):
        config.pop(key, None)
    config.update(
        tokenizer_class="Qwen2Tokenizer",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


# -- the run -------------------------------------------------------------------------------------------------


def run(cfg: TrainConfig, out: Path, device: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(message: str) -> None:
        print(message, flush=True)
        lines.append(message)

    clock = time.time()
    log(f"# tiny world training, seed {cfg.seed}, device {device_name(device)}")
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    torch.manual_seed(cfg.seed)

    lm_problems = training_problems(cfg.lm_problems, cfg.seed, stream=0, workers=cfg.workers)
    val = training_problems(cfg.val_problems, cfg.seed, stream=1)
    test = make_problems("test", cfg.eval_problems, seed=cfg.eval_seed)
    vocab = Vocab(build_tokenizer(tokenizer_corpus(lm_problems[:20_000]), cfg.vocab_size, out / "tokenizer"))
    gen_data = generator_sequences(lm_problems, vocab).to(device)
    draft_problems = [p for p in lm_problems if draft_knows(p, cfg.draft_known_products)]
    draft_data = generator_sequences(draft_problems, vocab).to(device)
    log(
        f"data: {len(lm_problems)} training problems ({len(draft_problems)} for the draft), vocab "
        f"{len(vocab.tokenizer)}, mean sequence {gen_data.lengths.float().mean():.0f} tokens "
        f"({time.time() - clock:.0f} s)"
    )

    def checkpoint(model, name: str, step: int) -> bool:
        report = grade(val, solve(model, val, vocab, cfg, device), vocab)
        log(f"  {name} step {step:5d} val accuracy {report.accuracy:.3f} first errors {report.first_error_kinds}")
        return False  # never stops early: the logs only chart the learning

    target = new_causal_lm(cfg.target, vocab, cfg.seed).to(device)
    target_eval = lambda step: checkpoint(target, "target", step)  # noqa: E731
    train_lm(target, gen_data, cfg.target_steps, cfg, device, log, "target", target_eval, cfg.eval_every)
    stored_in_bf16(target)
    draft = new_causal_lm(cfg.draft, vocab, cfg.seed + 1).to(device)
    draft_eval = lambda step: checkpoint(draft, "draft", step)  # noqa: E731
    train_lm(draft, draft_data, cfg.draft_steps, cfg, device, log, "draft", draft_eval, cfg.eval_every)
    stored_in_bf16(draft)
    log(f"generators trained ({time.time() - clock:.0f} s)")

    prm_lm = new_causal_lm(cfg.prm, vocab, cfg.seed + 2).to(device)
    prm_lm_data = prm_lm_sequences(lm_problems, vocab).to(device)
    train_lm(prm_lm, prm_lm_data, cfg.prm_lm_steps, cfg, device, log, "prm-lm")

    rollout_count = cfg.rollout_draft_greedy + cfg.rollout_draft_sampled + cfg.rollout_target_sampled
    fresh = training_problems(rollout_count + cfg.slipped_references, cfg.seed, stream=2, workers=cfg.workers)
    a, b = cfg.rollout_draft_greedy, cfg.rollout_draft_greedy + cfg.rollout_draft_sampled
    trajectories = (
        rollouts(draft, fresh[:a], vocab, cfg, device, 0.0, cfg.seed)
        + rollouts(draft, fresh[a:b], vocab, cfg, device, 1.0, cfg.seed)
        + rollouts(target, fresh[b:rollout_count], vocab, cfg, device, 1.0, cfg.seed)
    )
    labels = [x for t in trajectories for x in t.labels]
    log(
        f"rollouts: {len(trajectories)} trajectories, {len(labels)} steps, {1 - sum(labels) / len(labels):.3f} "
        f"wrong ({time.time() - clock:.0f} s)"
    )
    slipped = slipped_references(fresh[rollout_count:], cfg.seed)
    trajectories += slipped
    log(f"slipped references: {len(slipped)} trajectories, each ending at its one wrong step")

    prm = ProcessRewardModel(qwen2_config(cfg.prm, vocab)).to(device)
    prm.model.load_state_dict(prm_lm.model.state_dict())
    del prm_lm
    prm_data = PRMData.build(trajectories, vocab).to(device)
    train_prm(prm, prm_data, prm_lm_data, cfg, device, log, cfg.prm_steps, cfg.prm_lr, cfg.batch_size)
    stored_in_bf16(prm)
    log(f"training done ({time.time() - clock:.0f} s)")

    models = out / "models"  # saved before the checks, which a time limit may cut
    save_generator(draft, vocab, models / "draft")
    save_generator(target, vocab, models / "target")
    save_prm(prm, vocab, models / "prm")
    log(f"saved to {models} ({time.time() - clock:.0f} s)")

    metrics = evaluate(draft, target, prm, test, vocab, cfg, device, log)
    metrics["parameters"] = {
        "draft": sum(p.numel() for p in draft.parameters()),
        "target": sum(p.numel() for p in target.parameters()),
        "prm": sum(p.numel() for p in prm.parameters()),
    }
    metrics["compute_parameters"] = {
        n: model_cost(m).parameters for n, m in (("draft", draft), ("target", target), ("prm", prm))
    }
    metrics["seconds"] = round(time.time() - clock)
    log(f"parameters: {metrics['parameters']}, per-token compute parameters: {metrics['compute_parameters']}")
    log(f"done ({metrics['seconds']} s in all)")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "TRAINING_LOG.md").write_text(training_log(lines, metrics))
    return metrics


def evaluate(draft, target, prm, test, vocab, cfg, device, log) -> dict:
    draft_out = solve(draft, test, vocab, cfg, device)
    target_out = solve(target, test, vocab, cfg, device)
    draft_report, target_report = grade(test, draft_out, vocab), grade(test, target_out, vocab)
    log(
        f"test ({len(test)} problems): draft accuracy {draft_report.accuracy:.3f} {draft_report.first_error_kinds}, "
        f"target accuracy {target_report.accuracy:.3f} {target_report.first_error_kinds}"
    )

    trajectories = [
        LabelledTrajectory(p, s, label_steps(p, s))
        for p, s in ((p, split_steps(vocab.decode(o))[: cfg.max_steps]) for p, o in zip(test, draft_out, strict=True))
        if s
    ]
    rows = vocab.encode_batch([prm_text(t.problem.question, t.steps) for t in trajectories])
    scores = prm_rewards(prm, rows, vocab, device, cfg.gen_batch)
    flat_scores = [x for s in scores for x in s]
    flat_labels = [x for t in trajectories for x in t.labels]
    # The steps RSD meets: every step up to and including a trajectory's first wrong one.
    upto_scores, upto_labels = [], []
    for t, s in zip(trajectories, scores, strict=True):
        stop = t.labels.index(False) + 1 if False in t.labels else len(t.labels)
        upto_scores += s[:stop]
        upto_labels += t.labels[:stop]
    wrong = [s for s, label in zip(upto_scores, upto_labels, strict=True) if not label]
    right = [s for s, label in zip(upto_scores, upto_labels, strict=True) if label]
    prm_metrics = {
        "auroc_draft_steps": auroc(flat_scores, flat_labels),
        "auroc_up_to_first_error": auroc(upto_scores, upto_labels),
        "draft_steps_scored": len(flat_labels),
        "draft_steps_wrong": flat_labels.count(False),
        "wrong_rejected_at_delta": sum(s < cfg.delta for s in wrong) / max(1, len(wrong)),
        "right_rejected_at_delta": sum(s < cfg.delta for s in right) / max(1, len(right)),
    }
    log(f"prm: {json.dumps(prm_metrics)}")

    states = simulate_rsd(draft, target, prm, test, vocab, cfg, device, cfg.delta)
    rsd = rsd_report(states, target_out, draft, target, prm, vocab)
    log(f"rsd at delta {cfg.delta}: {json.dumps(rsd)}")
    return {
        "test_problems": len(test),
        "draft_accuracy": draft_report.accuracy,
        "target_accuracy": target_report.accuracy,
        "draft_first_error_kinds": draft_report.first_error_kinds,
        "target_first_error_kinds": target_report.first_error_kinds,
        "draft_mean_tokens": draft_report.mean_tokens,
        "target_mean_tokens": target_report.mean_tokens,
        "prm": prm_metrics,
        "rsd": rsd,
    }


def training_log(lines: Sequence[str], metrics: dict) -> str:
    body = "\n".join(lines)
    numbers = json.dumps(metrics, indent=2)
    return f"# Tiny world training log\n\n```\n{body}\n```\n\n## Metrics\n\n```json\n{numbers}\n```\n"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for models/, metrics.json, TRAINING_LOG.md")
    parser.add_argument("--quick", action="store_true", help="toy scale, to check the code on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields")
    args = parser.parse_args(argv)
    cfg = TrainConfig.quick() if args.quick else TrainConfig()
    cfg.seed = args.seed
    for item in args.set:
        key, value = item.split("=", 1)
        current = getattr(cfg, key)
        setattr(cfg, key, Shape(*json.loads(value)) if isinstance(current, Shape) else type(current)(json.loads(value)))
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    run(cfg, args.out, args.device)


if __name__ == "__main__":
    main()
