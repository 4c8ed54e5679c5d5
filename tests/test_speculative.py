"""Token-level speculative decoding: lossless (greedy token for token, sampled in distribution); its counts add up."""

import collections
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from rsd.core import ModelCost, RSDError, StopReason
from rsd.loop import Prompted, RunConfig, StepwiseDecoder
from rsd.speculative import SpeculativeDecoder, accept_sampled, draw

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_qwen2_lm, make_tokenizer  # noqa: E402

PROMPT = "Tom has 3 apples and buys 4 more."


@dataclass
class LoadedLM:
    """The attributes `SpeculativeDecoder` reads, as `rsd.backends.hf.HFStepGenerator` will provide them."""

    model: Any
    tokenizer: Any
    eos_token_ids: Any
    cost: ModelCost
    device: str = "cpu"


def load_lm(path: Path, tokenizer, lm_head_noise: float = 0.0) -> LoadedLM:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if lm_head_noise:
        # A draft that agrees with the target part of the time: the target's weights, its output layer perturbed.
        weight = model.lm_head.weight
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            weight.add_(lm_head_noise * weight.std() * noise)
    config = model.config
    parameters = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    cost = ModelCost(parameters, config.num_hidden_layers, config.num_attention_heads * config.head_dim)
    return LoadedLM(model, tokenizer, {tokenizer.eos_token_id}, cost)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run fastest on one thread, and the machine is shared with other test runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tokenizer = make_tokenizer()
    root = tmp_path_factory.mktemp("speculative")
    target_path = make_qwen2_lm(root / "target", tokenizer, seed=1)
    other_path = make_qwen2_lm(root / "other", tokenizer, seed=2)
    return {
        "tokenizer": tokenizer,
        "target": load_lm(target_path, tokenizer),
        "other": load_lm(other_path, tokenizer),  # an unrelated random model: acceptance near 0
        "close": load_lm(target_path, tokenizer, lm_head_noise=0.5),  # agrees with the target most of the time
    }


