"""PRM adapters: each format's rewards against a full forward built here from notes/prm-formats.md, incremental
scoring with rollback against a full re-score, inputs longer than the PRM's context, format detection and forcing,
callable rewards. A PRM scores in rsd's engine, through transformers' forward (RSD_DECODE=eager, or a body the
engine does not run), or in the engine with rsd's Triton kernels; on the CPU and, where a GPU is present, CUDA."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_prm import BUILDERS, make_plain_qwen2_lm  # noqa: E402

from rsd.core import RewardRequest, RSDError  # noqa: E402
from rsd.engine.kernels.split_attention import interpreting  # noqa: E402
from rsd.engine.runner import DECODE_ENV, ModelRunner  # noqa: E402
from rsd.rewards import PRM_FORMATS, CallableReward, detect_prm_format, load_prm  # noqa: E402

# The delimiter in the question checks that reward positions are the built ones, not every "\n\n" token.
QUESTION = "Tom has 3 apples.\n\nHe buys 4 more. How many apples does he have?"
STEPS = ["Step 1: 3 + 4 = 7.", "Let x be the number of apples, x = 7.", "So the answer is \\boxed{7}."]
REJECTED = "What is 12 - 5? We compute 12 - 5 = 7."  # a draft step 2 that the target replaces with STEPS[1]
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prms")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def tokenizer_of(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def safetensors_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ---- references: the whole input of a trajectory, built from the format description, one forward pass ----------


def skywork_reference(path: Path, question: str, steps: list[str], delimiter: str = "\n\n"):
    from transformers import Qwen2Model

    tok = tokenizer_of(path)
    assert tok.bos_token == "<|im_start|>"
    ids = encode(tok, tok.bos_token + question + "\n")
    reward_token = encode(tok, delimiter)[-1]
    positions = []
    for step in steps:
        ids += encode(tok, step) + [reward_token]
        positions.append(len(ids) - 1)
    hidden = Qwen2Model.from_pretrained(path)(torch.tensor([ids])).last_hidden_state[0, positions]
    head = safetensors_of(path)
    value = hidden @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]
    return ids, torch.sigmoid(value[:, 0]).tolist()


def qwen_prm_reference(path: Path, question: str, steps: list[str]):
    from transformers import Qwen2Model

    tok = tokenizer_of(path)
    messages = [
        {"role": "system", "content": QWEN_SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    tag = tok.convert_tokens_to_ids("<extra_0>")
    positions = [i for i, t in enumerate(ids) if t == tag]
    hidden = Qwen2Model.from_pretrained(path)(torch.tensor([ids])).last_hidden_state[0, positions]
    head = safetensors_of(path)
    h = torch.relu(hidden @ head["score.0.weight"].T + head["score.0.bias"])
    logits = h @ head["score.2.weight"].T + head["score.2.bias"]
    return ids, torch.softmax(logits, -1)[:, 1].tolist()


def math_shepherd_reference(path: Path, question: str, steps: list[str]):
    from transformers import MistralForCausalLM

    tok = tokenizer_of(path)
    text = f"{question} " + "\n".join(f"{step} ки" for step in steps)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    plus_minus = tok.encode("+ -")[1:]
    tag = tok.encode("ки")[-1]
    positions = [i for i, t in enumerate(ids) if t == tag]
    logits = MistralForCausalLM.from_pretrained(path)(torch.tensor([ids])).logits[0, positions][:, plus_minus]
    return ids, torch.softmax(logits, -1)[:, 0].tolist()


def rlhflow_reference(path: Path, question: str, steps: list[str]):
    from transformers import LlamaForCausalLM

    tok = tokenizer_of(path)
    conversation = []
    for k, step in enumerate(steps):
        conversation += [
            {"role": "user", "content": f"{question} {step}" if k == 0 else step},
            {"role": "assistant", "content": "+"},
        ]
    ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    plus, minus = tok.encode("+ -")[1:]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    # Each assistant turn is "+<|eot_id|>"; the position before its "+" predicts it.
    positions = [i - 1 for i in range(1, len(ids) - 1) if ids[i] == plus and ids[i + 1] == eot]
    assert len(positions) == len(steps) and positions[-1] == len(ids) - 3  # the reference's logits[:, -3]
    logits = LlamaForCausalLM.from_pretrained(path)(torch.tensor([ids])).logits[0, positions][:, [plus, minus]]
    return ids, torch.softmax(logits, -1)[:, 0].tolist()


def token_classification_reference(path: Path, question: str, steps: list[str]):
    from transformers import Qwen2ForTokenClassification

    tok = tokenizer_of(path)
    assert tok.bos_token_id is None
    ids, positions = encode(tok, question), []
    for step in steps:
        ids += encode(tok, step) + encode(tok, "\n")
        positions.append(len(ids) - 1)
    logits = Qwen2ForTokenClassification.from_pretrained(path)(torch.tensor([ids])).logits[0, positions]
    return ids, torch.softmax(logits, -1)[:, 1].tolist()


REFERENCES = {
    "skywork": skywork_reference,
    "qwen-prm": qwen_prm_reference,
    "math-shepherd": math_shepherd_reference,
    "rlhflow": rlhflow_reference,
    "token-classification": token_classification_reference,
}


def load(path: Path, scoring: str | None = None, device: str = "cpu", **kwargs):
    """A PRM in float32, scoring as the `scoring` fixture asks (None: as the defaults choose): in rsd's engine
    (the default for Llama and Qwen bodies), through transformers' forward (RSD_DECODE=eager), or in the engine
    with rsd's Triton kernels (as on a GPU in half precision; here through Triton's interpreter)."""
    prm = load_prm(str(path), device=device, dtype="float32", **kwargs)
    if scoring is None:
        return prm
    if scoring == "transformers":
        assert prm.runner is None and prm.engine_problem == "RSD_DECODE=eager"
        return prm
    if prm.engine_problem is not None:
        # Mistral's sliding window: test_a_sliding_window_prm_scores_through_transformers_forward checks it.
        pytest.skip(f"{prm.prm_format}'s body scores through transformers' forward ({prm.engine_problem})")
    forward = prm.runner.forward
    assert forward.kernels is False  # float32: torch operations, on every device
    if scoring == "engine-kernels":
        if device == "cpu" and not interpreting():
            pytest.skip("with a CUDA GPU present the kernels run compiled, on the cuda parameter (see conftest.py)")
        assert forward.kernels_problem() is None
        forward.kernels = True
    return prm


SCORING = ["engine", "transformers", "engine-kernels"]
# Each case with the kernels takes ~13 s through Triton's interpreter: a Qwen2 body with the value head and a Llama
# body with the label tokens here, a token classifier in the batch test.
KERNEL_FORMATS = ("skywork", "rlhflow")


@pytest.fixture
def scoring(request, monkeypatch) -> str:
    """How PRMs loaded by the test score (RSD_DECODE=eager: transformers' forward)."""
    if request.param == "transformers":
        monkeypatch.setenv(DECODE_ENV, "eager")
    else:
        monkeypatch.delenv(DECODE_ENV, raising=False)
    if request.param == "engine-kernels":
        pytest.importorskip("triton", reason="Triton is not installed: pip install -e '.[dev]' brings it")
    return request.param


def formats_and_scorings(kernel_formats: tuple[str, ...]) -> list[tuple[str, str]]:
    return [
        (fmt, scoring)
        for fmt in PRM_FORMATS
        for scoring in SCORING
        if scoring != "engine-kernels" or fmt in kernel_formats
    ]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def engine_ran_throughout(prm, scoring: str) -> bool:
    """The kernels, where asked for, ran every forward: no fallback to torch operations."""
    return scoring != "engine-kernels" or prm.runner.forward.kernels


# ---- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "scoring"), formats_and_scorings(KERNEL_FORMATS), indirect=["scoring"])
def test_rewards_match_a_full_forward_and_reuse_the_cache_through_a_rollback(checkpoints, fmt, scoring, device):
    path, reference = checkpoints[fmt], REFERENCES[fmt]
    prm = load(path, scoring, device)
    assert prm.prm_format == fmt  # detected from config.json
    final_ids, final_rewards = reference(path, QUESTION, STEPS)
    rejected_ids, rejected_rewards = reference(path, QUESTION, STEPS[:1] + [REJECTED])
    first_ids, _ = reference(path, QUESTION, STEPS[:1])
    two_ids, _ = reference(path, QUESTION, STEPS[:2])
    assert max(final_rewards) - min(final_rewards) > 1e-3  # the model tells steps apart, so positions matter

    def score(steps):
        return prm.score_steps([RewardRequest("t", QUESTION, steps)])[0]

    first = score(STEPS[:1])
    draft = score(STEPS[:1] + [REJECTED])
    target = score(STEPS[:2])  # the rejected step rolled back, the target's in its place
    last = score(STEPS)
    got = [first.reward, target.reward, last.reward]
    assert got == pytest.approx(final_rewards, abs=1e-5)
    assert draft.reward == pytest.approx(rejected_rewards[-1], abs=1e-5)
    assert not any(out.truncated for out in (first, draft, target, last))

    # Only new tokens run: each call's tail is the growth of the whole input. The adapter stops at the last reward
    # position; what the whole input has after it (Qwen's "<|im_end|>\n", RLHFlow's "+<|eot_id|>") is the same
    # for every step count.
    unrun_suffix = len(first_ids) - first.prefill_tokens
    assert unrun_suffix == {"qwen-prm": 2, "rlhflow": 2}.get(fmt, 0)
    assert first.context_sum == first.prefill_tokens * (first.prefill_tokens + 1) // 2
    assert draft.prefill_tokens == len(rejected_ids) - len(first_ids)
    assert draft.context_sum == sum(first.prefill_tokens + j + 1 for j in range(draft.prefill_tokens))
    assert target.prefill_tokens == len(two_ids) - common_prefix(rejected_ids, two_ids) - unrun_suffix
    assert last.prefill_tokens == len(final_ids) - len(two_ids)

    prm.release(["t"])
    assert score(STEPS[:1]).prefill_tokens == first.prefill_tokens
    assert engine_ran_throughout(prm, scoring)


@pytest.mark.parametrize(("fmt", "scoring"), formats_and_scorings(("token-classification",)), indirect=["scoring"])
def test_one_batch_of_fresh_continued_and_rolled_back_requests(checkpoints, fmt, scoring, device):
    """Every request of a call in one forward: the engine packs the rows' tails, transformers' forward pads them to
    the longest (up to `max_batch_size` rows a forward)."""
    path, reference = checkpoints[fmt], REFERENCES[fmt]
    prm = load(path, scoring, device)
    forwards: list[int] = []
    run = prm.run
    prm.run = lambda rows: forwards.append(len(rows)) or run(rows)
    prm.score_steps([RewardRequest("b", QUESTION, STEPS[:1]), RewardRequest("c", QUESTION, STEPS[:1] + [REJECTED])])
    requests = [
        RewardRequest("a", QUESTION, STEPS),  # nothing cached
        RewardRequest("b", "What is 12 - 5?", STEPS[:2]),  # another question: the cached prefix is dropped
        RewardRequest("b2", QUESTION, STEPS[:1]),
        RewardRequest("c", QUESTION, STEPS),  # rolls back the rejected step, adds two
    ]
    forwards.clear()
    outputs = prm.score_steps(requests)
    expected = [reference(path, r.question, list(r.steps))[1][-1] for r in requests]
    assert [o.reward for o in outputs] == pytest.approx(expected, abs=1e-5)
    assert forwards == [4]
    # The caches the batch left behind, one per key, carry on correctly.
    follow_up = [RewardRequest("a", QUESTION, STEPS + ["Thus 7."]), RewardRequest("b2", QUESTION, STEPS[:2])]
    outputs = prm.score_steps(follow_up)
    expected = [reference(path, r.question, list(r.steps))[1][-1] for r in follow_up]
    assert [o.reward for o in outputs] == pytest.approx(expected, abs=1e-5)
    assert outputs[1].prefill_tokens < outputs[0].prefill_tokens + len(STEPS[1])  # cache hits, not fresh inputs
    assert engine_ran_throughout(prm, scoring)


def test_a_sliding_window_prm_scores_through_transformers_forward_and_says_why(checkpoints, monkeypatch):
    monkeypatch.delenv(DECODE_ENV, raising=False)
    path = checkpoints["math-shepherd"]
    prm = load(path)
    assert prm.engine_problem == "it has sliding-window attention" and prm.runner is None
    _, expected = math_shepherd_reference(path, QUESTION, STEPS)
    got = [prm.score_steps([RewardRequest("k", QUESTION, STEPS[: n + 1])])[0].reward for n in range(3)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert isinstance(load(checkpoints["rlhflow"]).runner, ModelRunner)  # the same format on a Llama body: the engine
    monkeypatch.setenv(DECODE_ENV, "arena")
    with pytest.raises(RSDError, match="RSD_DECODE='arena': the one value it takes is 'eager'"):
        load(path)


@pytest.mark.parametrize("scoring", ["engine", "transformers"], indirect=True)
def test_repeated_key_in_one_call_is_scored_in_order(checkpoints, scoring):
    path = checkpoints["skywork"]
    prm = load(path, scoring, max_batch_size=2)
    _, expected = skywork_reference(path, QUESTION, STEPS)
    forwards: list[int] = []
    run = prm.run
    prm.run = lambda rows: forwards.append(len(rows)) or run(rows)
    outputs = prm.score_steps([RewardRequest("k", QUESTION, STEPS[: n + 1]) for n in range(3)])
    assert [o.reward for o in outputs] == pytest.approx(expected, abs=1e-5)
    assert forwards == [1, 1, 1]  # one wave per repetition of the key
    tok = tokenizer_of(path)
    assert outputs[2].prefill_tokens == len(encode(tok, STEPS[2])) + 1


def test_an_input_longer_than_the_context_keeps_the_question_and_the_latest_steps(checkpoints):
    path = checkpoints["skywork"]
    prm = load(path)
    build = prm.builder.build_ids
    steps = [f"Step {i}: {i} + {i} = {2 * i}." for i in range(1, 9)]
    last_two, last_three = build(QUESTION, steps[-2:]), build(QUESTION, steps[-3:])
    assert len(last_two) < len(last_three) < len(build(QUESTION, steps))
    prm.context_length = len(last_two)  # the question and two steps fit, three do not
    assert prm.fitted_ids(RewardRequest("t", QUESTION, steps)) == (last_two, True)
    assert prm.fitted_ids(RewardRequest("t", QUESTION, steps[:2])) == (build(QUESTION, steps[:2]), False)
    out = prm.score_steps([RewardRequest("t", QUESTION, steps)])[0]
    _, rewards = skywork_reference(path, QUESTION, steps[-2:])
    assert out.truncated and out.reward == pytest.approx(rewards[-1], abs=1e-5)
    assert out.prefill_tokens == len(last_two)
    # The next step of the same trajectory: its first steps left out in turn, still scored with the question.
    following = prm.score_steps([RewardRequest("t", QUESTION, [*steps, "Step 9: 9 + 9 = 18."])])[0]
    _, rewards = skywork_reference(path, QUESTION, [steps[-1], "Step 9: 9 + 9 = 18."])
    assert following.truncated and following.reward == pytest.approx(rewards[-1], abs=1e-5)
    # Where even the question and the step scored do not fit: the input's last tokens, the step's reward last.
    alone = build(QUESTION, steps[-1:])
    prm.context_length = len(alone) - 3
    assert prm.fitted_ids(RewardRequest("u", QUESTION, steps)) == (alone[3:], True)
    cut = prm.score_steps([RewardRequest("u", QUESTION, steps)])[0]
    assert cut.truncated and cut.prefill_tokens == len(alone) - 3 and 0.0 <= cut.reward <= 1.0
    prm.context_length = None  # no known context: everything is read
    assert prm.fitted_ids(RewardRequest("v", QUESTION, steps)) == (build(QUESTION, steps), False)


def test_skywork_marks_steps_with_the_run_delimiter(checkpoints):
    path = checkpoints["skywork"]
    prm = load(path, delimiter=" #")
    _, expected = skywork_reference(path, QUESTION, STEPS, delimiter=" #")
    _, default = skywork_reference(path, QUESTION, STEPS)
    got = [prm.score_steps([RewardRequest("k", QUESTION, STEPS[: n + 1])])[0].reward for n in range(3)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert got != pytest.approx(default, abs=1e-5)


def test_cost_counts_the_body_without_embeddings_and_the_head(checkpoints):
    prm = load(checkpoints["skywork"])
    config = prm.body.config
    hidden, vocab = config.hidden_size, config.vocab_size
    total = sum(p.numel() for p in prm.body.parameters())
    assert prm.cost.parameters == total - vocab * hidden + hidden + 1
    assert (prm.cost.layers, prm.cost.attention_width) == (2, 128)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"architectures": ["Qwen2ForPrmModel"], "model_type": "qwen2"}, "skywork"),
        ({"architectures": ["Qwen2ForProcessRewardModel"], "model_type": "qwen2"}, "qwen-prm"),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "math-shepherd"),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "rlhflow"),
        ({"architectures": ["Qwen2ForTokenClassification"], "model_type": "qwen2"}, "token-classification"),
    ],
)
def test_detect_format_from_config(config, expected):
    assert detect_prm_format(config) == expected


