"""docs/reproduce.md runs: every command of its bash blocks, with tiny stand-ins for the paper's models.

The page downloads the paper's draft, target and PRM into models/{draft,target,prm}, converts the PRM for vLLM,
starts vLLM servers and runs `rsd eval` on each benchmark over the servers and in process, sharded and merged.
Here each download becomes a copy of a stand-in: the tiny world's draft and target, and a tiny PRM in the
Skywork layout (the paper's PRM has that layout, and the page converts it for vLLM; the tiny world's PRM has
Qwen's). `--device cuda` becomes `--device cpu`, each `rsd eval` reads a few problems of each benchmark and writes
short answers (`SHORT_ANSWERS`), and the rest of every command runs as written, through bash, from a scratch folder.

The blocks that start or use vLLM servers run for real where RSD_VLLM_PYTHON names a vLLM environment
(`bash scripts/setup_vllm_cpu.sh`); their `vllm serve` lines start the same server module with the CPU build's
settings, on free ports. Without vLLM those lines are checked for their models, flags and ports only. The
benchmarks come from the shared data folder (or $RSD_DATA_DIR); the tests that need them skip, saying why, when it
is absent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_prm import make_skywork_prm
from vllm_servers import free_port, vllm_python

from rsd.eval.datasets import DATA_DIR_ENV
from rsd.eval.harness import default_tinyworld_model

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reproduce.md"
DATA_DIR = Path(os.environ.get(DATA_DIR_ENV, Path(__file__).resolve().parents[2] / "shared" / "data"))
PAPER_MODELS = {
    "Qwen/Qwen2.5-Math-1.5B-Instruct": "draft",
    "Qwen/Qwen2.5-Math-7B-Instruct": "target",
    "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B": "prm",
}
# Flags the page may give `vllm serve` (checked without vLLM; with it, the servers start for real).
VLLM_FLAGS = {"--port", "--host", "--enable-prompt-tokens-details", "--gpu-memory-utilization",
              "--tensor-parallel-size", "--max-model-len", "--dtype"}  # fmt: skip
# What the CPU build needs on top of the page's flags (as tests/vllm_servers.py starts its servers).
VLLM_CPU_FLAGS = "--dtype float32 --enforce-eager --block-size 32 --max-model-len 1024"
PROBLEMS, SHARDED_PROBLEMS = 2, 4  # per benchmark; a sharded run needs a problem in each of its 4 shards
# The tiny models write nonsense on real questions until their context is full; short answers keep the runs short.
SHORT_ANSWERS = "--max-new-tokens 48 --step-max-tokens 16 --threads 1"

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "math500" / "test.jsonl").is_file(),
    reason=f"no benchmark data at {DATA_DIR} (set {DATA_DIR_ENV} to a folder holding NAME/test.jsonl)",
)
needs_vllm = pytest.mark.skipif(
    vllm_python() is None,
    reason="no vLLM environment: run `bash scripts/setup_vllm_cpu.sh`, set RSD_VLLM_PYTHON to that venv's python",
)


# -- reading the page -----------------------------------------------------------------------------------------------
def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def logical_lines(block: str) -> list[str]:
    """The block's commands, a line ending in a backslash joined with the next."""
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def is_served(block: str) -> bool:
    return "vllm serve" in block or "localhost:" in block


def serve_lines(blocks: list[str]) -> list[list[str]]:
    """Each `vllm serve` command's words, from `vllm` on (an environment prefix and a trailing & left out)."""
    commands = []
    for line in (line for block in blocks for line in logical_lines(block)):
        words = shlex.split(line.rstrip("&"))
        if "vllm" in words and words[words.index("vllm") + 1 : words.index("vllm") + 2] == ["serve"]:
            commands.append(words[words.index("vllm") :])
    return commands


# -- running it with stand-ins --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """The paper's model ids -> tiny folders of the same layouts."""
    root = tmp_path_factory.mktemp("stand-ins")
    return {
        "Qwen/Qwen2.5-Math-1.5B-Instruct": Path(default_tinyworld_model("draft")),
        "Qwen/Qwen2.5-Math-7B-Instruct": Path(default_tinyworld_model("target")),
        "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B": make_skywork_prm(root / "skywork-prm"),
    }


def stand_in_command(line: str, stand_ins: dict[str, Path], ports: dict[str, str]) -> str:
    download = re.fullmatch(r"hf download (\S+) --local-dir (\S+)", line)
    if download:
        repo, folder = download.groups()
        assert repo in stand_ins, f"docs/reproduce.md downloads {repo}, which has no stand-in here"
        return f"mkdir -p $(dirname {folder}) && cp -r {shlex.quote(str(stand_ins[repo]))} {folder}"
    line = line.replace("--device cuda", "--device cpu")
    problems = SHARDED_PROBLEMS if "--shard" in line else PROBLEMS
    line = re.sub(r"\brsd eval\b", f"rsd eval --num-problems {problems} {SHORT_ANSWERS}", line)
    if re.search(r"\bvllm serve\b", line):
        # The CPU build's `vllm` command looks for a package named vllm (it is vllm-cpu): start its server module.
        line = re.sub(r"\bvllm serve (\S+)", r'"$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model \1', line)
        line = re.sub(r"\s*&$", f" {VLLM_CPU_FLAGS} &", line)
    return re.sub(r"\b800\d\b", lambda m: ports.setdefault(m.group(0), str(free_port())), line)


