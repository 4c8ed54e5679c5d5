"""Where the trajectories of requests are decoded, batched across requests.

- In-process models (`StepScheduler`): one worker thread owns the models (never two threads on them) and loops:
  admit waiting trajectories up to `max_concurrency`, advance every trajectory in flight by one step
  (`StepwiseDecoder.advance`: one batched call per model for all of them, whichever request they belong to), hand
  each trajectory's new steps to its request, release the finished and the cancelled. A trajectory joins at the next
  step and leaves when it ends: continuous batching at the step. No request waits for another's whole answer.
- Served models (`AsyncEngine`): each trajectory is a task on the server's event loop
  (`AsyncStepwiseDecoder.solve`); the model servers batch the requests as they come.

Both hand a request its trajectory's life as events on an asyncio queue of the request's own loop: a `StepEvent`
per committed step, then one `EndEvent`. Results never depend on what else is in flight: decisions and sampling
are seeded by (seed, trajectory key, position), and each trajectory's key names only the request's seed and its
choice index (`TrajectoryKey`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from rsd.async_loop import AsyncStepwiseDecoder
from rsd.core import Prompted, Step, Trajectory
from rsd.loop import StepwiseDecoder

log = logging.getLogger("rsd.serve")


class TrajectoryKey:
    """A trajectory's key: unique by identity, so every backend keeps its caches apart, and written as its name,
    which is what seeds its draws (`repr` and `str`). The name is the request's seed and the choice index: the same
    request gives the same answer alone or among any others."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


@dataclass(frozen=True)
class StepEvent:
    index: int  # the choice
    step: Step  # committed: never changed afterwards


@dataclass(frozen=True)
class EndEvent:
    index: int
    reason: str  # the trajectory's finish_reason, or why it was stopped: "timeout", "stop", "disconnect", "error"
    stats: dict
    error: str | None = None


class QueueFull(Exception):
    """More trajectories than the server decodes at once plus those it lets wait."""


