"""Token-level speculative decoding (Leviathan et al. 2023; Chen et al. 2023), the lossless baseline for RSD.

One round, for one trajectory:
  1. the draft proposes up to k tokens, one forward pass each (it stops early at EOS);
  2. the target scores the proposal in one forward pass, which also gives its distribution one token further;
  3. the acceptance rule keeps a prefix of the proposal, and the target adds one token of its own: the
     correction at the first rejection, or a bonus token when all k pass.
Both models keep a KV cache across rounds; on rejection it is cropped back to the accepted tokens, so nothing is
read twice. Each round writes between 1 and k + 1 tokens, and the output distribution is exactly the target's
(greedy: the target's own greedy text, token for token).

The tokens are committed through the same step rule as RSD's generators (a step ends at EOS, once its text holds
the delimiter, or at its token cap) and `rsd.controller.append_step`, so a trajectory ends for the same reasons and
reports look the same: every step is the target's (`source="target"`, `kept=True`, no reward).

Accounting, per trajectory (`traj.stats`):
- `models["draft"]`: `prefill_tokens` are the tokens the draft reads without having proposed them (the prompt,
  then the target's corrections and bonus tokens), `decode_tokens` the tokens it proposes; `calls` counts its
  forward passes.
- `models["target"]`: every token the target runs through a verification pass counts as a prefill ("scored")
  token: the prompt, each round's last committed token and the proposal. `decode_tokens` stays 0 because the
  target never decodes one token at a time; the tokens it writes are counted in `target_tokens`. `calls` counts
  verification passes.
- FLOPs are `cost.flops(tokens run, context_sum)` over the tokens each model actually ran through its layers.
- Tokens by source: accepted draft tokens are `draft_tokens_kept`, rejected ones (and accepted ones cut off by the
  end of the trajectory) `draft_tokens_discarded`, the target's corrections and bonus tokens `target_tokens`;
  `draft_tokens_kept + target_tokens` is the number of generated tokens. Every step counts in
  `steps_target_only`, since the target's distribution decides each of them.
- `traj.speculative` holds what only this method has: k, rounds, tokens proposed and accepted, and the token
  acceptance rate; `traj.to_dict()` writes it under "speculative".

Trajectories are decoded one at a time (batch 1); `RunConfig.batch_size` is not used.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rsd.controller import append_step
from rsd.core import ModelCost, ModelUsage, Prompted, RSDError, RunConfig, Step, StopReason, Trajectory

DEFAULT_K = 4


class LoadedCausalLM(Protocol):
    """What this module needs of a loaded model (`rsd.backends.hf.HFStepGenerator` provides it)."""

    model: Any  # a transformers PreTrainedModel with a causal LM head
    tokenizer: Any
    eos_token_ids: Any  # a collection of ints
    cost: ModelCost
    device: Any


# -- the acceptance rule ------------------------------------------------------------------------------------------
# Both rules take the proposal x_1..x_n and the target's scores for the n + 1 positions it covers (row i is the
# distribution of the token after x_1..x_i), and return (how many proposed tokens stay, the target's next token).


def accept_greedy(proposal: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Keep the proposal while it equals the target's argmax; the target's argmax at the first miss follows."""
    choices = target_logits.argmax(dim=-1)
    accepted = count_leading_true(choices[:-1] == proposal)
    return accepted, int(choices[accepted])


def accept_sampled(
    proposal: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> tuple[int, int]:
    """The speculative sampling rule: the tokens it returns are distributed as the target's, whatever the draft."""
    # Token x_i stays with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the target's token is
    # drawn from norm(max(0, p_i - q_i)); when all n stay, a bonus token is drawn from p_{n+1}.
    n = len(proposal)
    rows = torch.arange(n, device=proposal.device)
    p, q = target_probs[rows, proposal], draft_probs[rows, proposal]
    u = torch.rand(n, generator=generator, device=proposal.device)
    accepted = count_leading_true(u * q < p)  # q > 0 since x_i was drawn from q_i; p == 0 never passes
    if accepted == n:
        return n, draw(target_probs[n], generator)
    residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0.0)
    if not residual.sum() > 0:
        residual = target_probs[accepted]  # p == q up to rounding: the rejection had probability ~0
    return accepted, draw(residual, generator)


def count_leading_true(flags: torch.Tensor) -> int:
    return int(flags.to(torch.int64).cumprod(dim=0).sum()) if len(flags) else 0


def draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(weights, 1, generator=generator))


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution both models sample from: softmax(logits / T), cut to the top-p nucleus and renormalized."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Drop a token when the more likely ones already reach top_p: the smallest set of mass >= top_p stays.
    sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p] = 0.0
    nucleus = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return nucleus / nucleus.sum(dim=-1, keepdim=True)


def problem_seed(seed: int, key: Hashable, stream: str) -> int:
    """A stable seed per (run seed, problem, model): Python's own hash of a string changes from run to run."""
    digest = hashlib.sha256(f"{seed}|{key!r}|{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# -- the records this method adds ---------------------------------------------------------------------------------
@dataclass
class SpeculativeStats:
    """Token-level figures of speculative decoding, for one trajectory or (with `add`) a whole run."""

    k: int = DEFAULT_K  # tokens the draft proposes per round (fewer near EOS or the token budget)
    rounds: int = 0  # target verification passes
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0  # as the acceptance rule decided, before the trajectory's end cut anything

    @property
    def token_acceptance_rate(self) -> float | None:
        return self.draft_tokens_accepted / self.draft_tokens_proposed if self.draft_tokens_proposed else None

    def add(self, other: SpeculativeStats) -> None:
        self.rounds += other.rounds
        self.draft_tokens_proposed += other.draft_tokens_proposed
        self.draft_tokens_accepted += other.draft_tokens_accepted

    def to_dict(self, generated_tokens: int) -> dict:
        return {
            "k": self.k,
            "rounds": self.rounds,
            "draft_tokens_proposed": self.draft_tokens_proposed,
            "draft_tokens_accepted": self.draft_tokens_accepted,
            "token_acceptance_rate": self.token_acceptance_rate,
            # The speed-up's upper bound: tokens written per target forward pass (plain decoding: 1).
            "tokens_per_target_pass": generated_tokens / self.rounds if self.rounds else None,
        }


@dataclass
class SpeculativeTrajectory(Trajectory):
    """A `Trajectory` that also carries the token-level statistics of speculative decoding."""

    speculative: SpeculativeStats = field(default_factory=SpeculativeStats)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "speculative": self.speculative.to_dict(self.num_generated_tokens)}


# -- one model with its KV cache ----------------------------------------------------------------------------------
class CachedLM:
    """One model's KV cache for one trajectory: it holds a prefix of the sequence, is extended and cropped."""

    def __init__(self, lm: LoadedCausalLM) -> None:
        self.lm = lm
        self.cache: Any = None  # created by the model on the first forward pass
        self.length = 0  # tokens whose keys and values the cache holds
        self.usage = ModelUsage()
        self.tokens_run = 0
        self.context_sum = 0

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], positions_kept: int) -> torch.Tensor:
        """Append `ids` to the cache; the logits (float32) of the last `positions_kept` of them."""
        inputs = torch.tensor([list(ids)], dtype=torch.long, device=self.lm.device)
        kwargs = {cache_argument(self.lm.model): self.cache} if self.cache is not None else {}
        out = self.lm.model(input_ids=inputs, use_cache=True, logits_to_keep=positions_kept, **kwargs)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        n, start = len(ids), self.length
        self.length += n
        self.tokens_run += n
        self.context_sum += n * start + n * (n + 1) // 2  # token at position i attends to i + 1 tokens
        self.usage.calls += 1
        return out.logits[0, -positions_kept:].float()

    def crop(self, length: int) -> None:
        """Forget every token past `length` (a rejected proposal)."""
        if self.length > length:
            self.cache.crop(length - self.length)  # a negative count: tokens to drop, in every transformers
            self.length = length

    def final_usage(self) -> ModelUsage:
        self.usage.flops = self.lm.cost.flops(self.tokens_run, self.context_sum)
        return self.usage


_CACHE_ARGUMENT: dict[type, str] = {}


def cache_argument(model: Any) -> str:
    """transformers 5 renamed the forward's `past_key_values` to `cache`; use whichever this model takes."""
    kind = type(model)
    if kind not in _CACHE_ARGUMENT:
        names = inspect.signature(model.forward).parameters
        _CACHE_ARGUMENT[kind] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_ARGUMENT[kind]


