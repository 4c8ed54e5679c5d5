"""Token-level speculation: the target writes a step with fewer forwards, exactly as it would alone.

When the target writes a step (a rejected draft step in RSD, or every step of the `sd` method), it does not decode
one token per forward:

  1. it first reads the proposal it was given (in RSD, the rejected draft step) in the same forward that runs its
     prefix, and keeps the longest prefix of it that it would have written itself, plus its own next token;
  2. then rounds: the draft proposes k tokens (one decode forward each), the target reads them all in one forward,
     keeps what it agrees with and adds its own next token; both models roll back the rest (their next feed
     overwrites it: nothing is copied); k, one for all the rows of a round (they share its forwards), follows
     their measured acceptance and the draft's price;
  3. until the step ends (delimiter, EOS or cap), where the target alone would end it.

Exact by construction: a proposed token stays only if it equals the target's own choice at its position
(`rsd.engine.sampler.choose`: the argmax, or a top-p draw with the uniform fixed by (seed, trajectory, position)),
so the step is, token for token, the one the target writes alone with the same seed, greedy or sampled. The draft
samples with the same uniforms, which makes its proposals agree often when its distribution is close. (The
speculative-sampling rule of Leviathan et al. would not be exact for RSD's rewrites: a rejected step is not a sample
of the draft's distribution once the PRM's rejection is conditioned on.)

All rewriting rows verify in one forward; a row that finishes leaves both arenas while the others go on.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rsd.core import (
    RSDError,
    Speculation,
    StepOutput,
    StepParams,
    StepRequest,
    StopReason,
)
from rsd.engine.kv_cache import to_device
from rsd.engine.sampler import Draw, accepted_length, choose
from rsd.engine.steps import CallRequest, Row, StepModel, check_requests, write_steps

MAX_K = 8  # the most tokens the draft proposes per round
# A round keeps the k of the rounds before while that k promises at least this share of the best k's tokens per unit
# of work. On a GPU each k is a verification shape, a CUDA graph captured at its first use (0.04-0.06 s for a 14B
# target), and near its best the yield is flat (at acceptance 0.8 and a draft price of 0.15, k = 4 and 5 are within
# 0.3%), so a k that followed every wobble of the measured price would capture shape after shape for nothing.
STEADY_K_SHARE = 0.99
TIMED_FORWARDS = 32  # recent timings of each model's forwards whose median prices the draft on a GPU
MIN_DRAFT_PRICE = 0.02  # a draft forward costs at least this share of a target forward (k stays bounded anyway)
PRIOR_ACCEPTANCE = 0.8  # the token acceptance assumed before any is measured
PRIOR_TRIALS = 2.0  # how many checked tokens the prior weighs
ACCEPTANCE_MEMORY = 0.7  # weight of what was measured before, per round
# (proposal, the target's own choices, where the proposal starts: its trajectory and its first token's position)
# -> how many proposed tokens stay
AcceptRule = Callable[[Sequence[int], Sequence[int], Draw], int]


class ForwardTimes:
    """On a GPU, the milliseconds of the draft's forwards and of the target's verification forwards that the rounds
    run anyway (CUDA events, read after the round's one wait for the target's verdict): the ratio of their recent
    medians is the draft's real price in target forwards. A small draft's forward costs more than its share of the
    weights (its many small kernels): about 0.18 of a 14B target's on an H100, where the weights say 0.10.
    Medians, because a forward whose CUDA graph is being captured takes a hundred times longer."""

    def __init__(self) -> None:
        self.samples: dict[str, deque[float]] = {
            "draft": deque(maxlen=TIMED_FORWARDS),
            "target": deque(maxlen=TIMED_FORWARDS),
        }
        self.pending: list[tuple[str, Any, Any, int]] = []

    @contextlib.contextmanager
    def timing(self, model: str, forwards: int) -> Iterator[None]:
        """Time the `forwards` forwards of `model` queued inside (read later, by `read`)."""
        started = self._event()
        yield
        self.pending.append((model, started, self._event(), forwards))

    def _event(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def read(self) -> None:
        """Fold in the forwards that have finished (all of them after the round's wait)."""
        waiting = []
        for model, started, ended, forwards in self.pending:
            if ended.query():
                self.samples[model].append(started.elapsed_time(ended) / forwards)
            else:
                waiting.append((model, started, ended, forwards))
        self.pending = waiting

    def medians(self) -> tuple[float, float] | None:
        """The median milliseconds of a draft forward and of a target verification, once both have run."""
        if not (self.samples["draft"] and self.samples["target"]):
            return None
        return statistics.median(self.samples["draft"]), statistics.median(self.samples["target"])

    def draft_price(self) -> float | None:
        """A draft forward's measured time over a target verification's, once both have run."""
        medians = self.medians()
        return None if medians is None else medians[0] / max(1e-6, medians[1])


@dataclass
class Rewrite(CallRequest):
    """One step being written with speculation, and what it cost."""

    target: Row  # the target's bookkeeping (cached prefix, context, forwards)
    draft: Row | None = None  # the draft's, once it proposes
    proposal: list[int] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    stop: StopReason | None = None
    target_slot: int = 0
    draft_slot: int = 0
    target_held: int = 0  # tokens past the prefix the target's arena holds for the row
    draft_held: int = 0  # tokens of prefix + written (+ proposals) the draft's arena holds
    draft_consistent: int = 0  # of those, how many agree with prefix + written after a verification
    run_after_prefix: int = 0  # tokens the target ran after its prefill (verified tokens)
    speculation: Speculation = field(default_factory=Speculation)

    @property
    def position(self) -> int:
        """Position of the next token to choose."""
        return len(self.prefix) + len(self.written)


class SpeculativeStepGenerator:
    """The target as a `StepGenerator` whose steps the draft helps write (both in process, one tokenizer).

    Its steps equal the target's own; requests may carry a `proposal` (a rejected draft step) to verify first.
    `accept` decides how many proposed tokens stay given the target's own choices: `exact_acceptance` (they stay
    while they are equal) is the only exact rule; another one makes the forwards of a run at a set acceptance, to
    time them on models that never agree (random weights), and may draw by where the proposal stands."""

    def __init__(self, target: Any, draft: Any, accept: AcceptRule | None = None, max_rows: int | None = None) -> None:
        """`max_rows`: a call of more rows than this is written by the target alone, one forward per token (the
        same steps): where speculation does not pay at that batch (`rsd.api.RSD`'s "auto" rewrites)."""
        problem = speculation_problem(target, draft)
        if problem is not None:
            need, other_fix = problem
            raise RSDError(f"speculative rewrites need {need}; use --rewrite plain, or {other_fix}.")
        self.target_generator, self.draft_generator = target, draft
        self.target, self.draft = target.engine, draft.engine
        if self.draft is self.target:
            # One generator as both (RSD(draft=m, target=m)): the draft proposes while the target's call holds the
            # rows, so it needs an arena of its own (over the same weights) and keeps its caches there.
            engine = self.target
            self.draft = StepModel(engine.model, engine.stop_rule.tokenizer, engine.stop_rule.eos_token_ids, "draft")
        self.name, self.role, self.cost = target.name, target.role, target.cost
        self.tokenizer = target.tokenizer
        self.accept = accept or exact_acceptance
        self.max_rows = max_rows
        # Per trajectory, the token acceptance measured over its rounds (smoothed); a round's k follows those of its
        # rows, so what a step costs depends on which trajectories share its rounds (its tokens never do). `tallies`
        # holds the decayed (accepted, checked) token counts each is the ratio of.
        self.acceptance: dict[Hashable, float] = {}
        self.tallies: dict[Hashable, tuple[float, float]] = {}
        # A draft forward's price in target forwards, which sets k: first their sizes (both read their weights once
        # a forward); on a GPU, then, the measured times of the forwards the rounds run (`ForwardTimes`), so there k,
        # and the forwards a step takes, can differ from run to run (the tokens never do).
        self.draft_price = max(MIN_DRAFT_PRICE, draft.cost.parameters / max(1, target.cost.parameters))
        on_gpu = self.target.runner.device.type == "cuda" and self.draft.runner.device.type == "cuda"
        self.times = ForwardTimes() if on_gpu else None
        self.steady_k: int | None = None  # the k of the last round (kept while it stays near the best: STEADY_K_SHARE)

    # -- the StepGenerator interface ------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        return self.target_generator.context_length

    def encode(self, text: str) -> list[int]:
        return self.target_generator.encode(text)

    def vocabulary_fingerprint(self) -> str:
        return self.target_generator.vocabulary_fingerprint()

    def release(self, keys: Sequence[Hashable]) -> None:
        self.target.prefixes.release(keys)
        self.draft.prefixes.release(keys)
        for key in keys:
            self.acceptance.pop(key, None)
            self.tallies.pop(key, None)

    def generate_steps(self, requests: Sequence[StepRequest], params: StepParams) -> list[StepOutput]:
        check_requests(requests)
        if self.max_rows is not None and sum(r.max_tokens > 0 for r in requests) > self.max_rows:
            return write_steps(self.target, requests, params)
        outputs: list[StepOutput | None] = [None] * len(requests)
        rows = []
        for i, request in enumerate(requests):
            if request.max_tokens < 1:  # no budget left: nothing runs, the cache stays
                outputs[i] = StepOutput([], "", StopReason.LENGTH, prefill_tokens=0, decode_tokens=0)
            else:
                rows.append(Rewrite(i, request, Row(i, request)))
        if rows:
            with torch.inference_mode():
                live = self._verify_proposals(rows, params, outputs)
                if live:
                    self._rounds(live, params, outputs)
        return outputs  # type: ignore[return-value]

    # -- the first forward: the prefix and the proposal -----------------------------------------------------
    def _verify_proposals(
        self, rows: list[Rewrite], params: StepParams, outputs: list[StepOutput | None]
    ) -> list[Rewrite]:
        """Prefill every row and verify its proposal in the same forward; returns the rows that go on."""
        for row in rows:
            row.proposal = list(row.request.proposal[: row.cap - 1])
        room = max(row.cap for row in rows) + MAX_K + 2
        logits = self.target.open([row.target for row in rows], room, [row.proposal for row in rows])
        draws: list[Draw | None] = [
            (row.request.key, len(row.prefix) + j) for row in rows for j in range(1 + len(row.proposal))
        ]
        choices = choose(logits, params, draws).tolist()
        first = 0
        for slot, row in enumerate(rows):
            own = choices[first : first + 1 + len(row.proposal)]
            first += len(own)
            row.target_slot, row.target_held, row.run_after_prefix = slot, len(row.proposal), 0
            kept = self._accept(row, row.proposal, own, params)
            row.speculation.proposal_tokens += len(row.proposal)
            row.speculation.from_proposal += kept
            row.speculation.rounds += 1
        return self._leave_finished(rows, outputs)

    # -- rounds: the draft proposes, the target verifies ----------------------------------------------------------
    def _rounds(self, live: list[Rewrite], params: StepParams, outputs: list[StepOutput | None]) -> None:
        self._roll_target_back(live)
        draft_logits = self._open_draft(live)
        while live:
            rooms = [max(0, row.cap - len(row.written) - 1) for row in live]  # proposals the step can still use
            k = self.round_size(*(row.request.key for row in live), rooms=rooms, steady=self.steady_k)
            self.steady_k = k
            limits = [min(k, room) for room in rooms]
            table = self._propose(live, draft_logits, limits, params)
            logits, starts, fed, draws = self._verify(live, table, k, limits)
            choices = choose(logits, params, draws)
            read = (choices if table is None else torch.cat([choices, table.flatten()])).tolist()  # the round's wait
            self._price_draft()
            chosen, table_read = read[: len(draws)], read[len(draws) :]
            slots = self.draft.runner.slots
            proposals = [
                [table_read[j * slots + row.draft_slot] for j in range(limit)]
                for row, limit in zip(live, limits, strict=True)
            ]
            owns = [chosen[start : start + 1 + len(p)] for start, p in zip(starts, proposals, strict=True)]
            live = self._verify_round(live, proposals, owns, fed, params, outputs)
            if live:
                self._park_idle(live)
                self._roll_target_back(live)
                draft_logits = self._catch_up_draft(live)

    def _timed(self, model: str, forwards: int) -> contextlib.AbstractContextManager:
        """Time the forwards queued inside on a GPU (`ForwardTimes`); elsewhere nothing."""
        if self.times is None or forwards < 1:
            return contextlib.nullcontext()
        return self.times.timing(model, forwards)

    def _price_draft(self) -> None:
        if self.times is not None:
            self.times.read()
            measured = self.times.draft_price()
            if measured is not None:
                self.draft_price = max(MIN_DRAFT_PRICE, measured)

    def _verify(
        self, live: list[Rewrite], table: torch.Tensor | None, k: int, limits: list[int]
    ) -> tuple[torch.Tensor, list[int], list[int], list[Draw | None]]:
        """The target reads each row's last written token and its proposals in one forward, without waiting for the
        draft's proposals (they stay on the device). Returns the logits, each row's first logit row, the tokens each
        row ran, and each logit row's draw. On a GPU every slot reads 1 + k tokens, padded where a step has less room
        left: one CUDA graph per k (and rows and width), not one per room a step's end leaves; a verification of a
        few tokens a row costs the same for a few more (it reads the weights once)."""
        runner = self.target.runner
        if [row.target_slot for row in live] != sorted(row.target_slot for row in live):
            raise AssertionError("speculation bookkeeping: rows out of their slots' order")
        tokens = 1 + k
        uniform = runner.can_verify(tokens)
        draft_slots = self.draft.runner.slots
        by_slot = {row.target_slot: (i, row, limit) for i, (row, limit) in enumerate(zip(live, limits, strict=True))}
        zero = len(live) + (0 if table is None else table.numel())  # a harmless id for idle slots and padding
        index: list[int] = []
        draws: list[Draw | None] = []
        starts, fed, counts = [], [], [0] * runner.slots
        for slot in range(runner.slots):
            i, row, limit = by_slot.get(slot, (None, None, 0))
            count = tokens if uniform else (1 + limit if row is not None else 0)
            if row is None:
                index += [zero] * count
                draws += [None] * count
                continue
            starts.append(len(index))
            fed.append(count)
            counts[slot] = count
            own = [i, *(len(live) + j * draft_slots + row.draft_slot for j in range(count - 1))]
            index += [*own[: 1 + limit], *[zero] * (count - 1 - limit)]
            draws += [(row.request.key, row.position + j) for j in range(count)]
        device = runner.device
        last = to_device(torch.tensor([row.written[-1] for row in live] + [0], dtype=torch.long), device)
        source = last if table is None else torch.cat([last[:-1], table.flatten().to(device), last[-1:]])
        ids = source[to_device(torch.tensor(index, dtype=torch.long), device)]
        with self._timed("target", 1):
            logits = runner.verify(ids, tokens) if uniform else runner.extend_ids(counts, ids)
        return logits, starts, fed, draws

    def _verify_round(
        self,
        live: list[Rewrite],
        proposals: list[list[int]],
        owns: list[list[int]],
        fed: list[int],
        params: StepParams,
        outputs: list[StepOutput | None],
    ) -> list[Rewrite]:
        """Keep what the target agrees with; returns the rows that go on (those that end leave both arenas)."""
        for row, proposal, own, count in zip(live, proposals, owns, fed, strict=True):
            row.target_held += count
            self._judge(row, proposal, own, params)
        return self._leave_finished(live, outputs)

    def _judge(self, row: Rewrite, proposal: list[int], own: list[int], params: StepParams) -> None:
        """One row's verdict on its proposal, given the target's own choices, and what it cost: the row's counts are
        its own tokens (its last one and its proposals), whatever the others made the forward run."""
        written_before = len(row.written)
        row.target.count_run(row.position - 1, 1 + len(proposal))
        row.target.forwards += 1
        row.run_after_prefix += 1 + len(proposal)
        kept = self._accept(row, proposal, own, params)
        # The draft fed the tokens before the row's last proposal; those the target kept stay in its cache. (It fed
        # more where the step had less room than the round's k: those are forgotten.)
        row.draft_consistent = len(row.prefix) + written_before + min(kept, max(0, len(proposal) - 1))
        row.speculation.proposed += len(proposal)
        row.speculation.from_draft += kept
        row.speculation.rounds += 1
        # A proposed token was turned down only where the target's own token took its place; a step that ended inside
        # the kept tokens turned none down (the draft was right as far as the step went).
        rejected = kept < len(proposal) and len(row.written) - written_before > kept
        self._measure(row.request.key, kept, kept + rejected)

    def _measure(self, key: Hashable, accepted: int, trials: int) -> None:
        """Fold a round's accepted tokens out of its trials (tokens checked) into the trajectory's acceptance: the
        ratio of the decayed sums. (A decayed mean of each round's own ratio would be biased low: a round stops at
        its first refusal, so short rounds, with low ratios, are the common ones; at a true rate of 0.8 and k = 5
        it reads 0.64, and k comes out too small.)"""
        if trials:
            kept, checked = self.tallies.get(key, (PRIOR_ACCEPTANCE * PRIOR_TRIALS, PRIOR_TRIALS))
            kept = ACCEPTANCE_MEMORY * kept + accepted
            checked = ACCEPTANCE_MEMORY * checked + trials
            self.tallies[key] = (kept, checked)
            self.acceptance[key] = kept / checked

    def _park_idle(self, live: list[Rewrite]) -> None:
        """Slots whose rows left (the bucket did not shrink) start their columns over in both arenas."""
        for runner, taken in ((self.target.runner, {r.target_slot for r in live}),
                              (self.draft.runner, {r.draft_slot for r in live})):  # fmt: skip
            idle = [slot for slot in range(runner.slots) if slot not in taken]
            if idle:
                runner.park(idle)

    def _accept(self, row: Rewrite, proposal: list[int], own: list[int], params: StepParams) -> int:
        """Append the proposal's kept tokens and the target's own next one, up to where the step ends. Returns how
        many proposed tokens the step kept."""
        kept = min(self.accept(proposal, own[: len(proposal)], (row.request.key, row.position)), len(proposal))
        new = [*proposal[:kept], own[kept]]
        before = len(row.written)
        row.written += new
        stays, stop = self.target.stop_rule.first_stop(row.written, before, row.cap, params.delimiter)
        del row.written[stays:]
        row.stop = stop
        return min(kept, stays - before)

    def _leave_finished(self, rows: list[Rewrite], outputs: list[StepOutput | None]) -> list[Rewrite]:
        """Finished rows leave both arenas with their caches; the others move to the front. Returns the others."""
        going_on = []
        for row in rows:
            if row.stop is None:
                going_on.append(row)
                continue
            self.target.leave(row.target, row.target_slot, [*row.prefix, *row.written[:-1]])
            if row.draft is not None:
                held = [*row.prefix, *row.written][: min(row.draft_consistent, row.position)]
                self.draft.leave(row.draft, row.draft_slot, held)
            outputs[row.index] = self._output(row)
        self._compact(going_on, rows)
        return going_on

    def _compact(self, going_on: list[Rewrite], rows: list[Rewrite]) -> None:
        if not going_on or len(going_on) == len(rows):
            return
        if self.target.runner.keep([row.target_slot for row in going_on]) is not None:
            for slot, row in enumerate(going_on):
                row.target_slot = slot
        if going_on[0].draft is not None and self.draft.runner.keep([row.draft_slot for row in going_on]) is not None:
            for slot, row in enumerate(going_on):
                row.draft_slot = slot

    # -- the draft's side ---------------------------------------------------------------------------------------
    def _roll_target_back(self, live: list[Rewrite]) -> None:
        """The target holds the prefix and every written token but the last (which heads the next feed)."""
        counts = [0] * self.target.runner.slots
        for row in live:
            counts[row.target_slot] = row.target_held - (len(row.written) - 1)
            row.target_held = len(row.written) - 1
        self.target.runner.rollback(counts)

    def _open_draft(self, live: list[Rewrite]) -> torch.Tensor:
        """The draft's call over the going-on rows, each at its prefix and written tokens: its logits at the last."""
        for row in live:
            row.draft = Row(row.index, StepRequest(row.request.key, [*row.prefix, *row.written], row.cap))
        room = max(row.cap for row in live) + MAX_K + 2
        logits = self.draft.open([row.draft for row in live], room)
        for slot, row in enumerate(live):
            row.draft_slot, row.draft_held = slot, row.position
            usage = row.speculation.draft
            usage.prefill_tokens += len(row.draft.prefix) - row.draft.reused
            usage.calls += 1
        return logits

    def _propose(
        self, live: list[Rewrite], logits: torch.Tensor, limits: list[int], params: StepParams
    ) -> torch.Tensor | None:
        """Draft tokens for every slot, [the most any row needs, draft slots] on the device (the first from `logits`,
        one per slot or per row of a call's first feed, which sit at slots 0, 1, ...; one decode forward each after):
        nothing waits for them."""
        if max(limits) < 1:
            return None
        runner = self.draft.runner
        slots = runner.slots
        first = choose(logits, params, self._draft_draws(live, 0, logits.shape[0]))
        chosen = [torch.nn.functional.pad(first, (0, slots - first.shape[0]))]
        with self._timed("draft", max(limits) - 1):
            for j in range(1, max(limits)):
                logits = runner.decode(chosen[-1])
                chosen.append(choose(logits, params, self._draft_draws(live, j, slots)))
                for row, limit in zip(live, limits, strict=True):
                    if j < limit:  # a decode this row's own proposals needed (others ride on it)
                        row.draft.count_run(row.draft_held, 1)
                        usage = row.speculation.draft
                        usage.decode_tokens += 1
                        usage.calls += 1
                    row.draft_held += 1
        return torch.stack(chosen)

    def _draft_draws(self, live: list[Rewrite], ahead: int, size: int) -> list[Draw | None]:
        """Each row's draw for its proposed token `ahead` past its next one, by the draft's slot."""
        draws: list[Draw | None] = [None] * size
        for row in live:
            if row.draft_slot < size:
                draws[row.draft_slot] = (row.request.key, row.position + ahead)
        return draws

    def _catch_up_draft(self, live: list[Rewrite]) -> torch.Tensor:
        """Roll the draft back to what the target kept, then feed it what it has not read: the target's own token,
        after the last proposal when every one was kept. One forward: a decode, or, when a row needs two tokens, a
        forward of two tokens a slot (the others' padding rolled back). Returns the draft's logits per slot."""
        runner = self.draft.runner
        slots = runner.slots
        counts, feeds = [0] * slots, [[0] for _ in range(slots)]
        for row in live:
            consistent = min(row.draft_consistent, row.position)
            feed = row.written[consistent - len(row.prefix) :]
            if not 1 <= len(feed) <= 2:
                raise AssertionError(f"speculation bookkeeping: the draft catches up {len(feed)} tokens")
            counts[row.draft_slot] = row.draft_held - consistent
            feeds[row.draft_slot] = feed
            row.draft.count_run(consistent, len(feed))
            row.draft_held = row.position
            usage = row.speculation.draft
            usage.decode_tokens += len(feed)
            usage.calls += 1
        runner.rollback(counts)
        with self._timed("draft", 1):
            return runner.feed_last(feeds)

    def round_size(self, *keys: Hashable, rooms: Sequence[int] | None = None, steady: int | None = None) -> int:
        """The k that maximises the tokens a round writes per unit of work, over its rows (the trajectories `keys`,
        with `rooms[i]` proposals the step can still use): a row of measured acceptance a writes
        (1 - a^(j+1)) / (1 - a) tokens from j = min(k, room) proposals, and the round costs one target forward and
        min(k, the largest room) draft forwards whatever its rows. One k for all of them: a row with fewer proposals
        would not make the round cheaper, since every slot runs as many tokens as the longest. `steady`, the k of the
        rounds before, stays while it yields at least STEADY_K_SHARE of the best (ties go to the smaller k)."""
        acceptances = [min(self.acceptance.get(key, PRIOR_ACCEPTANCE), 0.999) for key in keys]
        rooms = list(rooms) if rooms is not None else [MAX_K] * len(keys)
        widest = max(rooms, default=0)

        def tokens_per_work(k: int) -> float:
            written = sum(tokens_per_round(a, min(k, room)) for a, room in zip(acceptances, rooms, strict=True))
            return written / (1 + self.draft_price * min(k, widest))

        best = max(range(1, MAX_K + 1), key=tokens_per_work)
        if (
            steady is not None
            and 1 <= steady <= MAX_K
            and tokens_per_work(steady) >= STEADY_K_SHARE * tokens_per_work(best)
        ):
            return steady
        return best

    def _output(self, row: Rewrite) -> StepOutput:
        draft = row.draft
        if draft is not None:
            usage = row.speculation.draft
            usage.flops = self.draft_generator.cost.flops(usage.prefill_tokens + usage.decode_tokens, draft.context_sum)
        return StepOutput(
            token_ids=row.written,
            text=self.target.stop_rule.text(row.written),
            stop=row.stop or StopReason.LENGTH,
            prefill_tokens=len(row.prefix) - row.target.reused,
            decode_tokens=len(row.proposal) + row.run_after_prefix,
            context_sum=row.target.context_sum,
            forwards=row.target.forwards,
            speculation=row.speculation,
        )


def exact_acceptance(proposal: Sequence[int], choices: Sequence[int], start: Draw) -> int:
    """The exact rule: proposed tokens stay while they equal the target's own choices (`accepted_length`), wherever
    they stand."""
    return accepted_length(proposal, choices)


def tokens_per_round(acceptance: float, proposals: int) -> float:
    """Expected tokens a round writes from `proposals` proposed tokens, each kept with probability `acceptance`
    until the first refused: the kept ones and the target's own next token."""
    if acceptance >= 1.0:
        return proposals + 1.0
    return (1 - acceptance ** (proposals + 1)) / (1 - acceptance)


def speculation_problem(target: Any, draft: Any) -> tuple[str, str] | None:
    """Why the draft cannot help the target write its steps: (what speculation needs, another way to get there), or
    None when it can."""
    for role, generator in (("target", target), ("draft", draft)):
        if not isinstance(getattr(generator, "engine", None), StepModel):
            return (
                f"the {role} in process (a model folder or hub id, not a server)",
                "serve the target with vLLM's --speculative-config to speculate inside the server",
            )
    if target.vocabulary_fingerprint() != draft.vocabulary_fingerprint():
        return "a draft and a target with the same tokenizer", "pick a draft of the target's model family"
    return None
