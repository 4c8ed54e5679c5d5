"""RSD with its rows out of lock-step: the draft's forwards carry the rows drafting their step and the rows proposing
for a rewrite together, and a verification carries rewrites of different steps.

`StepwiseDecoder` moves every row through draft -> PRM -> rewrite together: while the target rewrites the rejected
rows the others wait, and a rewrite call lasts until its slowest row is done. Here every row is a lane with its own
phase, and each iteration runs:

  1. k draft forwards over every lane: a drafting lane takes the tokens as its step's, a rewriting lane as
     proposals;
  2. one verification over the rewriting lanes (`SpeculativeStepGenerator`'s, the same exact rule);
  3. the PRM over the lanes whose draft step just ended; the kept steps are committed, the rejected ones go to the
     target, whose arena is opened again with them: that forward reads each new lane's prefix and rejected step and
     gives each lane already rewriting its next token;
  4. the lanes whose rewrite ended commit it and draft their next step; the draft catches every lane up.

Each trajectory's steps, decisions and tokens are those of the lock-step decoder: a token is chosen by (seed,
trajectory, position), a decision by (seed, trajectory, step). Runs where the draft and the target are in process
with speculative rewrites and every trajectory samples alike; `StepwiseDecoder` otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from rsd.controller import commit_rsd_step, record_generation, record_scoring
from rsd.core import Prompted, StepOutput, StepParams, StepRequest, Trajectory
from rsd.engine.sampler import Draw, choose
from rsd.engine.steps import Row
from rsd.loop import StepwiseDecoder
from rsd.speculative import MAX_K, Rewrite, SpeculativeStepGenerator


@dataclass
class Lane:
    """One trajectory in the draft's arena: the step it drafts, or the rewrite the target writes for it."""

    traj: Trajectory
    slot: int  # its slot in the draft's arena
    held: int = 0  # ids of the trajectory (prefix, then the step's tokens) the draft's arena holds
    consistent: int = 0  # of those, how many agree with what the trajectory now holds
    step: Row | None = None  # the draft step being written (its tokens and costs)
    draft_seconds: float = 0.0
    proposal: StepOutput | None = None  # the rejected draft step, while the target rewrites it
    reward: float = 0.0
    rewrite: Rewrite | None = None
    target_seconds: float = 0.0
    done: bool = False

    @property
    def key(self) -> Hashable:
        return self.traj.key

    def ids(self) -> list[int]:
        """What the draft should hold, and one more: the prefix and the tokens written since."""
        if self.rewrite is not None:
            return [*self.rewrite.prefix, *self.rewrite.written]
        return [*self.step.prefix, *self.step.tokens]


@dataclass
class Iteration:
    """What one iteration's forwards gave back, on the host."""

    tokens: list[list[int]] = field(default_factory=list)  # per lane, the draft's tokens in order
    owns: list[list[int]] = field(default_factory=list)  # per rewriting lane, the target's choices