def test_undetectable_format_names_the_choices_and_forcing_works(checkpoints, tmp_path):
    path = make_plain_qwen2_lm(tmp_path / "plain")
    with pytest.raises(RSDError, match="--prm-format") as err:
        load(path)
    assert all(name in str(err.value) for name in PRM_FORMATS)
    prm = load(path, prm_format="rlhflow")
    assert prm.prm_format == "rlhflow"
    assert 0.0 <= prm.score_steps([RewardRequest("k", QUESTION, STEPS)])[0].reward <= 1.0


@pytest.mark.parametrize("fmt", ["rlhflow", "math-shepherd"])
def test_a_plain_llama_or_mistral_read_by_its_config_alone_gets_a_warning(tmp_path, fmt):
    build = BUILDERS[fmt]
    plain = build(tmp_path / "my-target-model")  # a causal LM whose name does not say what it is
    with pytest.warns(UserWarning, match=f"read as a {fmt} PRM.*--prm-format {fmt}"):
        assert load(plain).prm_format == fmt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(plain, prm_format=fmt)  # confirmed: no warning
        load(build(tmp_path / f"tiny-{fmt}-model"))  # named for its format


def test_unknown_format_is_refused(checkpoints):
    with pytest.raises(RSDError, match="unknown --prm-format 'bogus'") as err:
        load(checkpoints["skywork"], prm_format="bogus")
    assert all(name in str(err.value) for name in PRM_FORMATS)


