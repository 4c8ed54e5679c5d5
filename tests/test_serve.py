"""`rsd serve` as a user runs it: a real server process on a free port, called with the real `openai` client and
`httpx`. The models are the built-in tiny world's (`rsd serve` with no model arguments)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer
from vllm_servers import free_port, serving, start_vllm_server, vllm_python

from rsd.api import RSD
from rsd.eval.harness import default_tinyworld_model
from rsd.rewards.formats import QWEN_PRM_STEP_TAG
from rsd.tinyworld.task import load_tinyworld

KEY = "test-key-0123"
QUESTIONS = [p.question for p in load_tinyworld(split="test", n=32, seed=0)]
QUESTION = QUESTIONS[0]
LONG_PROMPT = "Tom has 3 apples"  # the tiny world's models repeat " apples" to the token budget from here
ERROR_FIELDS = {"message", "type", "param", "code"}


class ServeProcess:
    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.root = f"http://127.0.0.1:{port}"

    def client(self, key: str | None = KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.root}/v1", api_key=key or "none", max_retries=0, **kwargs)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.root}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def wait_for_metric(self, name: str, predicate, timeout_s: float = 60.0) -> float:
        deadline = time.monotonic() + timeout_s
        while not predicate(value := self.metric(name)):
            assert time.monotonic() < deadline, f"{name} stayed at {value}"
            time.sleep(0.05)
        return value


@contextmanager
def serve(*args: str) -> Iterator[ServeProcess]:
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"rsd-serve-{port}.log"
    command = [sys.executable, "-m", "rsd.cli", "serve", "--port", str(port), "--no-access-log", *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = ServeProcess(process, port, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"rsd serve exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{server.root}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"rsd serve not ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with serve("--api-key", KEY, "--max-n", "4", "--max-new-tokens", "512") as running:
        yield running


@pytest.fixture(scope="module")
def tiny_rsd() -> RSD:
    return RSD(*(default_tinyworld_model(r) for r in ("draft", "target", "prm")), device="cpu")


def chat(client: openai.OpenAI, question: str, **kwargs):
    return client.chat.completions.create(model="rsd", messages=[{"role": "user", "content": question}], **kwargs)


def rsd_of(obj) -> dict:
    return obj.model_extra["rsd"]


def assert_same_steps(got: list[dict], expected: list[dict]) -> None:
    """Equal steps: every field, the PRM's rewards to float32 rounding (its batch may hold other rows)."""
    assert [{**s, "reward": None} for s in got] == [{**s, "reward": None} for s in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-5)


def assert_error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["message"]
    return error


