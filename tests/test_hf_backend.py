"""The in-process step generator against a plain reference: full forwards without a cache, argmax each token.

Every test runs once per runner: rsd's engine (`rsd.engine.runner.ModelRunner`; on CUDA with its CUDA graphs) and
transformers' own forward (`rsd.engine.transformers_runner`, the escape hatch RSD_DECODE=eager). Float32, on the CPU
and, where a GPU is present, on CUDA (the `device` parameter).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_qwen2_lm, make_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from rsd.backends.hf import HFStepGenerator  # noqa: E402
from rsd.core import RSDError, StepGenerator, StepOutput, StepParams, StepRequest, StopReason  # noqa: E402
from rsd.engine.runner import DECODE_ENV, ModelRunner  # noqa: E402
from rsd.engine.steps import DELIMITER_WINDOW_SLACK  # noqa: E402
from rsd.engine.transformers_runner import TransformersRunner  # noqa: E402
from rsd.hf_loading import load_tokenizer  # noqa: E402

RUNNERS = ["engine", "transformers"]
ATTENTION_SHARPNESS = 8.0
GREEDY = StepParams()
hf_logging.disable_progress_bar()
PROMPTS = ["Let x be the number", "What is 12 - 5?", "A train travels 60 miles per hour for", "Step 1:"]


@pytest.fixture(autouse=True, params=RUNNERS)
def runner_kind(request, monkeypatch) -> str:
    """Every generator a test builds runs on this runner (RSD_DECODE=eager: transformers' forward)."""
    if request.param == "transformers":
        monkeypatch.setenv(DECODE_ENV, "eager")
    else:
        monkeypatch.delenv(DECODE_ENV, raising=False)
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    folder = make_qwen2_lm(tmp_path_factory.mktemp("lm"), tokenizer)
    # Random init leaves attention almost uniform, blind to positions; sharpen it so that a wrong position id,
    # mask or cache column changes the tokens.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(ATTENTION_SHARPNESS)
            layer.self_attn.k_proj.weight.mul_(ATTENTION_SHARPNESS)
    model.save_pretrained(folder)
    return folder


def load_generator(model_dir: Path, device: str = "cpu") -> HFStepGenerator:
    return HFStepGenerator(str(model_dir), device=device, dtype="float32")


def load_model(model_dir: Path, device: str = "cpu"):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def reference_step(
    generator: HFStepGenerator, prefix: list[int], max_tokens: int, delimiter: str = "\n\n"
) -> tuple[list[int], StopReason]:
    """Greedy, one full forward over the whole sequence per token, stop rules checked on the whole step text."""
    tokens: list[int] = []
    with torch.inference_mode():
        while True:
            ids = torch.tensor([prefix + tokens], device=generator.model.device)
            tokens.append(int(generator.model(input_ids=ids, use_cache=False).logits[0, -1].argmax()))
            if tokens[-1] in generator.eos_token_ids:
                return tokens, StopReason.EOS
            if delimiter in generator.tokenizer.decode(tokens, skip_special_tokens=True):
                return tokens, StopReason.DELIMITER
            if len(tokens) >= max_tokens:
                return tokens, StopReason.LENGTH


def run_steps(
    generator: HFStepGenerator, prompts: dict[str, list[int]], caps: dict[str, int], steps: int, params=GREEDY
) -> tuple[dict[str, list[StepOutput]], dict[str, list[int]]]:
    """Feed every step back as the next prefix, all rows in one call per step."""
    prefixes = {key: list(ids) for key, ids in prompts.items()}
    outputs: dict[str, list[StepOutput]] = {key: [] for key in prompts}
    for _ in range(steps):
        requests = [StepRequest(key, prefixes[key], caps[key]) for key in prompts]
        for request, out in zip(requests, generator.generate_steps(requests, params), strict=True):
            outputs[request.key].append(out)
            prefixes[request.key] += out.token_ids
    return outputs, prefixes


def assert_matches_reference(generator, prompt: list[int], outputs: list[StepOutput], cap: int, delimiter="\n\n"):
    prefix = list(prompt)
    for k, out in enumerate(outputs):
        tokens, stop = reference_step(generator, prefix, cap, delimiter)
        assert (out.token_ids, out.stop) == (tokens, stop), f"step {k} differs from the uncached reference"
        assert out.decode_tokens == len(out.token_ids)
        prefix += tokens


def test_implements_the_protocol_and_reports_model_facts(model_dir, tokenizer, runner_kind, device):
    gen = load_generator(model_dir, device)
    assert isinstance(gen, StepGenerator)
    assert isinstance(gen.engine.runner, ModelRunner if runner_kind == "engine" else TransformersRunner)
    if runner_kind == "engine":  # decode forwards replayed as CUDA graphs on a GPU, run as they are elsewhere
        assert gen.engine.runner.use_graphs == (device == "cuda")
    assert gen.context_length == 2048
    assert gen.role == "draft" and gen.name == str(model_dir)
    assert tokenizer.eos_token_id in gen.eos_token_ids
    total = sum(p.numel() for p in gen.model.parameters())
    assert gen.cost.parameters == total - gen.model.get_input_embeddings().weight.numel()
    assert (gen.cost.layers, gen.cost.attention_width) == (2, 64)
    text = "Tom has 3 apples.\n\n"
    assert gen.encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gen.tokenizer.decode(gen.encode(text)) == text


def test_vocabulary_fingerprint_tells_tokenizers_apart(model_dir, tokenizer):
    gen = load_generator(model_dir)
    assert gen.vocabulary_fingerprint() == HFStepGenerator.from_model(gen.model, tokenizer).vocabulary_fingerprint()
    other = HFStepGenerator.from_model(gen.model, make_tokenizer(vocab_size=280))
    assert gen.vocabulary_fingerprint() != other.vocabulary_fingerprint()


def test_one_row_fed_back_matches_uncached_greedy(model_dir, device):
    gen = load_generator(model_dir, device)
    prompt = gen.encode(PROMPTS[0])
    outputs, prefixes = run_steps(gen, {"a": prompt}, {"a": 6}, steps=6)
    assert_matches_reference(gen, prompt, outputs["a"], cap=6)
    assert len(prefixes["a"]) - len(prompt) >= 12  # several steps were really generated


def test_batch_of_different_lengths_matches_uncached_greedy(model_dir, device):
    gen = load_generator(model_dir, device)
    forwards = count_prefill_forwards(gen)
    prompts = {f"row{i}": gen.encode(text) for i, text in enumerate(PROMPTS[:3])}
    assert len({len(ids) for ids in prompts.values()}) == 3
    # Different caps: rows finish at different decode steps of the same call.
    caps = {"row0": 3, "row1": 5, "row2": 7}
    outputs, prefixes = run_steps(gen, prompts, caps, steps=4)
    # A fresh row joins rows that hold caches (mixed cache widths and tail lengths in one batch).
    late = {"late": gen.encode(PROMPTS[3])}
    requests = [StepRequest(key, prefixes[key], caps[key]) for key in prompts]
    requests.append(StepRequest("late", late["late"], 6))
    mixed = gen.generate_steps(requests, GREEDY)
    for i, key in enumerate(prompts):
        assert_matches_reference(gen, prompts[key], outputs[key] + [mixed[i]], cap=caps[key])
    assert_matches_reference(gen, late["late"], [mixed[-1]], cap=6)
    # The last call's tails, one token for each cached row and the whole prompt for the late one, in one forward.
    assert forwards[-1] == 1


def count_prefill_forwards(gen: HFStepGenerator) -> list[int]:
    """Prefill forwards per call, as the generator runs them (the count is appended at each call)."""
    counts: list[int] = []
    generate = gen.generate_steps
    runner = gen.engine.runner
    extend = runner.extend

    def counted_extend(*args, **kwargs):
        counts[-1] += 1
        return extend(*args, **kwargs)

    def counted_generate(*args):
        counts.append(0)
        return generate(*args)

    runner.extend = counted_extend
    gen.generate_steps = counted_generate
    return counts


def test_rollback_equals_a_fresh_generator(model_dir, device):
    gen, fresh = load_generator(model_dir, device), load_generator(model_dir, device)
    prompt = gen.encode(PROMPTS[1])
    proposal = gen.generate_steps([StepRequest("t", prompt, 8)], GREEDY)[0]
    # The proposal is rejected; another continuation (say, the target's step) is fed instead.
    other = gen.encode(" So the answer is 7.\n\n")
    assert other[: len(proposal.token_ids)] != proposal.token_ids
    prefix = prompt + other
    after = gen.generate_steps([StepRequest("t", prefix, 8)], GREEDY)[0]
    expected = fresh.generate_steps([StepRequest("t", prefix, 8)], GREEDY)[0]
    assert (after.token_ids, after.stop, after.text) == (expected.token_ids, expected.stop, expected.text)
    assert after.prefill_tokens == len(other)  # the prompt came from the cache, the proposal was dropped
    assert expected.prefill_tokens == len(prefix)
    # Asking again from exactly the cached point still runs one token, and gives the same step.
    again = gen.generate_steps([StepRequest("t", prefix, 8)], GREEDY)[0]
    assert again.token_ids == after.token_ids and again.prefill_tokens == 1


def test_rollback_inside_a_batch(model_dir, device):
    gen, fresh = load_generator(model_dir, device), load_generator(model_dir, device)
    prompts = {"keep": gen.encode(PROMPTS[0]), "drop": gen.encode(PROMPTS[2])}
    first, prefixes = run_steps(gen, prompts, {"keep": 5, "drop": 5}, steps=1)
    prefixes["drop"] = prompts["drop"] + gen.encode("x = 6")  # the draft step of "drop" is rolled back
    requests = [StepRequest(key, prefixes[key], 5) for key in prompts]
    got = gen.generate_steps(requests, GREEDY)
    want = fresh.generate_steps(requests, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.prefill_tokens for o in got] == [1, len(gen.encode("x = 6"))]


def test_prefill_stays_linear_over_a_trajectory(model_dir, device):
    gen = load_generator(model_dir, device)
    prompt = gen.encode(PROMPTS[2])
    outputs, prefixes = run_steps(gen, {"a": prompt}, {"a": 5}, steps=10)
    steps = outputs["a"]
    generated = sum(len(o.token_ids) for o in steps)
    cached_prefill = sum(o.prefill_tokens for o in steps)
    uncached_prefill = sum(len(prompt) + sum(len(o.token_ids) for o in steps[:k]) for k in range(len(steps)))
    print(f"\nprefill over 10 steps: {cached_prefill} with the cache, {uncached_prefill} without")
    assert cached_prefill <= len(prompt) + generated
    assert cached_prefill == len(prompt) + len(steps) - 1  # the prompt once, then each step's last token
    assert cached_prefill * 3 < uncached_prefill
    # Every position but the last token was run exactly once, so attention saw contexts 1, 2, ..., L-1.
    processed = len(prefixes["a"]) - 1
    assert sum(o.context_sum for o in steps) == processed * (processed + 1) // 2


def test_sampling_is_seeded_and_independent_of_the_batch(model_dir, device):
    prompts = {key: load_generator(model_dir, device).encode(text) for key, text in zip("abc", PROMPTS, strict=False)}
    caps = dict.fromkeys(prompts, 8)

    def sample(keys: str, seed: int, top_p: float = 0.9) -> dict[str, list[int]]:
        gen = load_generator(model_dir, device)
        params = StepParams(temperature=1.0, top_p=top_p, seed=seed)
        outputs, _ = run_steps(gen, {k: prompts[k] for k in keys}, {k: caps[k] for k in keys}, 3, params)
        return {key: [t for o in steps for t in o.token_ids] for key, steps in outputs.items()}

    alone = sample("a", seed=1)
    assert sample("a", seed=1) == alone
    assert sample("a", seed=2) != alone
    assert sample("abc", seed=1)["a"] == alone["a"]
    assert sample("cb", seed=1)["b"] == sample("b", seed=1)["b"]
    # A nucleus of (almost) nothing keeps only the top token: sampling becomes greedy.
    greedy, _ = run_steps(load_generator(model_dir, device), {"a": prompts["a"]}, {"a": 8}, 3)
    assert sample("a", seed=3, top_p=1e-9)["a"] == [t for o in greedy["a"] for t in o.token_ids]


def steer_lm_head(model, token: int, like: int, scale: float = 1.05) -> None:
    """Make `token` beat `like` wherever `like` would win (so `token` comes later, not at once)."""
    with torch.no_grad():
        model.lm_head.weight[token] = model.lm_head.weight[like] * scale


def first_new_token(tokens: list[int], start: int, avoid: set[int]) -> int:
    return next(k for k in range(start, len(tokens)) if tokens[k] not in tokens[:k] and tokens[k] not in avoid)


def test_step_ends_at_eos_and_keeps_it(model_dir, tokenizer, device):
    base = load_generator(model_dir, device)
    prompt = base.encode(PROMPTS[2])
    natural, _ = reference_step(base, prompt, 12)
    model = load_model(model_dir, device)
    k = first_new_token(natural, 2, base.eos_token_ids)
    steer_lm_head(model, tokenizer.eos_token_id, like=natural[k])
    gen = HFStepGenerator.from_model(model, tokenizer)
    out = gen.generate_steps([StepRequest("e", prompt, 12)], GREEDY)[0]
    assert out.stop == StopReason.EOS
    assert out.token_ids[-1] == tokenizer.eos_token_id and len(out.token_ids) > 1
    assert out.text == tokenizer.decode(out.token_ids[:-1]) and "<|endoftext|>" not in out.text
    assert_matches_reference(gen, prompt, [out], cap=12)


def test_step_ends_at_the_newline_delimiter_and_keeps_it(model_dir, tokenizer, device):
    model = load_model(model_dir, device)
    newline = tokenizer.encode("\n")
    assert tokenizer.encode("\n\n") == newline * 2  # the delimiter takes two tokens here
    with torch.no_grad():  # a bias on "\n" makes every token a newline
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True).to(device)
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[newline[0]] = 1e4
        model.lm_head = head
    gen = HFStepGenerator.from_model(model, tokenizer)
    out = gen.generate_steps([StepRequest("n", gen.encode(PROMPTS[0]), 10)], GREEDY)[0]
    assert (out.token_ids, out.text, out.stop) == (newline * 2, "\n\n", StopReason.DELIMITER)