@pytest.mark.parametrize(("checkpoint", "forced"), [("qwen-prm", "skywork"), ("skywork", "token-classification")])
def test_forcing_a_format_the_weights_lack_is_refused(checkpoints, checkpoint, forced):
    with pytest.raises(RSDError, match="--prm-format"):
        load(checkpoints[checkpoint], prm_format=forced)


def test_callable_reward_sees_question_and_steps():
    seen = []

    def last_step_has_answer(question: str, steps: list[str]) -> float:
        seen.append((question, steps))
        return 1.0 if "\\boxed" in steps[-1] else 0.25

    reward = CallableReward(last_step_has_answer)
    out = reward.score_steps([RewardRequest("a", QUESTION, STEPS[:1]), RewardRequest("b", QUESTION, STEPS)])
    assert [o.reward for o in out] == [0.25, 1.0]
    assert seen[1] == (QUESTION, STEPS)
    assert reward.name == "last_step_has_answer" and reward.cost.parameters == 0


@pytest.mark.parametrize(("value", "expected"), [(True, 1.0), (0, 0.0), (1 + 1e-9, 1.0), (torch.tensor(0.5), 0.5)])
def test_callable_reward_accepts_numbers_in_range(value, expected):
    reward = CallableReward(lambda q, s: value, name="rule")
    assert reward.score_steps([RewardRequest("a", "q", ["s"])])[0].reward == expected