class ContinuousDecoder(StepwiseDecoder):
    """`StepwiseDecoder`'s results, with rows that do not wait for each other (see the module)."""

    def run(
        self,
        problems: Sequence[Prompted],
        on_finish: Callable[[Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        speculative = self.fallback
        if not isinstance(speculative, SpeculativeStepGenerator) or self.reward_model is None:
            return super().run(problems, on_finish)
        pending = [self.start(p) for p in reversed(problems)]
        if len({traj.config.step_params() for traj in pending}) > 1:
            return super().run(problems, on_finish)
        self.spec = speculative
        self.draft, self.target = speculative.draft, speculative.target
        self.done: list[Trajectory] = []
        self.on_finish = on_finish
        self.lanes: list[Lane] = []
        self.rewriting: list[Lane] = []  # in the order of their target slots
        with torch.inference_mode():
            while pending or self.lanes:
                waiting = [p for p in pending if p.finished]
                for traj in waiting:
                    pending.remove(traj)
                    self._finish(traj)
                if pending and len(self.lanes) < self.config.batch_size or any(lane.done for lane in self.lanes):
                    self._open_draft(pending)
                    if not self.lanes:
                        continue
                self._iterate()
        order = {p.key: i for i, p in enumerate(problems)}
        return sorted(self.done, key=lambda t: order[t.key])

    # -- lanes coming and going ------------------------------------------------------------------------------------
    def _finish(self, traj: Trajectory) -> None:
        self.release(traj)
        self.done.append(traj)
        if self.on_finish is not None:
            self.on_finish(traj)

    def _open_draft(self, pending: list[Trajectory]) -> None:
        """The draft's arena opened again over the lanes going on and new trajectories: each lane's cache taken
        back, its ids not yet held run; the logits of every lane's last id."""
        going_on = [lane for lane in self.lanes if not lane.done]
        for lane in going_on:  # the keys and values the lane's trajectory still agrees with, but its last id
            lane.held = lane.consistent = min(lane.consistent, len(lane.ids()) - 1)
            self.draft.leave(Row(0, StepRequest(lane.key, lane.ids(), 1)), lane.slot, lane.ids()[: lane.held])
        while pending and len(going_on) < self.config.batch_size:
            traj = pending.pop()
            if traj.finished:
                self._finish(traj)
                continue
            lane = Lane(traj, slot=0)
            if self._start_step(lane):
                going_on.append(lane)
        self.lanes = going_on
        if not going_on:
            return
        rows = [Row(i, StepRequest(lane.key, lane.ids(), 1)) for i, lane in enumerate(going_on)]
        room = max(lane.traj.config.max_new_tokens for lane in going_on) + MAX_K + 2
        self.logits = self.draft.open(rows, room)
        for slot, (lane, row) in enumerate(zip(going_on, rows, strict=True)):
            lane.slot, lane.held = slot, len(row.prefix)
            if lane.rewrite is not None:
                lane.rewrite.draft_slot = slot
            elif not lane.step.tokens:  # what the open ran of the step's prefix is the step's prefill
                lane.step.reused = row.reused
            self._count_draft(lane, row.reused, len(row.prefix) - row.reused)

    def _start_step(self, lane: Lane) -> bool:
        """The lane's next draft step; False when the trajectory cannot take one (it is finished)."""
        traj = lane.traj
        if any(self.room(g, traj) < 1 for g in self.generators):
            traj.finish("context")
        if traj.finished:
            lane.done = True
            self._finish(traj)
            return False
        lane.step = Row(0, self.step_request(self.proposer, traj))
        lane.proposal, lane.rewrite, lane.draft_seconds, lane.target_seconds = None, None, 0.0, 0.0
        return True

    # -- one iteration -----------------------------------------------------------------------------------------------
    def _iterate(self) -> None:
        params = self.lanes[0].traj.config.step_params()
        started = time.perf_counter()
        k = self._round_size()
        limits = [self._limit(lane, k) for lane in self.lanes]
        table = self._propose(limits, params)
        read = self._verify(table, k, limits, params)
        seconds = time.perf_counter() - started
        for lane in self.lanes:  # the iteration's time, shared by its lanes
            share = seconds / len(self.lanes)
            if lane.rewrite is not None:
                lane.target_seconds += share
            else:
                lane.draft_seconds += share
        ended = self._take_draft_tokens(read, limits, params)
        self._take_verdicts(read, params)
        self._score(ended, params)
        self._catch_up()

    def _round_size(self) -> int:
        """The draft forwards of an iteration: while any lane drafts its step, the most a round takes (a drafting lane
        keeps every token, and the lanes rewriting propose on the same forwards); else the rewrites' own k."""
        if len(self.rewriting) < len(self.lanes):
            return MAX_K
        keys = [lane.key for lane in self.rewriting]
        rooms = [max(0, lane.rewrite.cap - len(lane.rewrite.written) - 1) for lane in self.rewriting]
        self.spec.steady_k = self.spec.round_size(*keys, rooms=rooms, steady=self.spec.steady_k)
        return self.spec.steady_k

    def _limit(self, lane: Lane, k: int) -> int:
        """Tokens the lane takes from this iteration's draft forwards: its step's room, or its proposals'."""
        if lane.rewrite is not None:
            return min(k, max(0, lane.rewrite.cap - len(lane.rewrite.written) - 1))
        return min(k, lane.step.cap - len(lane.step.tokens))

    def _position(self, lane: Lane) -> int:
        return lane.rewrite.position if lane.rewrite is not None else lane.step.length

    def _propose(self, limits: list[int], params: StepParams) -> torch.Tensor:
        """[the most any lane takes, draft slots] tokens on the device: the first from the logits the draft holds,
        one decode forward each after."""
        runner = self.draft.runner
        slots = runner.slots
        first = choose(self.logits, params, self._draws(0, self.logits.shape[0]))
        chosen = [torch.nn.functional.pad(first, (0, slots - first.shape[0]))]
        with self.spec._timed("draft", max(limits) - 1):
            for j in range(1, max(limits)):
                logits = runner.decode(chosen[-1])
                chosen.append(choose(logits, params, self._draws(j, slots)))
                for lane, limit in zip(self.lanes, limits, strict=True):
                    if j < limit:  # a forward this lane's own tokens needed (others ride on it)
                        self._count_draft(lane, lane.held, 1)
                    lane.held += 1
        return torch.stack(chosen)

    def _draws(self, ahead: int, size: int) -> list[Draw | None]:
        draws: list[Draw | None] = [None] * size
        for lane in self.lanes:
            if lane.slot < size and not lane.done:
                draws[lane.slot] = (lane.key, self._position(lane) + ahead)
        return draws

    def _verify(self, table: torch.Tensor, k: int, limits: list[int], params: StepParams) -> Iteration:
        """The target's verification of the rewriting lanes' proposals, then the one wait: everything on the host."""
        read = Iteration()
        slots = self.draft.runner.slots
        by_lane = dict(zip((lane.slot for lane in self.lanes), limits, strict=True))
        if self.rewriting:
            rewrites = [lane.rewrite for lane in self.rewriting]
            rewrite_limits = [by_lane[lane.slot] for lane in self.rewriting]
            logits, starts, fed, draws = self.spec._verify(rewrites, table, k, rewrite_limits)
            choices = choose(logits, params, draws)
            flat = torch.cat([choices, table.flatten()]).tolist()
            chosen, table_read = flat[: len(draws)], flat[len(draws) :]
            self.spec._price_draft()
            for lane, start, count in zip(self.rewriting, starts, fed, strict=True):
                limit = by_lane[lane.slot]
                read.owns.append(chosen[start : start + 1 + limit])
                lane.rewrite.target_held += count
        else:
            table_read = table.flatten().tolist()
        for lane, limit in zip(self.lanes, limits, strict=True):
            read.tokens.append([table_read[j * slots + lane.slot] for j in range(limit)])
        return read

    # -- the host's verdicts -----------------------------------------------------------------------------------------
    def _take_draft_tokens(self, read: Iteration, limits: list[int], params: StepParams) -> list[Lane]:
        """Drafting lanes append their tokens up to their step's end; returns the lanes whose step ended."""
        ended = []
        for lane, tokens in zip(self.lanes, read.tokens, strict=True):
            if lane.rewrite is not None or lane.done:
                continue
            step = lane.step
            before = len(step.tokens)
            step.tokens += tokens
            stays, stop = self.draft.stop_rule.first_stop(step.tokens, before, step.cap, params.delimiter)
            del step.tokens[stays:]
            step.stop = stop
            lane.consistent = len(step.prefix) + len(step.tokens) - 1  # all but the last, which heads the next feed
            if stop is not None:
                ended.append(lane)
        return ended

    def _take_verdicts(self, read: Iteration, params: StepParams) -> None:
        """Rewriting lanes keep what the target agrees with; those whose step ended commit it and draft on."""
        if not self.rewriting:
            return
        tokens = {lane.slot: t for lane, t in zip(self.lanes, read.tokens, strict=True)}
        for lane, own in zip(self.rewriting, read.owns, strict=True):
            self.spec._judge(lane.rewrite, tokens[lane.slot], own, params)
            lane.consistent = lane.rewrite.draft_consistent
        self.spec._roll_target_back([lane.rewrite for lane in self.rewriting])
        self._end_rewrites()

    def _end_rewrites(self) -> None:
        """Lanes whose rewrite ended leave the target's arena, commit it and start their next step."""
        finished = [lane for lane in self.rewriting if lane.rewrite.stop is not None]
        if not finished:
            return
        for lane in finished:
            row = lane.rewrite
            self.target.leave(row.target, row.target_slot, [*row.prefix, *row.written[:-1]])
            out = self.spec._output(row)
            record_generation(lane.traj, "target", self.spec, out, lane.target_seconds)
            commit_rsd_step(lane.traj, lane.proposal, lane.reward, out)
            lane.consistent = min(lane.consistent, row.position)
            self._next_step(lane)
        going_on = [lane for lane in self.rewriting if lane.rewrite is not None]
        if going_on and self.target.runner.keep([lane.rewrite.target_slot for lane in going_on]) is not None:
            for slot, lane in enumerate(going_on):
                lane.rewrite.target_slot = slot
        self.rewriting = going_on

    def _next_step(self, lane: Lane) -> None:
        lane.rewrite = None
        self._start_step(lane)

    def _score(self, ended: list[Lane], params: StepParams) -> None:
        """The PRM over the lanes whose draft step ended; kept steps are committed, rejected ones rewritten."""
        if not ended:
            return
        outputs = [self.draft.output(lane.step) for lane in ended]
        requests = [self.reward_request(lane.traj, out.text) for lane, out in zip(ended, outputs, strict=True)]
        started = time.perf_counter()
        scored = self.reward_model.score_steps(requests)
        share = (time.perf_counter() - started) / len(ended)
        rejected = []
        for lane, out, score in zip(ended, outputs, scored, strict=True):
            record_scoring(lane.traj.stats, self.reward_model, score, share)
            record_generation(lane.traj, "draft", self.proposer, out, lane.draft_seconds)
            if self.decide(lane.traj, score.reward):
                commit_rsd_step(lane.traj, out, score.reward, None)
                self._next_step(lane)
            else:
                lane.proposal, lane.reward = out, score.reward
                rejected.append(lane)
        if rejected:
            self._open_target(rejected, params)

    def _open_target(self, new: list[Lane], params: StepParams) -> None:
        """The target's arena opened again over the lanes rewriting and `new` ones: one forward reads each new lane's
        uncached prefix and its rejected step (keeping what the target would have written of it) and gives each lane
        already rewriting its next token."""
        started = time.perf_counter()
        going_on = self.rewriting
        self.spec._roll_target_back([lane.rewrite for lane in going_on])
        for lane in going_on:
            row = lane.rewrite
            self.target.leave(row.target, row.target_slot, [*row.prefix, *row.written[:-1]])
        for lane in new:
            request = self.step_request(self.fallback, lane.traj, lane.proposal)
            lane.rewrite = Rewrite(0, request, Row(0, request))
            lane.rewrite.proposal = list(request.proposal[: request.max_tokens - 1])
        lanes = [*going_on, *new]
        rows = [
            Row(0, StepRequest(lane.key, [*lane.rewrite.prefix, *lane.rewrite.written], 1)) if lane in going_on
            else lane.rewrite.target
            for lane in lanes
        ]  # fmt: skip
        appended = [[] if lane in going_on else lane.rewrite.proposal for lane in lanes]
        room = max(lane.rewrite.cap for lane in lanes) + MAX_K + 2
        logits = self.target.open(rows, room, appended)
        draws: list[Draw | None] = []
        for lane, extra in zip(lanes, appended, strict=True):
            draws += [(lane.key, lane.rewrite.position + j) for j in range(1 + len(extra))]
        choices = choose(logits, params, draws).tolist()
        first = 0
        for slot, (lane, row, extra) in enumerate(zip(lanes, rows, appended, strict=True)):
            own = choices[first : first + 1 + len(extra)]
            first += len(own)
            rewrite = lane.rewrite
            rewrite.target_slot, rewrite.target_held = slot, len(extra)
            if lane in going_on:  # it ran the token it would have fed first next round: its next own token follows
                rewrite.target.context_sum += row.context_sum
                rewrite.target.forwards += 1
                rewrite.run_after_prefix += 1
                rewrite.target_held = len(rewrite.written)
                self.spec._accept(rewrite, [], own, params)
                continue
            rewrite.draft_slot = lane.slot
            kept = self.spec._accept(rewrite, rewrite.proposal, own, params)
            rewrite.speculation.proposal_tokens += len(rewrite.proposal)
            rewrite.speculation.from_proposal += kept
            rewrite.speculation.rounds += 1
            fed = len(lane.step.tokens) - 1  # the draft fed its step but the last token
            lane.consistent = len(rewrite.prefix) + min(kept, fed)
        self.rewriting = lanes
        self.spec._roll_target_back([lane.rewrite for lane in lanes])
        seconds = time.perf_counter() - started
        for lane in lanes:
            lane.target_seconds += seconds / len(lanes)
        self._end_rewrites()

    # -- the draft catches up ------------------------------------------------------------------------------------------
    def _catch_up(self) -> None:
        """Every lane rolled back to what it shares with its trajectory, then fed the rest in one forward; lanes
        that are done stay idle until the arena opens again."""
        if any(lane.done for lane in self.lanes):
            return  # the arena opens again next (`run`), which feeds every lane what it lacks
        runner = self.draft.runner
        for lane in self.lanes:
            lane.consistent = min(lane.consistent, len(lane.ids()) - 1)  # the last id is always fed
        runner.rollback(self._rollback_counts(self.lanes, lambda lane: lane.consistent))
        feeds = [[0] for _ in range(runner.slots)]
        for lane in self.lanes:
            lane.held = lane.consistent
            if lane.rewrite is None and not lane.step.tokens:  # what it feeds of the step's prefix: its prefill
                lane.step.reused = lane.held
            feed = lane.ids()[lane.held :]
            feeds[lane.slot] = feed
            self._count_draft(lane, lane.held, len(feed))
            lane.held += len(feed)
        with self.spec._timed("draft", 1):
            self.logits = runner.feed_last(feeds)
        self._park_idle()

    def _park_idle(self) -> None:
        """Slots of either arena's bucket that hold no lane start their columns over: every forward feeds them, and
        they must not outgrow the arena."""
        for runner, taken in ((self.draft.runner, {lane.slot for lane in self.lanes}),
                              (self.target.runner, {lane.rewrite.target_slot for lane in self.rewriting})):  # fmt: skip
            if not taken and runner is self.target.runner:
                continue  # the target's arena holds no call until a rewrite opens it again
            idle = [slot for slot in range(runner.slots) if slot not in taken]
            if idle:
                runner.park(idle)

    def _rollback_counts(self, lanes: list[Lane], keep: Callable[[Lane], int]) -> list[int]:
        counts = [0] * self.draft.runner.slots
        for lane in lanes:
            counts[lane.slot] = lane.held - keep(lane)
            if counts[lane.slot] < 0:
                raise AssertionError(f"continuous bookkeeping: lane {lane.key!r} holds {lane.held} < {keep(lane)}")
        return counts

    def _count_draft(self, lane: Lane, first: int, tokens: int) -> None:
        """Draft tokens run for the lane from position `first`: its step's, or its rewrite's proposals'."""
        if tokens < 1:
            return
        if lane.rewrite is not None:
            usage = lane.rewrite.speculation.draft
            usage.decode_tokens += tokens
            usage.calls += 1
            if lane.rewrite.draft is None:
                lane.rewrite.draft = Row(0, lane.rewrite.request)
            lane.rewrite.draft.count_run(first, tokens)
            return
        lane.step.count_run(first, tokens)
        lane.step.forwards += 1


def runs_continuously(rewriter: object, batch_size: int) -> bool:
    """Whether rows gain from moving each on its own (the "auto" schedule): speculative rewrites with the target on a
    GPU, where a forward costs nearly the same for a few rows as for many, and more than one row to share them. (One
    row alone runs the same forwards either way, and lock-step stops drafting at the step's end, where an iteration
    runs its MAX_K draft forwards.)"""
    on_gpu = isinstance(rewriter, SpeculativeStepGenerator) and rewriter.target.runner.device.type == "cuda"
    return on_gpu and batch_size > 1