def prompt_ids(lm: LoadedLM, text: str = PROMPT) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def plain_greedy(lm: LoadedLM, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """The target alone, the simplest way: re-read the whole sequence for every token, no cache."""
    seq = list(ids)
    while len(seq) - len(ids) < max_new_tokens:
        seq.append(int(lm.model(torch.tensor([seq], device=lm.device)).logits[0, -1].argmax()))
        if seq[-1] in eos:
            break
    return seq[len(ids) :]


def decode_one(draft: LoadedLM, target: LoadedLM, config: RunConfig, k: int, key: Any = 0):
    [traj] = SpeculativeDecoder(draft, target, config, k=k).run([Prompted(key, "a question", PROMPT)])
    return traj


# -- greedy: the target's own output, token for token ---------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft_name", ["other", "target", "close"])
def test_greedy_output_is_the_targets_greedy_output(models, draft_name, k):
    target, draft = models["target"], models[draft_name]
    config = RunConfig(max_new_tokens=24, max_steps=1000)
    traj = decode_one(draft, target, config, k)
    assert traj.generated_ids == plain_greedy(target, prompt_ids(target), 24, target.eos_token_ids)
    assert traj.finish_reason == "max_new_tokens"
    assert all(step.source == "target" and step.kept and step.reward is None for step in traj.steps)
    rate = traj.speculative.token_acceptance_rate
    if draft_name == "target":
        assert rate == 1.0
        assert traj.speculative.rounds == -(-24 // (k + 1))  # every round writes k + 1 tokens
    elif draft_name == "other":
        assert rate < 0.2


def test_greedy_stops_at_eos_like_the_target(models):
    target = models["target"]
    reference = plain_greedy(target, prompt_ids(target), 30, set())
    # The random target never writes the real EOS; declare a token it writes at position 9 to be one.
    eos_token = reference[9]
    first = reference.index(eos_token)
    for draft in (models["close"], target):
        eos_target = LoadedLM(target.model, target.tokenizer, {eos_token}, target.cost)
        eos_draft = LoadedLM(draft.model, draft.tokenizer, {eos_token}, draft.cost)
        traj = decode_one(eos_draft, eos_target, RunConfig(max_new_tokens=30, max_steps=1000), k=4)
        assert traj.generated_ids == reference[: first + 1]
        assert traj.finish_reason == "eos"
        assert traj.steps[-1].stop is StopReason.EOS


def test_steps_split_at_the_delimiter_and_end_at_max_steps(models):
    target, tokenizer = models["target"], models["tokenizer"]
    reference = plain_greedy(target, prompt_ids(target), 60, set())
    # A character the random target writes often serves as the step delimiter.
    text = tokenizer.decode(reference)
    delimiter = max((c for c in set(text) if c.isalnum()), key=text.count)
    assert text.count(delimiter) >= 3
    config = RunConfig(delimiter=delimiter, max_new_tokens=60, max_steps=3, step_max_tokens=60)
    traj = decode_one(models["close"], target, config, k=4)
    assert traj.finish_reason == "max_steps"
    assert len(traj.steps) == 3
    assert traj.generated_ids == reference[: len(traj.generated_ids)]
    for step in traj.steps:
        # Each step ends at the first token whose text completes the delimiter.
        assert step.stop is StopReason.DELIMITER
        assert delimiter in tokenizer.decode(step.token_ids)
        assert delimiter not in tokenizer.decode(step.token_ids[:-1])
    # What the target had written past the last step was cut and counted as discarded, not as output.
    stats = traj.stats
    assert stats.draft_tokens_kept + stats.target_tokens == traj.num_generated_tokens


def test_steps_end_at_the_step_cap_and_the_budget(models):
    target = models["target"]
    config = RunConfig(delimiter="\n\n", max_new_tokens=23, max_steps=1000, step_max_tokens=5)
    traj = decode_one(models["close"], target, config, k=3)
    assert [len(s.token_ids) for s in traj.steps] == [5, 5, 5, 5, 3]
    assert all(s.stop is StopReason.LENGTH for s in traj.steps)
    assert traj.finish_reason == "max_new_tokens"
    assert traj.generated_ids == plain_greedy(target, prompt_ids(target), 23, target.eos_token_ids)


def test_greedy_matches_target_only_decoding_step_for_step(models):
    # The same trajectory as RSD's target-only baseline, cut into the same steps, from the transformers backend.
    hf = pytest.importorskip("rsd.backends.hf", reason="the transformers backend does not import: pip install -e .")
    tokenizer = models["tokenizer"]
    target = hf.HFStepGenerator.from_model(models["target"].model, tokenizer, role="target")
    draft = hf.HFStepGenerator.from_model(models["close"].model, tokenizer, role="draft")
    text = tokenizer.decode(plain_greedy(models["target"], prompt_ids(models["target"]), 40, set()))
    delimiter = max((c for c in set(text) if c.isalnum()), key=text.count)
    config = RunConfig(delimiter=delimiter, max_new_tokens=40, max_steps=1000, step_max_tokens=7)
    problems = [Prompted("p", "a question", PROMPT)]
    [baseline] = StepwiseDecoder(target, config, proposer_role="target").run(problems)
    [speculative] = SpeculativeDecoder(draft, target, config, k=4).run(problems)
    assert {StopReason.DELIMITER, StopReason.LENGTH} <= {s.stop for s in baseline.steps}
    assert [(s.token_ids, s.text, s.stop) for s in speculative.steps] == [
        (s.token_ids, s.text, s.stop) for s in baseline.steps
    ]
    assert speculative.finish_reason == baseline.finish_reason
    assert speculative.stats.target_tokens + speculative.stats.draft_tokens_kept == baseline.stats.target_tokens


# -- sampling: the target's distribution, whatever the draft ------------------------------------------------------
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
    degrees = cells - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2), torch.tensor(statistic / 2)))


def always_accept(proposal, draft_probs, target_probs, generator):
    """A wrong rule: keep every draft token (the output is then the draft's)."""
    n = len(proposal)
    return n, draw(target_probs[n], generator)