# -- answers ------------------------------------------------------------------------------------------------------
def test_greedy_chat_returns_what_rsd_generate_prints_and_the_stream_joins_to_it(server):
    models = [arg for role in ("draft", "target", "prm") for arg in (f"--{role}", default_tinyworld_model(role))]
    printed = subprocess.run(
        [sys.executable, "-m", "rsd.cli", "generate", *models, "--question", QUESTION, "--json", "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    expected = json.loads(printed.stdout)
    client = server.client()

    answer = chat(client, QUESTION)
    [choice] = answer.choices
    assert choice.message.content == expected["text"]
    assert choice.finish_reason == "stop" and expected["finish_reason"] == "eos"
    assert_same_steps(rsd_of(answer)["steps"], expected["steps"])
    assert {s["source"] for s in expected["steps"]} == {"draft", "target"}  # both models wrote steps
    stats = rsd_of(answer)["stats"]
    assert stats["acceptance_rate"] == expected["stats"]["acceptance_rate"]
    assert stats["tokens"] == expected["stats"]["tokens"]
    assert answer.usage.completion_tokens == sum(s["num_tokens"] for s in expected["steps"])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(chat(client, QUESTION, stream=True, stream_options={"include_usage": True}))
    step_chunks = [c for c in chunks if c.choices and "step" in (c.choices[0].model_extra.get("rsd") or {})]
    assert [c.choices[0].delta.content for c in step_chunks] == [s["text"] for s in expected["steps"]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert_same_steps([rsd_of(c.choices[0])["step"] for c in step_chunks], expected["steps"])
    assert step_chunks[0].choices[0].delta.role == "assistant"
    final, usage = chunks[-2], chunks[-1]
    assert final.choices[0].finish_reason == "stop" and rsd_of(final.choices[0])["finish_reason"] == "eos"
    assert usage.choices == [] and usage.usage.completion_tokens == answer.usage.completion_tokens


def test_the_sse_stream_ends_with_done(server):
    body = {"prompt": QUESTION, "stream": True, "max_tokens": 40}
    with httpx.stream("POST", f"{server.root}/v1/completions", json=body, headers=auth(), timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_per_request_delta_gives_the_draft_alone_and_the_target_alone(server, tiny_rsd):
    client = server.client()
    for delta, method in ((0.0, "draft"), (1.01, "target")):
        answer = chat(client, QUESTION, extra_body={"rsd": {"delta": delta}})
        [alone] = tiny_rsd.generate([QUESTION], method=method)
        assert answer.choices[0].message.content == alone.text
        assert {s["source"] for s in rsd_of(answer)["steps"]} == {method}
    default = chat(client, QUESTION)
    assert {s["source"] for s in rsd_of(default)["steps"]} == {"draft", "target"}  # the server's delta again


@pytest.mark.slow
def test_method_sd_serves_the_targets_own_answer_in_fewer_forwards(tiny_rsd):
    with serve("--method", "sd") as running:
        answer = chat(running.client(), QUESTION)
    [alone] = tiny_rsd.generate([QUESTION], method="target")
    assert answer.choices[0].message.content == alone.text
    assert {s["source"] for s in rsd_of(answer)["steps"]} == {"target"}
    stats = rsd_of(answer)["stats"]
    assert stats["speculation"]["draft_tokens_proposed"] > 0
    assert stats["target_forwards"] < alone.stats.target_tokens == answer.usage.completion_tokens


@pytest.mark.slow
def test_completions_read_the_prompt_verbatim_and_honour_max_steps_and_stop(server, tiny_rsd):
    client = server.client()
    prompt = tiny_rsd.prompt(QUESTION)
    answer = client.completions.create(model="rsd", prompt=prompt)
    [whole] = tiny_rsd.generate([prompt], template="none")  # the PRM reads the whole prompt as the question
    assert answer.choices[0].text == whole.text and answer.object == "text_completion"

    two = client.completions.create(model="rsd", prompt=prompt, extra_body={"rsd": {"max_steps": 2}})
    assert len(rsd_of(two)["steps"]) == 2 and two.choices[0].finish_reason == "length"
    assert rsd_of(two)["finish_reason"] == "max_steps"

    # A stop string across the first two steps: the text ends where it begins, as OpenAI ends it.
    first, second = whole.steps[0].text, whole.steps[1].text
    stop = first[-8:] + second[:5]
    cut = client.completions.create(model="rsd", prompt=prompt, stop=["never there", stop])
    assert cut.choices[0].text == first[:-8] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="rsd", prompt=prompt, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == first[:-8]


def test_sampling_with_a_seed_is_reproducible_and_n_gives_separate_choices(server):
    client = server.client()
    settings = {"temperature": 1.0, "seed": 7, "n": 3, "max_tokens": 60}
    once, again = (chat(client, QUESTION, **settings) for _ in range(2))
    texts = [c.message.content for c in once.choices]
    assert [c.index for c in once.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1
    assert [c.model_extra["rsd"]["steps"] for c in once.choices][0] == rsd_of(once)["steps"]


def test_models_health_and_metrics(server):
    [model] = server.client().models.list().data
    assert model.id == "rsd"
    assert httpx.get(f"{server.root}/health").status_code == 200  # open without the key
    text = httpx.get(f"{server.root}/metrics").text
    for name in (
        "rsd_requests_total", "rsd_requests_in_flight", "rsd_trajectories_queued", "rsd_steps_total",
        "rsd_tokens_total", "rsd_request_latency_seconds_bucket", "rsd_time_to_first_step_seconds_bucket",
    ):  # fmt: skip
        assert name in text


# -- refusals -------------------------------------------------------------------------------------------------------
def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_v1_needs_the_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(key="wrong-key"), QUESTION)
    for headers in ({}, auth("test-key-0124"), {"Authorization": KEY}):
        response = httpx.post(f"{server.root}/v1/chat/completions", json={"messages": []}, headers=headers)
        assert assert_error_shape(response, 401)["code"] == "invalid_api_key"
    assert_error_shape(httpx.get(f"{server.root}/v1/models"), 401)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', None),  # not JSON
        ("[1, 2]", None),
        ('{"messages": "What is 2 + 3?"}', "messages"),
        ('{"messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "20"}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
        ('{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "n"),
        ('{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
        ('{"messages": [{"role": "user", "content": "hi"}], "rsd": {"delta": "high"}}', "rsd.delta"),
        ('{"messages": [{"role": "user", "content": "hi"}], "rsd": {"policy": "magic"}}', "rsd.policy"),
        ('{"messages": [{"role": "system", "content": "be brief"}]}', "messages"),
        ('{"messages": [{"role": "user", "content": "hi"}], "n": 9}', "n"),  # above --max-n
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 513}', "max_tokens"),  # --max-new-tokens
    ],
)
def test_malformed_requests_are_400_in_the_openai_shape(server, body, param):
    headers = auth() | {"Content-Type": "application/json"}
    response = httpx.post(f"{server.root}/v1/chat/completions", content=body, headers=headers)
    error = assert_error_shape(response, 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unknown_fields_are_ignored_and_an_unknown_model_is_404(server):
    body = {"prompt": "Tom has 3 apples", "max_tokens": 5, "logprobs": None, "user": "x", "presence_penalty": 0}
    assert httpx.post(f"{server.root}/v1/completions", json=body, headers=auth(), timeout=60).status_code == 200
    response = httpx.post(f"{server.root}/v1/completions", json=body | {"model": "gpt-4"}, headers=auth())
    assert assert_error_shape(response, 404)["code"] == "model_not_found"


def test_a_prompt_longer_than_the_context_and_a_huge_body_are_refused(server):
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().completions.create(model="rsd", prompt="7" * 1100)  # one token per digit; context 1024
    error = refused.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "1100 tokens" in error["message"] and "1024" in error["message"]
    huge = {"prompt": "7" * (2 << 20)}
    assert_error_shape(httpx.post(f"{server.root}/v1/completions", json=huge, headers=auth()), 413)
    assert chat(server.client(), QUESTION, max_tokens=20).choices[0].finish_reason == "length"  # still serving


# -- batching across requests ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_32_concurrent_requests_each_get_their_answer_alone(server):
    client = server.client()
    alone = [rsd_of(chat(client, q)) for q in QUESTIONS]

    async def all_at_once() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server.root}/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="rsd", messages=[{"role": "user", "content": q}]) for q in QUESTIONS))  # fmt: skip

    rounds_before = server.metric("rsd_round_trajectories_count")
    together = asyncio.run(all_at_once())
    for answer, single in zip(together, alone, strict=True):
        assert_same_steps(rsd_of(answer)["steps"], single["steps"])
    assert [a.choices[0].message.content for a in together] == ["".join(s["text"] for s in a["steps"]) for a in alone]
    # They shared model calls: far fewer rounds than steps, and a round that held most of them.
    steps = sum(len(a["steps"]) for a in alone)
    assert server.metric("rsd_round_trajectories_count") - rounds_before < steps / 4
    assert server.metric('rsd_round_trajectories_bucket{le="16.0"}') < server.metric("rsd_round_trajectories_count")


# -- queue, disconnects, time-outs, shutdown ----------------------------------------------------------------------
@pytest.mark.slow
def test_full_queue_disconnect_and_timeout():
    """One decoding slot and no queue: a second request is a 503 while the first streams; the first's client
    leaves mid-stream, which frees the slot for the next request; a long request ends at the time-out."""
    with serve("--max-concurrency", "1", "--max-queue", "0", "--step-max-tokens", "16") as server:
        client = server.client()
        long_stream = client.completions.create(model="rsd", prompt=LONG_PROMPT, max_tokens=1000, stream=True)
        first = next(iter(long_stream))
        assert rsd_of(first.choices[0])["step"]["num_tokens"] == 16
        response = httpx.post(f"{server.root}/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 5})
        assert assert_error_shape(response, 503)["code"] == "server_overloaded"
        assert response.headers["Retry-After"] == "1"
        long_stream.close()  # the client goes away mid-stream
        server.wait_for_metric("rsd_trajectories_running", lambda v: v == 0)
        assert server.metric('rsd_requests_total{endpoint="/v1/completions",status="499"}') == 1

        assert chat(client, QUESTION).choices[0].finish_reason == "stop"  # a whole answer, served normally

        started = time.perf_counter()
        whole = client.completions.create(model="rsd", prompt=LONG_PROMPT, max_tokens=1000)
        whole_s = time.perf_counter() - started
        assert rsd_of(whole)["finish_reason"] != "timeout"
    # A time-out a quarter of what the whole answer took on this machine cuts the same request after a few steps.
    timeout = f"{max(whole_s / 4, 0.2):.2f}"
    with serve("--step-max-tokens", "16", "--request-timeout", timeout) as server:
        cut = server.client().completions.create(model="rsd", prompt=LONG_PROMPT, max_tokens=1000)
    assert cut.choices[0].finish_reason == "length" and rsd_of(cut)["finish_reason"] == "timeout"
    assert 0 < len(rsd_of(cut)["steps"]) < len(rsd_of(whole)["steps"])


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_and_exits_0():
    with serve() as server:
        results: dict[int, httpx.Response] = {}

        def ask(i: int) -> None:
            body = {"prompt": LONG_PROMPT, "max_tokens": 200, "seed": i}
            results[i] = httpx.post(f"{server.root}/v1/completions", json=body, timeout=120)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        server.wait_for_metric("rsd_requests_in_flight", lambda v: v == 4)
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        assert server.process.wait(60) == 0, server.log.read_text()
    assert sorted(results) == [0, 1, 2, 3]
    for response in results.values():
        assert response.status_code == 200
        answer = response.json()
        assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 200


def test_serve_without_the_server_libraries_says_what_to_install():
    blocked = "import sys; sys.modules['uvicorn'] = None; from rsd.cli import main; sys.exit(main(['serve']))"
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "rsd: error: rsd serve needs uvicorn: pip install 'rsd[serve]'"


# -- over vLLM servers ----------------------------------------------------------------------------------------------
@pytest.mark.served
@pytest.mark.slow
@pytest.mark.skipif(
    vllm_python() is None, reason="no vLLM environment: set RSD_VLLM_PYTHON (scripts/setup_vllm_cpu.sh)"
)
def test_serve_over_vllm_servers_answers_as_rsd_generate_does_over_them(tmp_path):
    """The tiny world's three models behind vLLM CPU servers; `rsd serve` given their URLs passes requests through
    the asynchronous controller: the same answer as `rsd generate` on those URLs, streamed alike, concurrent
    requests all answered, and a client leaving mid-stream frees its slot."""
    models = {r: Path(shutil.copytree(default_tinyworld_model(r), tmp_path / r)) for r in ("draft", "target", "prm")}
    tag_id = AutoTokenizer.from_pretrained(models["prm"]).convert_tokens_to_ids(QWEN_PRM_STEP_TAG)
    pooling = ["--runner", "pooling", "--pooler-config", json.dumps({"pooling_type": "STEP", "step_tag_id": tag_id})]
    started = {
        "draft": start_vllm_server(models["draft"], log_dir=tmp_path, extra_args=["--enable-prompt-tokens-details"]),
        "target": start_vllm_server(models["target"], log_dir=tmp_path, extra_args=["--enable-prompt-tokens-details"]),
        "prm": start_vllm_server(models["prm"], log_dir=tmp_path, extra_args=pooling),
    }
    with serving(started) as servers:
        urls = [arg for role in ("draft", "target", "prm") for arg in (f"--{role}", servers[role].url)]
        printed = subprocess.run(
            [sys.executable, "-m", "rsd.cli", "generate", *urls, "--question", QUESTION, "--json"],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        expected = json.loads(printed.stdout)
        with serve(*urls, "--max-concurrency", "4", "--max-queue", "8") as server:
            client = server.client(key=None)
            answer = chat(client, QUESTION)
            assert answer.choices[0].message.content == expected["text"]
            assert_same_steps(rsd_of(answer)["steps"], expected["steps"])
            streamed = chat(client, QUESTION, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected["text"]

            leaving = client.completions.create(model="rsd", prompt=LONG_PROMPT, max_tokens=600, stream=True)
            next(iter(leaving))
            leaving.close()
            server.wait_for_metric("rsd_trajectories_running", lambda v: v == 0)

            async def eight() -> list:
                async with openai.AsyncOpenAI(base_url=f"{server.root}/v1", api_key="none", max_retries=0) as aclient:
                    return await asyncio.gather(*(aclient.chat.completions.create(
                        model="rsd", messages=[{"role": "user", "content": q}]) for q in QUESTIONS[:8]))  # fmt: skip

            answers = asyncio.run(eight())
            assert all(a.choices[0].finish_reason == "stop" and rsd_of(a)["steps"] for a in answers)
            assert answers[0].choices[0].message.content == expected["text"]
