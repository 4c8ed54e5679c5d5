"""The controller hands the target the kept steps as cache-only requests when the target rides them along
(`StepRequest.cache_only`): the same trajectories, fewer tokens left for the target's later prefills, and the
tokens ridden counted as the target's work. Runs the shipped tiny world's real models on the static decode path."""

from __future__ import annotations

import pytest

from rsd.api import RSD
from rsd.backends.hf import HFStepGenerator
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

    @property
    def rides_along(self) -> bool:
        return self.inner.rides_along

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def vocabulary_fingerprint(self) -> str:
        return self.inner.vocabulary_fingerprint()

    def generate_steps(self, requests, params: StepParams):
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


def test_riding_the_kept_steps_changes_no_step_and_counts_its_tokens(models):
    plain, plain_total, plain_target = run(models, ride=False)
    riding, riding_total, riding_target = run(models, ride=True)
    assert [t.text for t in riding] == [t.text for t in plain]
    assert [[s.source for s in t.steps] for t in riding] == [[s.source for s in t.steps] for t in plain]
    assert not any(r.cache_only for r in plain_target.requests)
    riders = [r for r in riding_target.requests if r.cache_only]
    assert riders and all(r.max_tokens == 0 for r in riders)
    # A rider is a trajectory that kept its step this round and goes on; calls count only the steps written.
    target = riding_total.models["target"]
    assert target.calls == plain_total.models["target"].calls == riding_total.steps_rejected
    assert target.decode_tokens == plain_total.models["target"].decode_tokens
    assert target.prefill_tokens > plain_total.models["target"].prefill_tokens
    assert target.flops > plain_total.models["target"].flops
    # The steps the target writes start from prefixes it mostly holds already.
    assert written_prefill(riding_target) < written_prefill(plain_target)


def written_prefill(target: CountingTarget) -> int:
    """Prefill tokens of the calls' step-writing requests (cache-only ones left out)."""
    pairs = zip(target.requests, target.outputs, strict=True)
    return sum(out.prefill_tokens for request, out in pairs if not request.cache_only)
