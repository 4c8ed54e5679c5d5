"""Token-level speculation on a CUDA GPU, where the rounds run as CUDA graphs (the target's verification, the draft's
decodes and its two-token catch-up) and the draft's price is measured on the forwards the rounds run. Skipped
without a GPU; `tests/test_speculative.py` covers the same generator on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_layout_lm, make_tokenizer  # noqa: E402

from rsd.backends.hf import HFStepGenerator  # noqa: E402
from rsd.core import StepParams, StepRequest  # noqa: E402
from rsd.speculative import MAX_K, MIN_DRAFT_PRICE, SpeculativeStepGenerator  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = ["Let x be the number", "What is 12 - 5?", "A train travels 60 miles per hour for", "Step 1:", "So"]


def generators(tokenizer) -> tuple[HFStepGenerator, HFStepGenerator, HFStepGenerator]:
    """A target, a draft that agrees part of the time (the target with a perturbed LM head, half as deep) and a
    twin of the target (its own caches), float32 on the GPU so that the rounds' forwards and the target's own
    decode choose the same tokens."""
    target = make_layout_lm("qwen2", tokenizer, num_hidden_layers=4).to("cuda")
    draft = make_layout_lm("qwen2", tokenizer, num_hidden_layers=2)
    with torch.no_grad():
        draft.load_state_dict(target.state_dict(), strict=False)
        noise = torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(5))
        draft.lm_head.weight.add_(0.3 * draft.lm_head.weight.std() * noise)
    draft = draft.to("cuda")

    def generator(model, role: str) -> HFStepGenerator:
        return HFStepGenerator.from_model(model, tokenizer, role=role)

    return generator(target, "target"), generator(draft, "draft"), generator(target, "target")


def test_speculative_steps_on_a_gpu_are_the_targets_and_price_the_draft_by_its_forwards():
    tokenizer = make_tokenizer()
    target, draft, twin = generators(tokenizer)
    speculative = SpeculativeStepGenerator(target, draft)
    by_size = speculative.draft_price
    assert speculative.times is not None and by_size == pytest.approx(draft.cost.parameters / target.cost.parameters)
    params = StepParams(delimiter="\x00")
    prefixes = {f"r{i}": target.encode(p) for i, p in enumerate(PROMPTS)}
    for _ in range(3):  # calls whose rows need one or two catch-up tokens, some rows leaving early
        requests = [StepRequest(k, p, 12 + 5 * i) for i, (k, p) in enumerate(prefixes.items())]
        got = speculative.generate_steps(requests, params)
        want = twin.generate_steps(requests, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        prefixes = {r.key: [*r.prefix_ids, *o.token_ids] for r, o in zip(requests, got, strict=True)}
    times = speculative.times
    assert times.samples["draft"] and times.samples["target"] and not times.pending
    measured = times.draft_price()
    assert measured is not None and speculative.draft_price == max(MIN_DRAFT_PRICE, measured)
    assert sum(o.speculation.from_draft for o in got) > 0


class RecordingRounds(SpeculativeStepGenerator):
    """The generator, noting each k its rounds chose."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chosen: set[int] = set()

    def round_size(self, *keys, **kwargs) -> int:
        k = super().round_size(*keys, **kwargs)
        self.chosen.add(k)
        return k


def test_a_steps_end_keeps_the_verification_shape():
    """Steps shorter than k end with less room than k: their rounds keep k (the draft proposes what the room takes)
    and verify 1 + k tokens a slot, padded, so the target captures one verification graph per (k, rows, width), not
    one per room a step's end leaves. Every proposed token kept and the draft's price fixed: k is MAX_K throughout."""
    tokenizer = make_tokenizer()
    # Half precision: where verifications run as graphs (float32 runs them as eager forwards, of each row's tokens).
    target, draft = (
        HFStepGenerator.from_model(make_layout_lm("qwen2", tokenizer, num_hidden_layers=layers).to("cuda").half(),
                                   tokenizer, role=role)
        for layers, role in ((4, "target"), (2, "draft"))
    )  # fmt: skip
    speculative = RecordingRounds(target, draft, accept=lambda proposal, choices, start: len(proposal))
    speculative.times, speculative.draft_price = None, 0.15
    params = StepParams(delimiter="\x00")
    prefixes = {f"r{i}": target.encode(p) for i, p in enumerate(PROMPTS)}
    for key in prefixes:  # measured near 1 already, as every round will measure it: k starts at MAX_K
        speculative.tallies[key], speculative.acceptance[key] = (99.0, 100.0), 0.99
    for cap in (40, 3, 4, 5, 7, 9, 11):
        requests = [StepRequest(k, p, cap) for k, p in prefixes.items()]
        got = speculative.generate_steps(requests, params)
        assert all(len(o.token_ids) <= cap for o in got)
        prefixes = {r.key: [*r.prefix_ids, *o.token_ids] for r, o in zip(requests, got, strict=True)}
    assert speculative.chosen == {MAX_K}
    graphs = speculative.target.runner._graphs
    assert {tokens for tokens, _rows, _width, _kernels, last_only in graphs if tokens > 1 and not last_only} == {
        1 + MAX_K
    }