def fit_vocabulary(logits: torch.Tensor, size: int) -> torch.Tensor:
    """The draft's logits over the target's ids: extra rows dropped (the target could not read them), missing ones
    -inf. Any proposal distribution keeps the rule lossless, as long as the same one is used in the ratio."""
    if logits.shape[-1] >= size:
        return logits[..., :size]
    pad = logits.new_full((*logits.shape[:-1], size - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


# -- the decoder --------------------------------------------------------------------------------------------------
@dataclass
class _Decoding:
    """The state of one trajectory being decoded."""

    traj: SpeculativeTrajectory
    ids: list[int]  # prompt + committed tokens
    open_step: list[int]  # committed tokens of the step not yet closed
    draft: CachedLM
    target: CachedLM
    draft_rng: torch.Generator | None  # None when greedy
    target_rng: torch.Generator | None

    @property
    def generated(self) -> int:
        return self.traj.num_generated_tokens + len(self.open_step)


class SpeculativeDecoder:
    """Token-level speculative decoding of whole trajectories, with the interface of `StepwiseDecoder`."""

    # The sampling rule, a class attribute so that a test can swap in a wrong rule and see the test fail.
    sampled_rule: Callable[..., tuple[int, int]] = staticmethod(accept_sampled)

    def __init__(self, draft: LoadedCausalLM, target: LoadedCausalLM, config: RunConfig, k: int = DEFAULT_K) -> None:
        if k < 1:
            raise RSDError(f"speculative decoding needs k >= 1 draft tokens per round, got {k}.")
        check_shared_vocabulary(draft, target)
        self.draft = draft
        self.target = target
        self.config = config
        self.k = k
        self.eos_ids = frozenset(int(t) for t in target.eos_token_ids)
        self.vocabulary = int(target.model.get_output_embeddings().weight.shape[0])  # rows of the target's logits

    def run(
        self,
        problems: Sequence[Prompted],
        on_finish: Callable[[Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        """Decode every problem, in order; `on_finish` sees each trajectory the moment it ends."""
        done: list[Trajectory] = []
        for problem in problems:
            traj = self.decode(problem)
            done.append(traj)
            if on_finish is not None:
                on_finish(traj)
        return done

    def decode(self, problem: Prompted) -> SpeculativeTrajectory:
        state = self._start(problem)
        while not state.traj.finished:
            self._round(state)
        state.traj.stats.models["draft"].add(state.draft.final_usage())
        state.traj.stats.models["target"].add(state.target.final_usage())
        return state.traj

    # -- setup --------------------------------------------------------------------------------------------------
    def _start(self, problem: Prompted) -> _Decoding:
        if not problem.question.strip():
            raise RSDError(f"problem {problem.key!r} has an empty question; give every problem some text.")
        prompt_ids = self._encode(problem.prompt)
        if not prompt_ids:
            raise RSDError(f"problem {problem.key!r} has an empty prompt; give every problem a prompt.")
        traj = SpeculativeTrajectory(
            key=problem.key,
            question=problem.question,
            prompt=problem.prompt,
            prompt_ids=prompt_ids,
            config=self.config,
            speculative=SpeculativeStats(k=self.k),
        )
        sampling = self.config.temperature > 0
        return _Decoding(
            traj=traj,
            ids=list(prompt_ids),
            open_step=[],
            draft=CachedLM(self.draft),
            target=CachedLM(self.target),
            draft_rng=self._generator(self.draft, problem.key, "draft") if sampling else None,
            target_rng=self._generator(self.target, problem.key, "target") if sampling else None,
        )

    def _encode(self, text: str) -> list[int]:
        encode = getattr(self.target, "encode", None)
        if callable(encode):
            return list(encode(text))
        return list(self.target.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generator(self, lm: LoadedCausalLM, key: Hashable, stream: str) -> torch.Generator:
        generator = torch.Generator(device=lm.device)
        generator.manual_seed(problem_seed(self.config.seed, key, stream))
        return generator

    # -- one round: propose, verify, commit ---------------------------------------------------------------------
    def _round(self, state: _Decoding) -> None:
        # Never write past the token budget: a round writes at most (proposal + 1) tokens.
        budget = self.config.max_new_tokens - state.generated
        proposal, draft_probs = self._propose(state, min(self.k, budget - 1))
        accepted, next_token = self._verify(state, proposal, draft_probs)
        spec = state.traj.speculative
        spec.rounds += 1
        spec.draft_tokens_proposed += len(proposal)
        spec.draft_tokens_accepted += accepted
        # Both caches keep the sequence up to the accepted tokens; the target's token is read in the next round.
        kept_length = len(state.ids) + accepted
        state.target.crop(kept_length)
        state.draft.crop(kept_length)
        state.traj.stats.draft_tokens_discarded += len(proposal) - accepted
        self._commit(state, proposal[:accepted], next_token)

    def _propose(self, state: _Decoding, n: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to n draft tokens, and the draft's distribution at each when sampling."""
        if n <= 0:
            return [], None
        start = time.perf_counter()
        draft = state.draft
        feed = state.ids[draft.length :]  # what the draft has not read yet: the prompt, or the target's tokens
        draft.usage.prefill_tokens += len(feed)
        proposal: list[int] = []
        rows: list[torch.Tensor] = []
        while len(proposal) < n:
            logits = fit_vocabulary(draft.forward(feed, 1)[-1], self.vocabulary)
            if state.draft_rng is None:
                token = int(logits.argmax())
            else:
                rows.append(sampling_probs(logits, self.config.temperature, self.config.top_p))
                token = draw(rows[-1], state.draft_rng)
            proposal.append(token)
            if token in self.eos_ids:
                break  # nothing after EOS could be kept
            feed = [token]
        draft.usage.decode_tokens += len(proposal)
        draft.usage.wall_time_s += time.perf_counter() - start
        return proposal, torch.stack(rows) if rows else None

    def _verify(self, state: _Decoding, proposal: list[int], draft_probs: torch.Tensor | None) -> tuple[int, int]:
        """The target's pass over the proposal: how many tokens stay, and the target's own next token."""
        start = time.perf_counter()
        target = state.target
        feed = state.ids[target.length :] + proposal
        target.usage.prefill_tokens += len(feed)
        logits = target.forward(feed, len(proposal) + 1)
        tokens = torch.tensor(proposal, dtype=torch.long, device=logits.device)
        if state.target_rng is None:
            result = accept_greedy(tokens, logits)
        else:
            target_probs = sampling_probs(logits, self.config.temperature, self.config.top_p)
            if draft_probs is None:  # no proposal this round
                draft_probs = target_probs[:0]
            result = self.sampled_rule(tokens, draft_probs.to(logits.device), target_probs, state.target_rng)
        target.usage.wall_time_s += time.perf_counter() - start
        return result

    # -- committing tokens into steps ---------------------------------------------------------------------------
    def _commit(self, state: _Decoding, accepted: list[int], next_token: int) -> None:
        """Append the round's tokens, closing steps as they end; tokens past the trajectory's end are dropped."""
        stats = state.traj.stats
        tokens = [*accepted, next_token]
        for i, token in enumerate(tokens):
            if state.traj.finished:
                stats.draft_tokens_discarded += max(0, len(accepted) - i)
                return
            from_draft = i < len(accepted)
            if from_draft:
                stats.draft_tokens_kept += 1
            else:
                stats.target_tokens += 1
            state.ids.append(token)
            state.open_step.append(token)
            stop = self._step_stop(state, token)
            if stop is not None:
                self._close_step(state, stop)

    def _step_stop(self, state: _Decoding, token: int) -> StopReason | None:
        """The step rule of RSD's generators: EOS, then the delimiter, then the token caps."""
        if token in self.eos_ids:
            return StopReason.EOS
        if self._completes_delimiter(state.open_step):
            return StopReason.DELIMITER
        if len(state.open_step) >= self.config.step_max_tokens or state.generated >= self.config.max_new_tokens:
            return StopReason.LENGTH
        return None

    def _completes_delimiter(self, step_ids: list[int]) -> bool:
        # As in rsd.backends.hf: every token adds at least one byte, so a delimiter the newest token completes lies
        # within the last len(bytes) tokens (plus slack for decoders that strip a leading space); an earlier one
        # would have ended the step already. Decoding only that window keeps a long step linear.
        window = len(self.config.delimiter.encode("utf-8")) + 2
        return self.config.delimiter in self._decode(step_ids[-window:])

    def _close_step(self, state: _Decoding, stop: StopReason) -> None:
        ids, state.open_step = state.open_step, []
        step = Step("target", self._decode(ids), ids, None, True, stop=stop)
        state.traj.stats.steps_target_only += 1
        append_step(state.traj, step)

    def _decode(self, ids: list[int]) -> str:
        return self.target.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def check_shared_vocabulary(draft: LoadedCausalLM, target: LoadedCausalLM) -> None:
    """Token-level verification compares token ids, so both models must give every id the same text."""
    fingerprints = [getattr(lm, "vocabulary_fingerprint", None) for lm in (draft, target)]
    if all(callable(f) for f in fingerprints):
        same = fingerprints[0]() == fingerprints[1]()
    else:
        same = draft.tokenizer.get_vocab() == target.tokenizer.get_vocab()
    if not same:
        raise RSDError(
            "token-level speculative decoding needs a draft and a target with the same tokenizer; "
            "pick a draft of the target's model family (RSD itself works across tokenizers)."
        )