def test_step_ends_where_a_multi_token_delimiter_completes(model_dir, device):
    gen = load_generator(model_dir, device)
    prompt = gen.encode(PROMPTS[2])
    natural, _ = reference_step(gen, prompt, 20, delimiter="never there")
    # A delimiter of two single-character tokens that the model writes mid-step (random models write bytes).
    j = next(
        j
        for j in range(2, len(natural) - 1)
        if all(len(text := gen.tokenizer.decode([t])) == 1 and text.isascii() for t in natural[j : j + 2])
    )
    delimiter = gen.tokenizer.decode(natural[j : j + 2])
    out = gen.generate_steps([StepRequest("d", prompt, 20)], StepParams(delimiter=delimiter))[0]
    assert out.stop == StopReason.DELIMITER and delimiter in out.text and len(out.token_ids) > 2
    assert delimiter not in gen.tokenizer.decode(out.token_ids[:-1])
    assert_matches_reference(gen, prompt, [out], cap=20, delimiter=delimiter)


@pytest.mark.parametrize("source", ["test-tokenizer", "tiny-world"])
def test_the_delimiter_prefilter_decides_like_decoding_every_window(model_dir, source):
    """Stop checks skip the decode for tokens whose own text cannot end the delimiter; over random sequences rich in
    the delimiters' characters, they decide exactly as decoding every window does."""
    import random

    from rsd.eval.harness import default_tinyworld_model

    gen = load_generator(model_dir)
    if source == "tiny-world":
        gen = HFStepGenerator.from_model(gen.model, load_tokenizer(default_tinyworld_model("draft"), "draft", False))
    vocab = len(gen.tokenizer)
    rule = gen.engine.stop_rule
    marked = [t for t in range(vocab) if any(c in rule.text([t]) for c in "\n. ")]
    rng = random.Random(3)
    for delimiter in ("\n\n", "\n", ".\n", " .", "ки"):
        checked = 0
        window = len(delimiter.encode("utf-8")) + DELIMITER_WINDOW_SLACK
        for _ in range(300):  # a step, token by token, up to where decoding every window would end it
            tokens: list[int] = []
            for _ in range(8):
                tokens.append(rng.choice(marked) if rng.random() < 0.6 else rng.randrange(vocab))
                every_window = delimiter in rule.text(tokens[-window:])
                assert rule.completes_delimiter(tokens, delimiter) == every_window, (delimiter, tokens)
                if every_window:
                    checked += 1
                    break
        assert checked or delimiter not in ("\n", "\n\n")  # the usual delimiters did end some steps
    skipped = sum(not known for known in rule.completers.values())
    assert skipped > len(rule.completers) / 4  # and most tokens skip the decode


