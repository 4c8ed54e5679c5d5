"""`rsd generate` end to end on tiny models of the real layouts, as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from test_rewards import qwen_prm_reference, skywork_reference  # noqa: E402
from tiny import make_qwen2_lm, make_tokenizer  # noqa: E402
from tiny_prm import make_qwen_prm, make_skywork_prm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rsd.core import strip_delimiter  # noqa: E402

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
MAX_NEW = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-models")
    tokenizer = make_tokenizer()
    return {
        "draft": make_qwen2_lm(root / "draft", tokenizer, hidden_size=64, layers=2, seed=1),
        "target": make_qwen2_lm(root / "target", tokenizer, hidden_size=128, heads=2, layers=2, seed=2),
        "qwen-prm": make_qwen_prm(root / "qwen-prm", seed=3),
        "skywork": make_skywork_prm(root / "skywork", seed=4),
    }


def rsd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "rsd.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def generate_json(models: dict[str, Path], prm: str, *extra: str) -> dict:
    out = rsd(
        "generate", "--draft", str(models["draft"]), "--target", str(models["target"]), "--prm", str(models[prm]),
        "--question", QUESTION, "--max-new-tokens", str(MAX_NEW), "--step-max-tokens", "64", "--device", "cpu",
        "--json", *extra,
    )  # fmt: skip
    return json.loads(out.stdout)


def plain_greedy_text(model_dir: Path) -> str:
    """The model's own greedy continuation of the same prompt, by transformers' generate."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": QUESTION},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_delta_zero_reproduces_the_draft_exactly(models):
    result = generate_json(models, "qwen-prm", "--delta", "0")
    assert all(s["source"] == "draft" and s["kept"] for s in result["steps"])
    assert result["text"] == plain_greedy_text(models["draft"])
    assert result["stats"]["target_step_share"] == 0.0


def test_delta_above_one_reproduces_the_target_exactly(models):
    result = generate_json(models, "skywork", "--delta", "1.01")
    assert all(s["source"] == "target" and not s["kept"] for s in result["steps"])
    assert all("draft_text" in s for s in result["steps"])
    assert result["text"] == plain_greedy_text(models["target"])
    assert result["stats"]["acceptance_rate"] == 0.0


@pytest.mark.parametrize(("prm", "reference"), [("qwen-prm", qwen_prm_reference), ("skywork", skywork_reference)])
def test_reported_rewards_equal_an_independent_full_forward(models, prm, reference):
    result = generate_json(models, prm, "--delta", "0.5", "--step-max-tokens", "8")
    steps = result["steps"]
    assert len(steps) >= 2
    for i, step in enumerate(steps):
        proposal = step.get("draft_text", step["text"])
        history = [strip_delimiter(s["text"], "\n\n") for s in steps[:i]]
        _, rewards = reference(models[prm], QUESTION, [*history, strip_delimiter(proposal, "\n\n")])
        assert step["reward"] == pytest.approx(rewards[-1], abs=1e-4), i
        assert step["kept"] == (step["reward"] >= 0.5)


def test_human_output_shows_steps_and_statistics(models):
    out = rsd(
        "generate", "--draft", str(models["draft"]), "--target", str(models["target"]),
        "--prm", str(models["qwen-prm"]), "--question", QUESTION, "--max-new-tokens", "24", "--device", "cpu",
    ).stdout  # fmt: skip
    assert "[step  1 |" in out and "reward" in out
    assert "acceptance:" in out and "FLOPs" in out


def test_missing_model_path_is_one_clear_line(models, tmp_path):
    missing = tmp_path / "no-such-model"
    result = rsd(
        "generate", "--draft", str(missing), "--target", str(models["target"]), "--prm", str(models["qwen-prm"]),
        "--question", QUESTION, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "draft model not found" in lines[0] and str(missing) in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prm-format", "bogus"], "prm-format"),
        (["--question", "   "], "question"),
    ],
)
def test_bad_input_gives_one_clear_line(models, args, message):
    base = ["generate", "--draft", str(models["draft"]), "--target", str(models["target"])]
    base += ["--prm", str(models["qwen-prm"]), "--device", "cpu"]
    if "--question" not in args:
        base += ["--question", QUESTION]
    result = rsd(*base, *args, check=False)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_pair_that_cannot_work_together_is_refused(models, tmp_path):
    """A target whose embedding table is smaller than the shared tokenizer would crash on draft tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(models["draft"])
    config = Qwen2Config(
        vocab_size=len(tokenizer) - 20, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=64, intermediate_size=64, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    small = tmp_path / "small-target"
    Qwen2ForCausalLM(config).save_pretrained(small)
    tokenizer.save_pretrained(small)
    result = rsd(
        "generate", "--draft", str(models["draft"]), "--target", str(small), "--prm", str(models["qwen-prm"]),
        "--question", QUESTION, "--device", "cpu", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot work together" in result.stderr and "Traceback" not in result.stderr
