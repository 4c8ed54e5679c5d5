"""The tiny world: its problem generator, its step checker, and the committed draft, target and PRM."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rsd.tinyworld
from rsd.core import RSDError
from rsd.tinyworld.task import (
    SYSTEM_PROMPT,
    Difficulty,
    Problem,
    chat_prompt,
    check_step,
    is_correct_answer,
    label_steps,
    last_boxed_value,
    load_tinyworld,
    make_problems,
    split_of,
    split_steps,
)

MODELS = Path(rsd.tinyworld.__file__).parent / "models"
ROLES = ("draft", "target", "prm")


# -- the generator -------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_problems_and_other_seeds_others():
    first = make_problems("train", 50, seed=3)
    assert first == make_problems("train", 50, seed=3)
    assert make_problems("train", 20, seed=3) == first[:20]  # a prefix is stable
    other = {p.question for p in make_problems("train", 50, seed=4)}
    assert len(other & {p.question for p in first}) < 3


def test_train_and_test_splits_are_disjoint():
    train = make_problems("train", 3000, seed=0) + make_problems("train", 1000, seed=1)
    test = make_problems("test", 1000, seed=0) + make_problems("test", 500, seed=1)
    assert not {p.question for p in train} & {p.question for p in test}
    assert all(split_of(p.question) == "train" == p.split for p in train)
    assert all(split_of(p.question) == "test" == p.split for p in test)
    assert len({p.id for p in test}) == len(test)
    assert all(p.id.startswith("tinyworld-test-") for p in test)


def test_reference_solutions_are_judged_correct_and_end_with_the_answer():
    for problem in make_problems("train", 300, seed=0) + make_problems("test", 300, seed=0):
        steps = list(problem.solution_steps)
        assert all(label_steps(problem, steps))
        assert split_steps(problem.solution) == steps
        assert len(steps) == len(problem.operations) + 1
        assert problem.answer.isdigit() and problem.answer == str(problem.operations[-1].result)
        assert last_boxed_value(problem.solution) == problem.answer
        assert "\\boxed" in steps[-1] and all("\\boxed" not in s for s in steps[:-1])
        assert is_correct_answer(problem, problem.solution)


def test_math_verify_grades_the_answers_as_the_project_does():
    from math_verify import parse, verify

    for problem in make_problems("test", 10, seed=0):
        assert verify(parse(problem.answer), parse(problem.solution))
        wrong = problem.solution.replace(f"\\boxed{{{problem.answer}}}", f"\\boxed{{{int(problem.answer) + 1}}}")
        assert not verify(parse(problem.answer), parse(wrong))


def problem_and_steps() -> tuple[Problem, list[str]]:
    problem = make_problems("test", 1, seed=7)[0]
    return problem, list(problem.solution_steps)


def corrupt(step: str, old: str, new: str) -> str:
    assert old in step
    return step.replace(old, new, 1)


def test_check_step_rejects_wrong_arithmetic_operands_and_structure():
    problem, steps = problem_and_steps()
    mul, second = problem.operations[0], problem.operations[1]
    first = steps[0]
    wrong_steps = {
        "wrong result": corrupt(first, f"= {mul.result}", f"= {mul.result + 10}"),
        "wrong operand": first.replace(f"{mul.left} * {mul.right} = {mul.result}",
                                       f"{mul.left + 1} * {mul.right} = {(mul.left + 1) * mul.right}"),
        "wrong operator": first.replace(f"{mul.left} * {mul.right} = {mul.result}",
                                        f"{mul.left} + {mul.right} = {mul.left + mul.right}"),
        "no equation": f"So there are {mul.result} of them.",
        "two equations": first + f" Also {mul.left} + 1 = {mul.left + 1}.",
        "premature answer": first + f" \\boxed{{{mul.result}}}",
    }  # fmt: skip
    for name, step in wrong_steps.items():
        assert not check_step(problem, [], step), name
    assert check_step(problem, [], first)

    # A step that builds on an earlier wrong value is wrong, though its own arithmetic holds.
    bad_value = mul.result + 10
    builds_on_it = steps[1].replace(
        f"{second.left} {second.op} {second.right} = {second.result}",
        f"{bad_value} {second.op} {second.right} = "
        f"{bad_value + second.right if second.op == '+' else bad_value - second.right}",
    )
    assert not check_step(problem, [wrong_steps["wrong result"]], builds_on_it)

    assert not check_step(problem, steps[:-1], "The final answer is \\boxed{12345678}.")
    assert not check_step(problem, steps, "The final answer is \\boxed{" + problem.answer + "}.")  # an extra step
    assert not check_step(problem, steps[:-2], steps[-1])  # the answer before the last operation


def test_check_step_accepts_either_order_for_commutative_operations():
    problem, steps = problem_and_steps()
    mul = problem.operations[0]
    assert check_step(problem, [], f"It is {mul.right} * {mul.left} = {mul.result}.")
    for index, op in enumerate(problem.operations[1:], start=1):
        swapped = f"Now {op.right} {op.op} {op.left} = {op.result}."
        # Only sums may swap; a swapped difference is even wrong arithmetic here (the amount is the smaller).
        assert check_step(problem, steps[:index], swapped) == (op.op == "+")


def test_difficulty_sets_the_number_of_operations_and_the_size_of_numbers():
    easy = Difficulty(min_ops=1, max_ops=1, count_range=(2, 9), per_range=(2, 9), amount_range=(1, 9), max_value=99)
    for problem in make_problems("train", 200, seed=0, difficulty=easy):
        assert len(problem.operations) == 2
        assert all(op.result <= 99 for op in problem.operations)
        assert 2 <= problem.operations[0].left <= 9 and 1 <= problem.operations[1].right <= 9
    hard = Difficulty(min_ops=6, max_ops=6)
    assert all(len(p.operations) == 7 for p in make_problems("train", 50, seed=0, difficulty=hard))


def test_bad_arguments_raise_rsd_errors():
    with pytest.raises(RSDError, match="split"):
        make_problems("validation", 3)
    with pytest.raises(RSDError, match="n >= 0"):
        make_problems("test", -1)
    with pytest.raises(RSDError, match="difficulty"):
        make_problems("test", 3, difficulty=Difficulty(min_ops=3, max_ops=2))


def test_load_tinyworld_gives_records_for_the_harness():
    records = load_tinyworld(split="test", n=200, seed=0)
    assert len(records) == 200 == len({r.id for r in records})
    assert records == make_problems("test", 200, seed=0)
    assert all(r.question and r.answer.isdigit() for r in records)


# -- the committed checkpoints -------------------------------------------------------------------------------


def test_checkpoints_exist_with_their_files_and_fit_the_size_budget():
    for role in ROLES:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (MODELS / role / name).is_file(), f"{role}/{name}"
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert total < 26_000_000


def read_config(role: str) -> dict:
    return json.loads((MODELS / role / "config.json").read_text())


def safetensors_shapes(role: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(MODELS / role / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


def parameter_count(role: str) -> int:
    return sum(int(torch.tensor(shape).prod()) for shape in safetensors_shapes(role).values())


def test_generator_and_prm_layouts_and_sizes():
    for role in ("draft", "target"):
        config = read_config(role)
        assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
        assert config["head_dim"] == 64
    config = read_config("prm")
    assert config["architectures"] == ["Qwen2ForProcessRewardModel"] and config["head_dim"] == 64
    shapes = safetensors_shapes("prm")
    hidden = config["hidden_size"]
    assert all(name.startswith(("model.", "score.")) for name in shapes)
    assert shapes["score.0.weight"] == (hidden, hidden) and shapes["score.2.weight"] == (2, hidden)
    assert shapes["score.2.bias"] == (2,)

    draft, target, prm = (parameter_count(role) for role in ROLES)
    assert 0.8e6 < draft < 1.2e6
    assert 9 < target / draft < 12  # tied embeddings: every stored parameter multiplies each token
    assert 1.3 < prm / draft < 2.4  # about 1.6x the draft's parameters


def test_tokenizer_speaks_the_qwen_chat_format_and_splits_digits():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODELS / "draft")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>")}
    assert list(ids.values()) == [0, 1, 2, 3]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Q?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat_prompt("Q?")
    digits = tokenizer.encode(" 2405", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in digits] == [" ", "2", "4", "0", "5"]
    problem = make_problems("test", 1, seed=0)[0]
    head, step = chat_prompt(problem.question), problem.solution_steps[0] + "\n\n"
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert encode(head + step + problem.solution_steps[1]) == encode(head) + encode(step) + encode(
        problem.solution_steps[1]
    )
    for role in ("target", "prm"):
        assert (MODELS / role / "tokenizer.json").read_text() == (MODELS / "draft" / "tokenizer.json").read_text()


def test_auto_tokenizer_reproduces_the_tokenizer_the_models_were_trained_with():
    # transformers 5 rebuilds Qwen2's pipeline for qwen2 checkpoints whatever tokenizer.json says; the models
    # only work if that gives exactly the tokens of tokenizer.json itself.
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    for role in ROLES:
        loaded = AutoTokenizer.from_pretrained(MODELS / role)
        raw = Tokenizer.from_file(str(MODELS / role / "tokenizer.json"))
        for problem in make_problems("test", 20, seed=0):
            for text in (chat_prompt(problem.question) + problem.solution, problem.question + " <extra_0> 1,234.5\n"):
                assert loaded.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def generators():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {
        r: AutoModelForCausalLM.from_pretrained(MODELS / r, dtype=torch.float32).eval() for r in ("draft", "target")
    }
    return models, AutoTokenizer.from_pretrained(MODELS / "draft")


def greedy(model, tokenizer, questions: list[str]) -> list[str]:
    tokenizer.padding_side = "left"
    batch = tokenizer([chat_prompt(q) for q in questions], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=160, do_sample=False)
    return tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)


def test_generators_load_end_with_their_eos_and_the_target_outsolves_the_draft(generators):
    models, tokenizer = generators
    eos = set(models["draft"].generation_config.eos_token_id)
    assert {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} <= eos

    problem = load_tinyworld("test", n=1, seed=0)[0]
    greedy(models["draft"], tokenizer, [problem.question])  # warm-up
    start = time.perf_counter()
    (text,) = greedy(models["draft"], tokenizer, [problem.question])
    assert time.perf_counter() - start < 5.0  # well under a second on an idle 2-core CPU; slack for busy CI
    assert last_boxed_value(text) is not None and len(split_steps(text)) >= 4

    problems = load_tinyworld("test", n=24, seed=0)
    questions = [p.question for p in problems]
    solved = {
        role: sum(map(is_correct_answer, problems, greedy(models[role], tokenizer, questions)))
        for role in ("draft", "target")
    }
    target, draft = solved["target"], solved["draft"]
    assert target >= 22 and draft <= target - 4


def auroc(positives: list[float], negatives: list[float]) -> float:
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs)


def test_prm_separates_the_drafts_right_and_wrong_first_steps():
    """What RSD needs of the PRM: on held-out problems, the draft's own greedy first steps (the products it
    guesses) are told apart, right from wrong, through the same adapter `rsd generate` uses."""
    from rsd.backends.hf import HFStepGenerator
    from rsd.core import RewardRequest, StepParams, StepRequest, strip_delimiter
    from rsd.rewards import load_prm as load_reward_model

    draft = HFStepGenerator(str(MODELS / "draft"), device="cpu", dtype="float32")
    prm = load_reward_model(str(MODELS / "prm"), device="cpu", dtype="float32")
    problems = load_tinyworld("test", n=48, seed=1)
    requests = [StepRequest(p.id, draft.encode(chat_prompt(p.question)), 48) for p in problems]
    steps = [strip_delimiter(o.text, "\n\n") for o in draft.generate_steps(requests, StepParams())]
    rewards = [
        o.reward
        for o in prm.score_steps([RewardRequest(p.id, p.question, [s]) for p, s in zip(problems, steps, strict=True)])
    ]
    right = [r for p, s, r in zip(problems, steps, rewards, strict=True) if check_step(p, [], s)]
    wrong = [r for p, s, r in zip(problems, steps, rewards, strict=True) if not check_step(p, [], s)]
    assert len(right) >= 5 and len(wrong) >= 5, (len(right), len(wrong))
    assert auroc(right, wrong) >= 0.9


def test_the_training_script_runs_from_the_repository_outside_the_package():
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_tinyworld.py"
    assert not (MODELS.parent / "train.py").exists()  # the installed package holds the models and the task only
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--seed" in done.stdout