def test_step_ends_at_its_token_cap_and_zero_cap_runs_nothing(model_dir, device):
    gen = load_generator(model_dir, device)
    prompt = gen.encode(PROMPTS[0])
    out, empty = gen.generate_steps([StepRequest("l", prompt, 3), StepRequest("z", prompt, 0)], GREEDY)
    assert out.stop == StopReason.LENGTH and len(out.token_ids) == 3
    assert (empty.token_ids, empty.stop, empty.prefill_tokens) == ([], StopReason.LENGTH, 0)


def test_release_forgets_the_cache(model_dir, device):
    gen = load_generator(model_dir, device)
    prompt = gen.encode(PROMPTS[0])
    first = gen.generate_steps([StepRequest("r", prompt, 4)], GREEDY)[0]
    gen.release(["r", "never-seen"])
    again = gen.generate_steps([StepRequest("r", prompt + first.token_ids, 4)], GREEDY)[0]
    assert again.prefill_tokens == len(prompt) + len(first.token_ids)


def test_missing_model_path_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(RSDError, match="draft model not found"):
        HFStepGenerator(str(tmp_path / "no-such-model"), device="cpu")
    # A folder with a config and a tokenizer but no weights.
    folder = tmp_path / "no-weights"
    tokenizer.save_pretrained(folder)
    load_model_config_only(folder)
    with pytest.raises(RSDError, match="could not load the target model"):
        HFStepGenerator(str(folder), role="target", device="cpu")


def load_model_config_only(folder: Path) -> None:
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=1, num_attention_heads=1).save_pretrained(folder)


def test_token_ids_outside_the_vocabulary_are_a_clear_error(model_dir, device):
    gen = load_generator(model_dir, device)
    with pytest.raises(RSDError, match="outside the draft model's vocabulary"):
        gen.generate_steps([StepRequest("v", [1, 2, 10_000], 4)], GREEDY)