def run_page(blocks: list[str], stand_ins: dict[str, Path], workdir: Path, timeout_s: float) -> str:
    """Run the blocks' commands in one bash, from `workdir`; stop every process it left (servers) afterwards."""
    ports: dict[str, str] = {}
    script = "\n".join(stand_in_command(line, stand_ins, ports) for block in blocks for line in logical_lines(block))
    python = vllm_python()
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DATA": str(DATA_DIR),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_PYTHON": python or "python",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    # Into a file, not a pipe: the servers left running in the background would hold a pipe open after bash ends.
    log = workdir / "page.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_group(process)
    output = log.read_text(errors="replace")
    assert process.returncode == 0, f"docs/reproduce.md failed with stand-ins:\n{script}\n---\n{output[-6000:]}"
    return output


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the page's process group (bash, and the servers it left in the background), SIGKILL what lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and group_alive(process.pid):
            time.sleep(0.5)
    process.wait(10.0)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def summary(run: Path) -> dict[str, dict]:
    return {m["method"]: m for m in json.loads((run / "summary.json").read_text())["methods"]}


# -- the tests ------------------------------------------------------------------------------------------------------
def test_page_runs_the_papers_setup_over_servers_and_in_process():
    blocks = bash_blocks()
    assert any(is_served(b) for b in blocks) and any(not is_served(b) for b in blocks)
    text = "\n".join(blocks)
    assert set(re.findall(r"hf download (\S+)", text)) == set(PAPER_MODELS)
    evals = [line for b in blocks for line in logical_lines(b) if "rsd eval" in line]
    assert evals and all("--delta 0.7" in line or "--methods sd," in line for line in evals)
    assert all("--temperature" not in line for line in evals)  # greedy, rsd's default
    for dataset in ("math500", "gsm8k", "gaokao2023en", "olympiadbench", "mmlu_stem"):
        assert dataset in text


def test_vllm_serve_lines_serve_the_downloaded_models_with_known_flags_on_the_ports_rsd_calls():
    blocks = bash_blocks()
    commands = serve_lines(blocks)
    assert len(commands) == 3
    models = {words[2] for words in commands}
    assert models == {"models/draft", "models/target", "models/prm-vllm"}
    assert "convert-skywork models/prm models/prm-vllm" in "\n".join(blocks)
    ports = []
    for words in commands:
        flags = [w for w in words[3:] if w.startswith("--")]
        assert set(flags) <= VLLM_FLAGS, f"unknown vllm serve flags in docs/reproduce.md: {set(flags) - VLLM_FLAGS}"
        ports.append(words[words.index("--port") + 1])
    assert len(set(ports)) == 3
    urls = set(re.findall(r"http://localhost:(\d+)/v1", "\n".join(b for b in blocks if "rsd eval" in b)))
    assert urls == set(ports)


@pytest.mark.slow
@needs_data
def test_every_in_process_command_of_the_page_runs_with_stand_ins(stand_ins, tmp_path):
    blocks = [b for b in bash_blocks() if not is_served(b)]
    run_page(blocks, stand_ins, tmp_path, timeout_s=900)
    for dataset in ("math500", "gsm8k", "gaokao2023en", "olympiadbench", "mmlu_stem"):
        methods = summary(tmp_path / "runs" / "local" / dataset)
        assert set(methods) == {"rsd", "target", "draft"}
        assert all(m["n"] == PROBLEMS for m in methods.values())
    merged = summary(tmp_path / "runs" / "shards" / "math500")
    assert all(m["n"] == SHARDED_PROBLEMS for m in merged.values())
    assert set(summary(tmp_path / "runs" / "baselines" / "math500")) == {"sd", "best-of-n", "majority"}


@pytest.mark.slow
@pytest.mark.served
@needs_data
@needs_vllm
def test_every_served_command_of_the_page_runs_against_real_vllm_servers(stand_ins, tmp_path):
    blocks = bash_blocks()
    downloads = [b for b in blocks if "hf download" in b]
    run_page(downloads + [b for b in blocks if is_served(b)], stand_ins, tmp_path, timeout_s=900)
    assert (tmp_path / "models" / "prm-vllm" / "config.json").is_file()
    for dataset in ("math500", "gsm8k", "gaokao2023en", "olympiadbench", "mmlu_stem"):
        methods = summary(tmp_path / "runs" / "served" / dataset)
        assert set(methods) == {"rsd", "target", "draft"}
        assert all(m["n"] == PROBLEMS for m in methods.values())
