"""The asynchronous controller: every trajectory advances the moment its own step is done.

`StepwiseDecoder` (loop.py) advances a batch in rounds: all drafts, then all rewards, then all rewrites, and the
round waits for its slowest member. Against servers that batch continuously (vLLM, SGLang) rounds waste time: a
trajectory whose draft step was short sits idle while another's runs on. Here each trajectory is its own task:

    draft step -> PRM reward -> decide -> (target rewrite) -> commit -> next step

and up to `config.batch_size` trajectories are in flight at once; the servers see a steady stream of requests and
batch them as they come. The bookkeeping of a step (decision draw, statistics, end of a trajectory) is the same
code as the lock-step controller's, so both give the same trajectories for the same models and seeds.

Backends with asynchronous methods (`agenerate_step`, `ascore`: the served ones) are awaited directly; others (an
in-process model, a Python callable) run one request at a time on a worker thread, so any mix works.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from rsd.controller import (
    Controller,
    commit_rsd_step,
    commit_single_model_step,
    record_generation,
    record_scoring,
)
from rsd.core import Prompted, RewardOutput, RSDError, StepGenerator, StepOutput, Trajectory


class AsyncStepwiseDecoder(Controller):
    """Same roles and results as `rsd.loop.StepwiseDecoder`, without rounds.

    - RSD: proposer = draft, reward_model = PRM, policy = weighting function, fallback = target.
    - draft-only / target-only: proposer alone; every step is kept.
    Per-model wall time in the statistics is each request's own latency; requests overlap, so the sum over a run
    exceeds the run's wall time.
    """

    _in_process: asyncio.Lock  # one at a time for in-process models, made by each run (it belongs to one event loop)

    # -- entry points -----------------------------------------------------------------------------------------
    def run(
        self,
        problems: Sequence[Prompted],
        on_finish: Callable[[Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        """Decode every problem; `on_finish` sees each trajectory the moment it ends (to save it at once)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(problems, on_finish))
        from rsd.backends.openai import run_sync  # inside a running loop (a notebook): use the helper thread

        return run_sync(self.arun(problems, on_finish))

    async def arun(
        self,
        problems: Sequence[Prompted],
        on_finish: Callable[[Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        trajectories = [self.start(p) for p in problems]  # checks every problem before any request goes out
        slots = asyncio.Semaphore(self.config.batch_size)
        self._in_process = asyncio.Lock()
        try:
            async with asyncio.TaskGroup() as group:
                for traj in trajectories:
                    group.create_task(self._solve(traj, slots, on_finish))
        except* RSDError as errors:
            raise errors.exceptions[0] from None  # the first problem, as one clear message
        finally:
            await self._close_backends()
        return trajectories

    # -- one trajectory -----------------------------------------------------------------------------------------
    async def _solve(
        self, traj: Trajectory, slots: asyncio.Semaphore, on_finish: Callable[[Trajectory], None] | None
    ) -> None:
        async with slots:
            while not traj.finished:
                await self._advance(traj)
            self.release(traj)
        if on_finish is not None:
            on_finish(traj)

    async def _advance(self, traj: Trajectory) -> None:
        if any(self.room(g, traj) < 1 for g in self.generators):
            traj.finish("context")
            return
        proposal = await self._generate(self.proposer, self.proposer_role, traj)
        if self.reward_model is None:
            commit_single_model_step(traj, proposal, self.proposer_role)
            return
        reward = await self._score(traj, proposal)
        rewrite = None if self.decide(traj, reward) else await self._generate(self.fallback, "target", traj, proposal)
        commit_rsd_step(traj, proposal, reward, rewrite)

    # -- model calls, with their accounting ------------------------------------------------------------------------
    async def _generate(
        self, generator: StepGenerator, role: str, traj: Trajectory, proposal: StepOutput | None = None
    ) -> StepOutput:
        request = self.step_request(generator, traj, proposal)
        params = traj.config.step_params()
        start = time.perf_counter()
        out = await self._call(generator, "agenerate_step", "generate_steps", request, params)
        record_generation(traj, role, generator, out, time.perf_counter() - start)
        return out

    async def _score(self, traj: Trajectory, proposal: StepOutput) -> float:
        request = self.reward_request(traj, proposal.text)
        start = time.perf_counter()
        out: RewardOutput = await self._call(self.reward_model, "ascore", "score_steps", request)
        record_scoring(traj.stats, self.reward_model, out, time.perf_counter() - start)
        return out.reward

    async def _call(self, backend: Any, async_name: str, batch_name: str, request: Any, *args: Any) -> Any:
        """Await the backend's asynchronous method, or run its batch method for this one request on a thread (one
        call at a time over all in-process models: they are not safe to call from two threads, and a speculative
        target drives the draft's model too)."""
        method = getattr(backend, async_name, None)
        if method is not None:
            return await method(request, *args)
        async with self._in_process:
            [out] = await asyncio.to_thread(getattr(backend, batch_name), [request], *args)
        return out

    async def _close_backends(self) -> None:
        for backend in {id(b): b for b in (self.proposer, self.fallback, self.reward_model) if b}.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()
