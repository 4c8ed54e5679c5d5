"""The controller hands the target the kept steps as cache-only requests when the target rides them along
(`StepRequest.cache_only`): the same trajectories and the same counts and FLOPs, but the target's later steps start
from prefixes it already holds. Runs the shipped tiny world's real models on the static decode path."""

from __future__ import annotations

import pytest

from rsd.api import RSD
from rsd.backends.hf import HFStepGenerator
from rsd.backends.kv import common_prefix_length
from rsd.core import StepOutput, StepParams, StepRequest, TrajectoryStats
from rsd.eval.harness import default_tinyworld_model
from rsd.loop import RunConfig
from rsd.tinyworld.task import make_problems


class CountingTarget:
    """The target, with a record of every request it is sent (the real generator does the work)."""

    def __init__(self, inner: HFStepGenerator) -> None:
        self.inner = inner
        self.name, self.cost = inner.name, inner.cost
        self.requests: list[StepRequest] = []
        self.outputs: list[StepOutput] = []
        self.uncached = 0  # prefix tokens of step-writing requests that the target did not hold when asked

    @property
    def rides_along(self) -> bool:
        return self.inner.rides_along

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def vocabulary_fingerprint(self) -> str:
        return self.inner.vocabulary_fingerprint()

    def generate_steps(self, requests, params: StepParams):
        for request in requests:
            held = self.inner._caches.get(request.key)
            if not request.cache_only:
                shared = common_prefix_length(held.ids, request.prefix_ids) if held is not None else 0
                self.uncached += len(request.prefix_ids) - shared
        outputs = self.inner.generate_steps(requests, params)
        self.requests += requests
        self.outputs += outputs
        return outputs

    def release(self, keys) -> None:
        self.inner.release(keys)


@pytest.fixture(scope="module")
def models():
    def generator(role: str) -> HFStepGenerator:
        return HFStepGenerator(default_tinyworld_model(role), role=role, device="cpu", decode="static")

    return generator("draft"), generator("target"), default_tinyworld_model("prm")


def run(models, ride: bool) -> tuple[list, TrajectoryStats, CountingTarget]:
    draft, target, prm = models
    target.ride_along = ride
    counting = CountingTarget(target)
    rsd = RSD(draft, counting, prm, delta=0.9, device="cpu", config=RunConfig(batch_size=8))
    trajectories = rsd.generate([p.question for p in make_problems("test", 16, seed=5)])
    total = TrajectoryStats()
    for traj in trajectories:
        total.add(traj.stats)
    return trajectories, total, counting


def test_riding_the_kept_steps_changes_no_step_and_no_count(models):
    plain, plain_total, plain_target = run(models, ride=False)
    riding, riding_total, riding_target = run(models, ride=True)
    assert [t.text for t in riding] == [t.text for t in plain]
    assert [[s.source for s in t.steps] for t in riding] == [[s.source for s in t.steps] for t in plain]
    assert not any(r.cache_only for r in plain_target.requests)
    riders = [r for r in riding_target.requests if r.cache_only]
    assert riders and all(r.max_tokens == 0 for r in riders)
    # What the target ran for a rider counts in the step that needed it: tokens and FLOPs as without riding.
    for role in ("draft", "target", "prm"):
        usage, without = riding_total.models[role], plain_total.models[role]
        assert (usage.prefill_tokens, usage.decode_tokens, usage.calls) == (
            without.prefill_tokens,
            without.decode_tokens,
            without.calls,
        )
        assert usage.flops == pytest.approx(without.flops)
    assert riding_total.models["target"].calls == riding_total.steps_rejected
    # The steps the target writes start from longer prefixes it already holds.
    assert riding_target.uncached < plain_target.uncached