@pytest.mark.parametrize("value", [1.5, -0.2, math.nan, "0.9", None, [0.5]])
def test_callable_reward_refuses_what_is_not_a_reward(value):
    reward = CallableReward(lambda q, s: value, name="rule")
    with pytest.raises(RSDError, match="reward function rule"):
        reward.score_steps([RewardRequest("a", "q", ["s"])])


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer that marks only the first word of an input (Metaspace, prepend "first")."""
    from tiny import CORPUS, QWEN_CHAT_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.train_from_iterator(CORPUS * 5, trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|endoftext|>", additional_special_tokens=specials[2:]
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_qwen_prm_input_tokenizes_each_step_once_and_equals_the_whole_text(kind):
    from tiny import make_tokenizer

    from rsd.rewards.formats import QwenPRMInput

    tokenizer = make_tokenizer() if kind == "byte-level" else metaspace_tokenizer()
    builder = QwenPRMInput(tokenizer)
    # Byte-level BPE tokenizes the text after a special token on its own; Metaspace "first" does not, so that
    # tokenizer must take the whole-text path.
    assert builder.incremental == (kind == "byte-level")
    steps = ["Step 1: 3 + 4 = 7.", " so x = 7\n\n", "\n\nThen  12 - 5 = 7.", "7", " The answer is 7."]
    for question in (QUESTION, " What is 12 - 5?\n"):
        for n in range(1, len(steps) + 1):
            whole = tokenizer.encode(builder.render(question, steps[:n]), add_special_tokens=False)
            assert builder.build_ids(question, steps[:n]) == whole
    if builder.incremental:  # each text was tokenized once: a head per question, and the later steps (shared)
        assert len(builder.heads) == 2 and len(builder.encode_piece.memo) == 2 + len(steps) - 1