def resample_from_target(proposal, draft_probs, target_probs, generator):
    """A wrong rule: on rejection draw from p instead of norm(max(0, p - q)) (a classic bug)."""
    accepted, token = accept_sampled(proposal, draft_probs, target_probs, generator)
    if accepted < len(proposal):
        token = draw(target_probs[accepted], generator)
    return accepted, token


def test_sampling_rule_alone_reproduces_the_target_distribution():
    # A stand-in sequence model whose next-token distribution depends only on the position: then the output tokens
    # must come out independent, position j distributed as p[j], for any proposal distributions q.
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4], [0.0, 0.25, 0.25, 0.5]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.4, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    expected = {(a, b, c): float(p[0, a] * p[1, b] * p[2, c]) for a in range(4) for b in range(4) for c in range(4)}

    def generate(rule, generator: torch.Generator, k: int = 2) -> tuple[int, ...]:
        out: list[int] = []
        while len(out) < len(p):
            pos, n = len(out), min(k, len(p) - len(out) - 1)
            proposal = [draw(q[pos + i], generator) for i in range(n)]
            accepted, token = rule(
                torch.tensor(proposal, dtype=torch.long), q[pos : pos + n], p[pos : pos + n + 1], generator
            )
            out += [*proposal[:accepted], token]
        return tuple(out)

    def p_value(rule, n: int) -> float:
        generator = torch.Generator().manual_seed(0)
        return chi_square_p_value(collections.Counter(generate(rule, generator) for _ in range(n)), expected, n)

    assert p_value(accept_sampled, 2500) > 1e-3
    assert p_value(always_accept, 1000) < 1e-6
    assert p_value(resample_from_target, 1000) < 1e-6


@torch.inference_mode()
def exact_sequence_distribution(lm: LoadedLM, ids: list[int], length: int, temperature: float, top_p: float) -> dict:
    """P(first `length` tokens) under the target with transformers' own temperature and top-p warpers."""
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        prefixes = list(probs)
        logits = lm.model(torch.tensor([ids + list(prefix) for prefix in prefixes], device=lm.device)).logits[:, -1]
        for warp in warpers:
            logits = warp(None, logits)
        rows = torch.softmax(logits, dim=-1)
        probs = {
            (*prefix, t): probs[prefix] * float(row[t])
            for prefix, row in zip(prefixes, rows, strict=True)
            for t in row.nonzero().flatten().tolist()
        }
    return probs


def test_sampling_matches_the_targets_distribution_end_to_end(models):
    target, draft = models["target"], models["close"]
    config = RunConfig(temperature=0.7, top_p=0.8, max_new_tokens=3, max_steps=100, seed=0)
    expected = exact_sequence_distribution(target, prompt_ids(target), 3, config.temperature, config.top_p)
    problems = [Prompted(i, "a question", PROMPT) for i in range(300)]

    def p_value(decoder: SpeculativeDecoder, n: int) -> tuple[float, float]:
        trajectories = decoder.run(problems[:n])
        counts = collections.Counter(tuple(t.generated_ids) for t in trajectories)
        proposed = sum(t.speculative.draft_tokens_proposed for t in trajectories)
        accepted = sum(t.speculative.draft_tokens_accepted for t in trajectories)
        return chi_square_p_value(counts, expected, n), accepted / proposed

    p, acceptance = p_value(SpeculativeDecoder(draft, target, config, k=2), 300)
    assert p > 1e-3
    assert 0.2 < acceptance < 0.9  # the rule had real work to do

    class AlwaysAccept(SpeculativeDecoder):
        sampled_rule = staticmethod(always_accept)

    assert p_value(AlwaysAccept(draft, target, config, k=2), 150)[0] < 1e-6


