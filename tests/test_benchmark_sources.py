"""Where a built-in benchmark comes from: a data folder when one is named, else the Hugging Face hub through
`datasets` when it is installed and the hub is online, else one line saying what to do.

Tests never download: the hub branch is checked as a decision, and the refusals and the data-folder branch run
for real (the folder branch on the real benchmark files; those tests skip where the files are absent).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsd.core import RSDError
from rsd.eval.datasets import (
    BUILTIN_LAYOUTS,
    DATA_DIR_ENV,
    HUB_SOURCES,
    HubSource,
    choose_benchmark_source,
    load_problems,
)

DATA_DIR = Path(os.environ.get(DATA_DIR_ENV, Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "math500").is_dir(),
    reason=f"benchmark files not found at {DATA_DIR}: set {DATA_DIR_ENV} to a folder holding NAME/test.jsonl",
)
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def test_every_builtin_benchmark_has_a_hub_source():
    assert set(HUB_SOURCES) == set(BUILTIN_LAYOUTS)
    assert all(source.repo.count("/") == 1 for source in HUB_SOURCES.values())


def test_a_data_folder_wins_over_the_hub(tmp_path):
    env = {DATA_DIR_ENV: str(tmp_path)}
    assert choose_benchmark_source("math500", None, env, datasets_installed=True) == tmp_path
    assert choose_benchmark_source("math500", tmp_path, {}, datasets_installed=True) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert choose_benchmark_source("gsm8k", other, env, datasets_installed=True) == other  # the flag beats the env


def test_without_a_folder_the_hub_when_datasets_is_there_and_online():
    source = choose_benchmark_source("math500", None, {}, datasets_installed=True)
    assert source == HubSource("HuggingFaceH4/MATH-500", "test")
    assert choose_benchmark_source("gsm8k", None, {"HF_HUB_OFFLINE": "0"}, datasets_installed=True).config == "main"


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_without_a_folder_says_so(variable):
    with pytest.raises(RSDError, match=f"offline \\({variable}=1\\).*--data-dir.*{DATA_DIR_ENV}"):
        choose_benchmark_source("math500", None, {variable: "1"}, datasets_installed=True)


def test_without_datasets_or_a_folder_says_both_ways_out():
    with pytest.raises(RSDError, match="--data-dir.*pip install datasets.*HuggingFaceH4/MATH-500"):
        choose_benchmark_source("math500", None, {}, datasets_installed=False)


def test_the_refusal_from_the_command_line_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != DATA_DIR_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "rsd.cli", "eval", "--dataset", "aime24", *("--draft", "tinyworld") * 1,
         "--target", "tinyworld", "--prm", "tinyworld", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "aime24" in result.stderr and "--data-dir" in result.stderr


@needs_data
def test_the_environment_variable_reads_the_real_files(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # would refuse the hub: the folder must be what loads
    problems = load_problems("math500", limit=5)
    assert len(problems) == 5 and problems[0].meta["dataset"] == "math500"
    assert problems == load_problems("math500", data_dir=DATA_DIR, limit=5)


def hub_style(name: str, row: dict, answer: str) -> dict:
    """A row of the real file laid out as its hub copy is: minerva_math gives question and final answer, amc23
    calls the problem a question, mmlu_stem stores choices as a list and the answer as an index."""
    import ast

    if name == "mmlu_stem" and isinstance(row["choices"], str):
        return hub_style(name, {**row, "choices": ast.literal_eval(row["choices"])}, answer)
    if name == "minerva_math":
        return {"question": row["problem"], "answer": answer}
    if name == "amc23":
        return {"question": row["problem"], "answer": row["answer"]}
    if name == "mmlu_stem":
        return {**row, "answer": int(row["answer"])}
    return row


@needs_data
@pytest.mark.parametrize("name", sorted(BUILTIN_LAYOUTS))
def test_the_builtin_rules_read_the_hub_layouts(name):
    """Each built-in rule reads a row of the real file, laid out as the hub copy lays it out, to the same question
    and answer."""
    from rsd.eval.datasets import iter_jsonl

    rule = BUILTIN_LAYOUTS[name]
    for _, row, _ in list(iter_jsonl(DATA_DIR / name / "test.jsonl"))[:20]:
        question, answer, _ = rule(row)
        assert rule(hub_style(name, row, answer))[:2] == (question, answer)


@pytest.mark.skipif(HAS_DATASETS, reason="checks the message shown where `datasets` is not installed (it is here)")
def test_a_hub_benchmark_without_datasets_names_the_install(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(RSDError, match="pip install datasets"):
        load_problems("amc23")
