"""Dataset loaders on the real benchmark files, malformed rows, the registry, and prompt templates.

The real files are read from the shared data folder beside the repository (`../shared/data`; RSD_DATA_DIR
overrides it); those tests skip where it is absent.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tokenizer  # noqa: E402

from rsd.core import RSDError  # noqa: E402
from rsd.eval.datasets import (  # noqa: E402
    DATA_DIR_ENV,
    DATASET_LOADERS,
    Problem,
    dataset_names,
    load_problems,
    register_dataset,
)
from rsd.eval.prompts import QWEN25_MATH_COT_SYSTEM, TEMPLATES, build_prompt  # noqa: E402

DATA_DIR = Path(os.environ.get(DATA_DIR_ENV, Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "math500").is_dir(),
    reason=f"benchmark data not found at {DATA_DIR}: set {DATA_DIR_ENV} to a folder holding NAME/test.jsonl",
)

# The README's row counts; gaokao2023en has two rows with an empty gold answer (lines 168 and 193), skipped.
EXPECTED_ROWS = {
    "math500": 500,
    "gsm8k": 1319,
    "gaokao2023en": 383,
    "olympiadbench": 675,
    "minerva_math": 272,
    "mmlu_stem": 3018,
    "aime24": 30,
    "amc23": 40,
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# -- the built-in benchmarks --------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_builtin_loaders_read_every_row(name: str) -> None:
    problems = load_problems(name, data_dir=DATA_DIR)
    assert len(problems) == EXPECTED_ROWS[name]
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.question.strip() and p.answer.strip() for p in problems)
    assert all(p.meta["dataset"] == name and p.multiple_choice == (name == "mmlu_stem") for p in problems)


@needs_data
def test_gaokao_reports_its_rows_without_gold(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rsd.eval.datasets"):
        load_problems("gaokao2023en", data_dir=DATA_DIR)
    assert "line 168: empty answer; line 193: empty answer" in caplog.text
    with pytest.raises(RSDError, match="2 malformed row.*line 168.*line 193"):
        load_problems("gaokao2023en", data_dir=DATA_DIR, strict=True)


@needs_data
def test_builtin_answer_rules() -> None:
    def by_line(name: str) -> dict[int, Problem]:
        return {p.meta["line"]: p for p in load_problems(name, data_dir=DATA_DIR)}

    gsm8k = by_line("gsm8k")
    assert gsm8k[1].answer == "18" and gsm8k[1].id == "0"
    assert gsm8k[202].answer == "114200"  # "#### 114,200", commas removed
    assert by_line("olympiadbench")[14].answer == "69,84"  # final_answer ["$69$,$84$"]
    assert by_line("minerva_math")[1].answer == "1.6"  # last \boxed{} of the solution
    assert by_line("amc23")[1].answer == "27"  # 27.0 in the file
    assert by_line("gaokao2023en")[1].answer == "\\{x|-2\\leq x < 1\\}"  # $ stripped
    math500 = by_line("math500")
    assert math500[1].id == "test/precalculus/807.json"
    assert math500[1].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500[1].meta["subject"] == "Precalculus"
    mmlu = by_line("mmlu_stem")[1]
    assert mmlu.answer == "C" and mmlu.id == "1"  # "ABCD"[2]; no id in the row: its line number
    assert mmlu.question.endswith("(D) increase the mortality rate")
    assert "\nAnswer Choices: (A) maintain the population" in mmlu.question


@needs_data
def test_limit_and_data_dir_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    assert [p.id for p in load_problems("aime24", limit=3)] == [p.id for p in load_problems("aime24")[:3]]
    monkeypatch.delenv(DATA_DIR_ENV)
    with pytest.raises(RSDError, match="--data-dir"):
        load_problems("aime24")


def test_missing_benchmark_file_names_the_fix(tmp_path) -> None:
    with pytest.raises(RSDError, match="math500/test.jsonl"):
        load_problems("math500", data_dir=tmp_path)
    with pytest.raises(RSDError, match="does not exist"):
        load_problems("math500", data_dir=tmp_path / "nowhere")


# -- any JSONL file, malformed rows ------------------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_rows_are_reported_and_skipped(tmp_path, caplog) -> None:
    path = _write(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"q": "What is 1+1?", "a": "2"}),
            "{not json",
            json.dumps({"q": "What is 2+2?"}),
            "",
            json.dumps({"q": "   ", "a": "3"}),
            json.dumps(["a", "list"]),
            json.dumps({"q": "What is 3+3?", "a": 6, "id": "six"}),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="rsd.eval.datasets"):
        problems = load_problems(path, question_field="q", answer_field="a")
    assert [(p.id, p.answer) for p in problems] == [("1", "2"), ("six", "6")]
    for fragment in ("4 malformed row(s)", "line 2: not valid JSON", "line 3: no field 'a'", "line 5: empty question"):
        assert fragment in caplog.text
    assert "line 6: a JSON list" in caplog.text
    with pytest.raises(RSDError, match=r"line 2.*line 3.*line 5.*line 6.*without strict"):
        load_problems(path, question_field="q", answer_field="a", strict=True)


def test_jsonl_path_guesses_fields_and_reads_dotted_paths(tmp_path) -> None:
    guessed = _write(tmp_path / "a.jsonl", [json.dumps({"problem": "P?", "answer": "1", "idx": 7})])
    assert load_problems(str(guessed))[0] == Problem(
        id="7", question="P?", answer="1", meta={"dataset": "a", "line": 1, "multiple_choice": False}
    )
    nested = _write(tmp_path / "b.jsonl", [json.dumps({"in": {"text": "Q?"}, "gold": {"values": ["4"]}})])
    assert load_problems(nested, question_field="in.text", answer_field="gold.values.0")[0].answer == "4"
    with pytest.raises(RSDError, match="--question-field and --answer-field"):
        load_problems(_write(tmp_path / "c.jsonl", [json.dumps({"x": "Q?", "y": "1"})]))
    folder = tmp_path / "bench"
    folder.mkdir()
    _write(folder / "test.jsonl", [json.dumps({"question": "Q?", "answer": "5"})])
    assert load_problems(folder)[0].answer == "5"


def test_unknown_names_and_missing_hub_support() -> None:
    with pytest.raises(RSDError, match="unknown dataset 'nonsense'"):
        load_problems("nonsense")
    with pytest.raises(RSDError, match="not found"):
        load_problems("no/such/file.jsonl")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(RSDError, match="pip install datasets"):
            load_problems("hf:HuggingFaceH4/MATH-500")


# -- the registry ------------------------------------------------------------------------------------------------


def test_registry_is_pluggable() -> None:
    def loader(options) -> list[Problem]:
        return [Problem(id=f"{options.split}-{i}", question=f"Q{i}?", answer=str(i)) for i in range(5)]

    register_dataset("toy-registry-test", loader)
    try:
        assert "toy-registry-test" in dataset_names()
        assert [p.id for p in load_problems("toy-registry-test", split="dev", limit=2)] == ["dev-0", "dev-1"]
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("toy-registry-test", lambda options: [])
    finally:
        DATASET_LOADERS.pop("toy-registry-test")


def test_tinyworld_is_a_registered_name() -> None:
    assert "tinyworld" in dataset_names()
    problems = load_problems("tinyworld", limit=4)
    assert len(problems) == 4 and all(p.answer.isdigit() for p in problems)
    assert problems[0].meta["dataset"] == "tinyworld"


# -- prompt templates -------------------------------------------------------------------------------------------


def test_qwen_cot_template(tokenizer) -> None:
    prompt = build_prompt("qwen25-math-cot", "What is $\\frac{1}{2}$ of {4}?", tokenizer)
    assert prompt == (
        f"<|im_start|>system\n{QWEN25_MATH_COT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is $\\frac{1}{2}$ of {4}?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert QWEN25_MATH_COT_SYSTEM == "Please reason step by step, and put your final answer within \\boxed{}."


def test_none_and_chat_templates(tokenizer) -> None:
    assert set(TEMPLATES) >= {"qwen25-math-cot", "none"}
    assert build_prompt("none", "Q {x}?", tokenizer) == "Q {x}?"
    assert build_prompt("none", "Q?", None) == "Q?"
    assert build_prompt("chat", "Q?", tokenizer) == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_without_chat_template_suggests_none() -> None:
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(RSDError, match="--template none"):
        build_prompt("qwen25-math-cot", "Q?", bare)


def test_template_files(tmp_path, tokenizer) -> None:
    text = tmp_path / "fewshot.txt"
    text.write_text("Solve; put the result in \\boxed{}.\nProblem: {question}\nSolution:")
    assert build_prompt(str(text), "2+2?", tokenizer) == "Solve; put the result in \\boxed{}.\nProblem: 2+2?\nSolution:"
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "{question}"}]))
    assert build_prompt(str(chat), "2+2?", tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"role": "user", "content": "{question}"}))
    with pytest.raises(RSDError, match="list of chat messages"):
        build_prompt(str(bad), "Q", tokenizer)
    (tmp_path / "noslot.txt").write_text("no placeholder")
    with pytest.raises(RSDError, match="placeholder"):
        build_prompt(str(tmp_path / "noslot.txt"), "Q", tokenizer)
    with pytest.raises(RSDError, match="unknown template"):
        build_prompt("qwen-math", "Q", tokenizer)


@needs_data
def test_multiple_choice_prompt_carries_the_choices(tokenizer) -> None:
    problem = load_problems("mmlu_stem", data_dir=DATA_DIR, limit=1)[0]
    prompt = build_prompt("qwen25-math-cot", problem.question, tokenizer)
    assert "Answer Choices: (A)" in prompt and "(D) increase the mortality rate<|im_end|>" in prompt