class Job:
    """One trajectory of one request. Events go to the request's queue on the request's event loop."""

    def __init__(self, index: int, traj: Trajectory, events: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.traj = traj
        self.events = events
        self.loop = loop
        self.cancel_reason: str | None = None
        self.ended = False

    def deliver(self, event: StepEvent | EndEvent) -> None:
        # A closed loop: the server stopped, and nobody waits for this any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def step(self, step: Step) -> None:
        self.deliver(StepEvent(self.index, step))

    def end(self, reason: str, error: str | None, observer: Callable[[dict], None] | None) -> None:
        """Hand the request its trajectory's end; `observer` sees the statistics even when nobody waits any more."""
        if not self.ended:
            self.ended = True
            stats = self.traj.stats.to_dict()
            if observer is not None:
                observer(stats)
            self.deliver(EndEvent(self.index, reason, stats, error))


class Engine(Protocol):
    max_concurrency: int
    max_queue: int
    on_round: Callable[[int], None] | None  # sees how many trajectories each batched round advanced
    on_end: Callable[[dict], None] | None  # sees each trajectory's statistics when it ends

    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...

    def start(self, problem: Prompted) -> Trajectory: ...

    def submit(self, jobs: Sequence[Job]) -> None: ...

    def cancel(self, job: Job, reason: str) -> None: ...

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...


def make_engine(decoder: StepwiseDecoder, max_concurrency: int, max_queue: int) -> Engine:
    if isinstance(decoder, AsyncStepwiseDecoder):
        return AsyncEngine(decoder, max_concurrency, max_queue)
    return StepScheduler(decoder, max_concurrency, max_queue)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class StepScheduler:
    """In-process models: one worker thread, one step of every trajectory in flight per round."""

    def __init__(self, decoder: StepwiseDecoder, max_concurrency: int, max_queue: int) -> None:
        self.decoder = decoder
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.on_round: Callable[[int], None] | None = None
        self.on_end: Callable[[dict], None] | None = None

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def start(self, problem: Prompted) -> Trajectory:
        return self.decoder.start(problem)

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._cond:
            free = max(0, self.max_concurrency - len(self._active))
            if self._stopping or len(self._waiting) + len(jobs) > free + self.max_queue:
                raise QueueFull
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a trajectory at its next step boundary; its request gets its `EndEvent` then."""
        with self._cond:
            if job.cancel_reason is None:
                job.cancel_reason = reason
            self._cond.notify()

    async def startup(self) -> None:
        self._thread = threading.Thread(target=self._work, name="rsd-scheduler", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """End whatever is still in flight (the drain is over) and stop the worker."""
        with self._cond:
            self._stopping = True
            for job in [*self._waiting, *self._active]:
                job.cancel_reason = job.cancel_reason or "shutdown"
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- the worker thread ------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._round(batch)

    def _next_batch(self) -> list[Job] | None:
        """The trajectories of the next round, admitting waiting ones into free slots; None once stopped and idle."""
        with self._cond:
            while True:
                for job in [j for j in self._waiting if j.cancel_reason]:
                    self._waiting.remove(job)
                    job.end(job.cancel_reason, None, self.on_end)
                while self._waiting and len(self._active) < self.max_concurrency:
                    self._active.append(self._waiting.popleft())
                if self._active:
                    return list(self._active)
                if self._stopping:
                    return None
                self._cond.wait()

    def _round(self, batch: list[Job]) -> None:
        for job in batch:
            if job.cancel_reason:
                self._leave(job, job.cancel_reason)
        live = [job for job in batch if not job.ended]
        committed = [len(job.traj.steps) for job in live]
        if self.on_round is not None and live:
            self.on_round(len(live))
        try:
            self.decoder.advance([job.traj for job in live])
        except Exception as exc:  # a model failed: these requests fail, the server goes on
            log.exception("a batched step failed; its %d trajectories end with an error", len(live))
            for job in live:
                self._leave(job, "error", describe(exc))
            return
        for job, count in zip(live, committed, strict=True):
            for step in job.traj.steps[count:]:
                job.step(step)
            if job.traj.finished:
                self._leave(job, job.traj.finish_reason or "eos")

    def _leave(self, job: Job, reason: str, error: str | None = None) -> None:
        try:
            self.decoder.release(job.traj)
        except Exception:  # a cache that cannot be freed must not stop the worker
            log.exception("releasing a trajectory's caches failed")
        with self._cond:
            self._active.remove(job)
        job.end(reason, error, self.on_end)


class AsyncEngine:
    """Served models: a task per trajectory on the server's event loop, at most `max_concurrency` at once."""

    def __init__(self, decoder: AsyncStepwiseDecoder, max_concurrency: int, max_queue: int) -> None:
        self.decoder = decoder
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self._tasks: dict[Job, asyncio.Task] = {}
        self._running = 0
        self._stopping = False
        self.on_round = None  # no rounds: each trajectory moves on its own
        self.on_end: Callable[[dict], None] | None = None

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._tasks) - self._running

    def start(self, problem: Prompted) -> Trajectory:
        return self.decoder.start(problem)

    def submit(self, jobs: Sequence[Job]) -> None:
        if self._stopping or len(self._tasks) + len(jobs) > self.max_concurrency + self.max_queue:
            raise QueueFull
        for job in jobs:
            self._tasks[job] = asyncio.get_running_loop().create_task(self._solve(job))

    def cancel(self, job: Job, reason: str) -> None:
        task = self._tasks.get(job)
        if task is not None and job.cancel_reason is None:
            job.cancel_reason = reason
            task.cancel()

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        self._stopping = True
        for job in list(self._tasks):
            self.cancel(job, "shutdown")
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.decoder.aclose()

    async def _solve(self, job: Job) -> None:
        reason, error = "cancelled", None
        try:
            async with self._slots:
                self._running += 1
                try:
                    await self.decoder.solve(job.traj, job.step)
                finally:
                    self._running -= 1
            reason = job.traj.finish_reason or "eos"
        except asyncio.CancelledError:
            reason = job.cancel_reason or "cancelled"
        except Exception as exc:  # a server failed for good (retries spent): this request fails, the server goes on
            log.warning("a trajectory failed: %s", describe(exc))
            reason, error = "error", describe(exc)
        finally:
            self._tasks.pop(job, None)
        job.end(reason, error, self.on_end)
