"""The command line explains itself: built-in model names, quick one-line refusals, --version, defaults in --help,
questions from a file or stdin. Every check runs `rsd` as a user does (a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsd.core import RSDError
from rsd.hf_loading import builtin_model_path, check_model_source

TINYWORLD_MODELS = Path(__file__).resolve().parents[1] / "src" / "rsd" / "tinyworld" / "models"
TINY = ["--draft", "tinyworld", "--target", "tinyworld", "--prm", "tinyworld"]
QUICK = 5.0  # seconds: a refusal must come before any model or data set loads


def rsd_cli(*args: str, stdin: str | None = None, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "rsd.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )
    return result, time.perf_counter() - started


def assert_one_line_refusal(result: subprocess.CompletedProcess, seconds: float, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert seconds < QUICK, f"refused after {seconds:.1f} s"


# -- built-in model names -----------------------------------------------------------------------------------------
def test_tinyworld_names_each_role_and_one_role_anywhere():
    for role in ("draft", "target", "prm"):
        assert builtin_model_path("tinyworld", role) == TINYWORLD_MODELS / role
        assert check_model_source("tinyworld", role) == str(TINYWORLD_MODELS / role)
        assert check_model_source("tinyworld:target", role) == str(TINYWORLD_MODELS / "target")
    with pytest.raises(RSDError, match="tinyworld:draft"):
        check_model_source("tinyworld:judge", "prm")


def test_generate_with_the_built_in_models_by_name():
    question = "Start 3. Add 4. Double it. Subtract 5."  # the tiny world's own task
    result, _ = rsd_cli("generate", *TINY, "--question", question, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["question"] == question and out["steps"]
    assert {s["source"] for s in out["steps"]} <= {"draft", "target"}
    assert all(s["reward"] is not None for s in out["steps"])  # the PRM judged every draft step


def test_the_api_takes_the_same_names():
    from rsd import RSD

    rsd = RSD(draft="tinyworld", target="tinyworld", prm="tinyworld", device="cpu")
    assert Path(rsd.draft.model.name_or_path) == TINYWORLD_MODELS / "draft"
    assert Path(rsd.target.model.name_or_path) == TINYWORLD_MODELS / "target"
    swapped = RSD(draft="tinyworld:target", target="tinyworld", prm="tinyworld", device="cpu")
    assert Path(swapped.draft.model.name_or_path) == TINYWORLD_MODELS / "target"


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("tinyworld-typo", "not a local folder nor a built-in model"),
        ("./no-such-model", "does not exist"),
        ("models/no/such", "does not exist"),
        ("not a model", "nor a valid Hugging Face hub id"),
    ],
)
def test_a_name_that_is_no_model_fails_at_once_in_one_line(bad, says):
    result, seconds = rsd_cli("generate", "--draft", bad, "--target", "tinyworld", "--prm", "tinyworld",
                              "--question", "Start 1. Add 1.")  # fmt: skip
    assert_one_line_refusal(result, seconds, says, bad.strip("./"))


def test_a_misspelt_prm_fails_before_the_other_models_load():
    result, seconds = rsd_cli("generate", "--draft", "tinyworld", "--target", "tinyworld", "--prm", "tinyworld-prm",
                              "--question", "Start 1. Add 1.")  # fmt: skip
    assert_one_line_refusal(result, seconds, "prm model 'tinyworld-prm'")


def test_an_uncached_hub_model_while_offline_says_so():
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(Path(__file__).parent / "no-such-hf-home")}
    result, seconds = rsd_cli("generate", "--draft", "Qwen/Qwen2.5-Math-1.5B-Instruct", "--target", "tinyworld",
                              "--prm", "tinyworld", "--question", "Start 1. Add 1.", env=env)  # fmt: skip
    assert_one_line_refusal(result, seconds, "HF_HUB_OFFLINE=1", "Qwen/Qwen2.5-Math-1.5B-Instruct")


# -- no silent toy ------------------------------------------------------------------------------------------------
def test_a_real_benchmark_without_models_is_refused_in_one_line(tmp_path):
    result, seconds = rsd_cli("eval", "--dataset", "math500", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"))
    assert_one_line_refusal(result, seconds, "--draft", "--target", "--prm", "math500")
    assert not (tmp_path / "r").exists()


# -- help and version ---------------------------------------------------------------------------------------------
def test_version_and_defaults_in_help():
    from rsd import __version__

    result, _ = rsd_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"rsd {__version__}"
    sweep = " ".join(rsd_cli("sweep", "--help")[0].stdout.split())
    for shown in ("(default: 0.3,0.5,0.6,0.7,0.8,0.9)", "(default: 8)", "(default: 32)", "(default: 64)",
                  "(default: 0.7)", "(default: 1.0)", "(default: 0)", "(default: min)"):  # fmt: skip
        assert shown in sweep, shown
    assert "--top-p TOP_P nucleus sampling" in sweep
    evaluate = " ".join(rsd_cli("eval", "--help")[0].stdout.split())
    assert "(default: rsd,target,draft)" in evaluate
    for name in ("math500", "gsm8k", "gaokao2023en", "olympiadbench", "minerva_math", "mmlu_stem", "aime24", "amc23"):
        assert name in evaluate


# -- questions from a file or stdin -------------------------------------------------------------------------------
QUESTIONS = ["Start 3. Add 4.", "Start 2. Double it.", "Start 9. Subtract 5."]


def generated_questions(*args: str, stdin: str | None = None) -> tuple[list[dict], str]:
    result, _ = rsd_cli("generate", *TINY, "--device", "cpu", "--max-steps", "2", "--jsonl", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def test_questions_from_a_text_file_and_from_stdin(tmp_path):
    text = tmp_path / "questions.txt"
    text.write_text("\n".join(QUESTIONS[:2]) + "\n\n" + QUESTIONS[2] + "\n")
    from_file, progress = generated_questions("--questions", str(text))
    assert [r["question"] for r in from_file] == QUESTIONS
    assert "3/3" in progress  # the progress bar, on stderr
    from_stdin, _ = generated_questions("--questions", "-", stdin="\n".join(QUESTIONS))
    assert [r["text"] for r in from_stdin] == [r["text"] for r in from_file]


def test_questions_from_jsonl_and_bad_lines(tmp_path):
    rows = tmp_path / "questions.jsonl"
    rows.write_text("".join(json.dumps({"question": q, "id": i}) + "\n" for i, q in enumerate(QUESTIONS)))
    out, _ = generated_questions("--questions", str(rows), "--question", "Start 1. Add 1.")
    assert [r["question"] for r in out] == ["Start 1. Add 1.", *QUESTIONS]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Start 1."}) + "\n" + json.dumps({"text": "Start 2."}) + "\n")
    result, seconds = rsd_cli("generate", *TINY, "--questions", str(bad))
    assert_one_line_refusal(result, seconds, "line 2", "'question'")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, on purpose
def test_a_ctrl_c_that_a_finalizer_swallows_still_ends_the_command_as_interrupted(monkeypatch, capsys):
    """Python drops an exception raised inside a finalizer (it prints "Exception ignored"): a Ctrl-C that lands in
    one must still end the command as interrupted (130, and the line that says so), not let it exit 0."""
    from rsd import cli

    went_on = []

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler raises here, inside the finalizer, and Python drops it

    def command(args):
        Finalized()  # no name holds it: its finalizer runs at once
        went_on.append(True)
        return 0

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "cmd_generate", command)
    models = ["--draft", "tinyworld", "--target", "tinyworld", "--prm", "tinyworld"]
    assert cli.main(["generate", *models, "--question", "What is 2 + 3?"]) == 130
    assert went_on  # the interrupt did not stop the command where it landed
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("rsd: interrupted")
    assert signal.getsignal(signal.SIGINT) is before  # the command's handler is gone