def test_sampling_is_reproducible_and_seeded_per_problem(models):
    config = RunConfig(temperature=1.0, max_new_tokens=12, max_steps=100, seed=3)
    decoder = SpeculativeDecoder(models["close"], models["target"], config, k=3)
    problems = [Prompted(key, "a question", PROMPT) for key in ("a", "b", "c")]
    first = [t.generated_ids for t in decoder.run(problems)]
    assert [t.generated_ids for t in decoder.run(problems)] == first
    # A problem's text depends on its key and the seed, not on which problems run with it.
    assert decoder.run(problems[1:2])[0].generated_ids == first[1]
    assert len({tuple(ids) for ids in first}) == 3
    reseeded = SpeculativeDecoder(
        models["close"], models["target"], RunConfig(temperature=1.0, max_new_tokens=12, seed=4), k=3
    )
    assert [t.generated_ids for t in reseeded.run(problems)] != first


# -- the statistics -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_statistics_add_up(models, temperature):
    target, draft = models["target"], models["close"]
    config = RunConfig(
        delimiter="NO-STEP-ENDS-HERE", temperature=temperature, max_new_tokens=20, max_steps=1000, step_max_tokens=6
    )
    finished = []
    problems = [Prompted(key, "a question", PROMPT) for key in (7, 8)]
    trajectories = SpeculativeDecoder(draft, target, config, k=3).run(problems, on_finish=finished.append)
    assert [t.key for t in trajectories] == [7, 8]
    assert finished == trajectories
    for traj in trajectories:
        stats, spec = traj.stats, traj.speculative
        assert traj.num_generated_tokens == 20
        assert stats.draft_tokens_kept + stats.target_tokens == traj.num_generated_tokens
        assert stats.draft_tokens_kept + stats.draft_tokens_discarded == spec.draft_tokens_proposed
        assert stats.draft_tokens_kept <= spec.draft_tokens_accepted
        assert 0.0 <= spec.token_acceptance_rate <= 1.0
        assert stats.steps_target_only == len(traj.steps) == 4
        draft_usage, target_usage = stats.models["draft"], stats.models["target"]
        # The target reads the prompt once, then each round one committed token and the proposal.
        prompt_length = len(traj.prompt_ids)
        assert target_usage.prefill_tokens == prompt_length + (spec.rounds - 1) + spec.draft_tokens_proposed
        assert target_usage.calls == spec.rounds and target_usage.decode_tokens == 0
        assert draft_usage.decode_tokens == draft_usage.calls == spec.draft_tokens_proposed
        assert draft_usage.prefill_tokens >= prompt_length
        assert draft_usage.flops > 0 and target_usage.flops > 0
        assert stats.models["prm"].flops == 0
        record = json.loads(json.dumps(traj.to_dict()))
        assert record["speculative"]["token_acceptance_rate"] == spec.token_acceptance_rate
        assert record["speculative"]["tokens_per_target_pass"] == 20 / spec.rounds
        assert record["stats"]["tokens"]["target"] == stats.target_tokens


def test_flops_follow_the_tokens_each_model_ran(models):
    target = models["target"]
    traj = decode_one(target, target, RunConfig(max_new_tokens=10, max_steps=1000), k=4)
    # Acceptance 1, so rounds of 5 tokens and no crop: the target reads the prompt and 4 proposals, then 1 committed
    # token and 4 proposals, each token attending to itself and everything before it.
    prompt_length = len(traj.prompt_ids)
    tokens = prompt_length + 4 + 1 + 4
    context_sum = sum(range(1, tokens + 1))
    assert traj.stats.models["target"].flops == target.cost.flops(tokens, context_sum)


# -- errors a user can cause ----------------------------------------------------------------------------------------
def test_refuses_a_draft_with_another_tokenizer(models, tmp_path):
    other_tokenizer = make_tokenizer(vocab_size=280)
    other = load_lm(make_qwen2_lm(tmp_path / "m", other_tokenizer, seed=3), other_tokenizer)
    with pytest.raises(RSDError, match="same tokenizer"):
        SpeculativeDecoder(other, models["target"], RunConfig())


def test_refuses_k_below_one(models):
    with pytest.raises(RSDError, match="k >= 1"):
        SpeculativeDecoder(models["close"], models["target"], RunConfig(), k=0)
