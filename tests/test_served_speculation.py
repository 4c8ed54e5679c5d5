"""A served target's rewrites with speculation, against real vLLM CPU servers of the tiny world's models.

- Verified rewrites: a greedy rewrite request that carries the rejected draft step is verified through the server
  (one request with `prompt_logprobs`, then the usual request if the step goes on). The step must be exactly the
  target's own, the one the plain request gives, whatever the proposal: agreeing fully, partly, not at all, running
  past the delimiter, ending at EOS, cut by the step cap, diverging where a delimiter split over two tokens begins
  (its halves then lie in different requests). "auto" verifies only where it pays; sampled rewrites never.
- vLLM's own speculative decoding (`--speculative-config` with the tiny world's draft): rsd runs against such a
  server and gets the same steps and trajectories as from the plain target server. If vLLM cannot start such a
  server, that test skips with the end of the server's log.

Two servers start together at the module's first server test (about 1-2 minutes on 2 cores) and are shared.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from vllm_servers import prometheus_counter, start_vllm_server, vllm_python, wait_until_ready

from rsd.async_loop import AsyncStepwiseDecoder
from rsd.backends.hf import HFStepGenerator
from rsd.backends.openai import ServedStepGenerator, delimiter_end, own_choices
from rsd.core import Prompted, RSDError, RunConfig, StepOutput, StepParams, StepRequest, StopReason
from rsd.eval.harness import default_tinyworld_model
from rsd.eval.prompts import DEFAULT_TEMPLATE, build_prompt
from rsd.policies import DEFAULT_DELTA, Threshold
from rsd.rewards import load_prm
from rsd.tinyworld.task import load_tinyworld

VLLM_PYTHON = vllm_python()
vllm = pytest.mark.skipif(
    VLLM_PYTHON is None,
    reason="no vLLM environment: run `bash scripts/setup_vllm_cpu.sh`, set RSD_VLLM_PYTHON to that venv's python",
)
GREEDY = StepParams()
CONFIG = RunConfig(step_max_tokens=64, max_new_tokens=384, max_steps=16, batch_size=16)
SPECULATIVE_TOKENS = 4


# -- no server needed -----------------------------------------------------------------------------------------------
def test_own_choices_read_the_top_1_of_vllm_prompt_logprobs():
    positions = [
        {"88": {"logprob": -16.8, "rank": 219, "decoded_token": "u"}, "430": {"logprob": -0.04, "rank": 1}},
        {"72": {"logprob": -0.01, "rank": 1, "decoded_token": "e"}},  # the prompt's token is the top-1
    ]
    assert own_choices(positions) == [430, 72]
    with pytest.raises(RSDError, match="no prompt logprobs"):
        own_choices([None])


def test_delimiter_end_finds_a_delimiter_split_over_tokens():
    text = {1: "a", 2: "\n", 3: "b", 4: "\n\n"}.get

    def decode(ids):
        return "".join(text(i) for i in ids)

    assert delimiter_end([1, 2, 2, 3], 0, "\n\n", decode) == 3
    assert delimiter_end([1, 2, 2, 3], 2, "\n\n", decode) == 3  # begins before `start`, ends after it
    assert delimiter_end([1, 2, 3, 4, 3], 0, "\n\n", decode) == 4
    assert delimiter_end([1, 2, 3], 0, "\n\n", decode) is None


def test_an_unknown_verify_choice_is_refused_before_any_request():
    with pytest.raises(RSDError, match="verify='sometimes': choose one of auto, always, never"):
        ServedStepGenerator("http://127.0.0.1:9/v1", role="target", verify="sometimes")


# -- the servers ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One copy of the committed tiny world for both sides: the committed weights may be retrained meanwhile."""
    root = tmp_path_factory.mktemp("tinyworld")
    return {
        role: Path(shutil.copytree(default_tinyworld_model(role), root / role)) for role in ("draft", "target", "prm")
    }


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """The tiny world's target served plainly and with vLLM's speculative decoding from the draft, started together.
    `speculative` is the server, or the reason it could not start (the end of its log)."""
    if VLLM_PYTHON is None:
        pytest.skip("no vLLM environment (RSD_VLLM_PYTHON)")
    logs = tmp_path_factory.mktemp("logs")
    details = ["--enable-prompt-tokens-details"]
    speculative_config = json.dumps({"model": str(models["draft"]), "num_speculative_tokens": SPECULATIVE_TOKENS})
    plain = start_vllm_server(models["target"], log_dir=logs, extra_args=details)
    speculating = start_vllm_server(
        models["target"], log_dir=logs, extra_args=[*details, "--speculative-config", speculative_config]
    )
    try:
        wait_until_ready([plain])
        try:
            wait_until_ready([speculating])
            speculative: object = speculating
        except RSDError as exc:
            speculative = str(exc)
        yield {"target": plain, "speculative": speculative}
    finally:
        plain.stop()
        speculating.stop()


@pytest.fixture(scope="module")
def target_steps(servers) -> list[tuple[list[int], list[StepOutput]]]:
    """For a few tiny-world problems, the prompt and the target's own greedy steps to the end (plain requests)."""
    plain = ServedStepGenerator(servers["target"].url, role="target", verify="never")
    out = []
    for problem in load_tinyworld(split="test", n=2, seed=0):
        prompt = plain.encode(build_prompt(DEFAULT_TEMPLATE, problem.question, plain.tokenizer))
        prefix, steps = list(prompt), []
        while len(steps) < CONFIG.max_steps:
            step = plain.generate_steps([StepRequest(problem.id, prefix, CONFIG.step_max_tokens)], GREEDY)[0]
            steps.append(step)
            prefix += step.token_ids
            if step.stop is StopReason.EOS:
                break
        out.append((prompt, steps))
    return out


def proposals_for(own: list[int], following: list[int], other: int) -> dict[str, tuple[list[int], int]]:
    """Proposals for a step whose own tokens are `own` (`following`: the next step's), with the step cap to use."""
    cap = CONFIG.step_max_tokens
    half = len(own) // 2
    return {
        "agrees fully": (own, cap),
        "agrees partly": ([*own[:half], other, *own[half + 1 :]], cap),
        "agrees not at all": ([other, *own[1:]], cap),
        "runs past the delimiter": ([*own, *following], cap),
        "diverges before the delimiter": ([*own[:-2], other, other], cap),
        "longer than the cap": (own, 6),
        "agrees fully, cap just above": (own, len(own) + 1),
    }


@pytest.mark.served
@vllm
def test_verified_rewrites_are_the_targets_own_steps(models, servers, target_steps):
    """Every proposal, at every step of two problems to their EOS: the verified step is the plain step, token for
    token, with its text and stop reason; what the server verified and kept is recorded."""
    url = servers["target"].url
    plain = ServedStepGenerator(url, role="target", verify="never")
    verifying = ServedStepGenerator(url, role="target", verify="always")
    draft = HFStepGenerator(str(models["draft"]), role="draft", device="cpu", dtype="float32")
    newline = plain.encode("\n")[-1]
    seen: dict[str, set[StopReason]] = {}
    for prompt, steps in target_steps:
        prefix = list(prompt)
        for i, step in enumerate(steps):
            own = step.token_ids
            following = steps[i + 1].token_ids if i + 1 < len(steps) else []
            other = next(t for t in (newline + 1, newline + 2) if t not in (own[0], own[len(own) // 2]))
            cases = proposals_for(own, following, other)
            cases["the draft's own step"] = (
                draft.generate_steps([StepRequest(i, prefix, 64)], GREEDY)[0].token_ids,
                64,
            )
            capped = plain.generate_steps([StepRequest(i, prefix, 6)], GREEDY)[0]
            # All cases at once: the server batches them, as it batches a run's rewrites.
            requests = [StepRequest((i, name), prefix, cap, proposal) for name, (proposal, cap) in cases.items()]
            outputs = verifying.generate_steps(requests, GREEDY)
            for (name, (proposal, cap)), got in zip(cases.items(), outputs, strict=True):
                want = step if cap > len(own) else capped
                assert (got.token_ids, got.text, got.stop) == (want.token_ids, want.text, want.stop), (name, i)
                seen.setdefault(name, set()).add(got.stop)
                check_accounting(name, got, proposal, cap)
            prefix += own
    assert seen["agrees fully"] == {StopReason.DELIMITER, StopReason.EOS}  # the last steps end at EOS
    assert seen["longer than the cap"] == {StopReason.LENGTH}


def check_accounting(name: str, got: StepOutput, proposal: list[int], cap: int) -> None:
    """What the server verified and kept, and the target's forwards (one per request token it generated)."""
    spec = got.speculation
    assert spec is not None and spec.rounds == 1, name
    assert spec.proposal_tokens <= min(len(proposal), cap - 1)
    assert 0 <= spec.from_proposal <= min(spec.proposal_tokens, len(got.token_ids))
    if name in ("agrees fully", "runs past the delimiter", "longer than the cap", "agrees fully, cap just above"):
        assert got.forwards == 1, name  # the verifying request alone wrote the step
        assert spec.from_proposal >= len(got.token_ids) - 1, name  # all but the EOS the server wrote itself
    if name == "agrees not at all":
        assert spec.from_proposal == 0 and got.forwards == len(got.token_ids), name


@pytest.mark.served
@vllm
def test_a_delimiter_split_between_the_verified_part_and_the_next_request(servers, target_steps):
    """The server looks for the delimiter in its own output only. With a delimiter whose first character ends the
    target's second-to-last token and whose rest begins its last one (as "s" + "." in "candies" + ".\n\n"), a
    proposal that diverges at the second-to-last token leaves the first half in the verified part; the next request
    writes the second half without the server seeing a delimiter, and rsd ends the step there."""
    url = servers["target"].url
    plain = ServedStepGenerator(url, role="target", verify="never")
    verifying = ServedStepGenerator(url, role="target", verify="always")

    def text(ids: list[int]) -> str:
        return plain.tokenizer.decode(ids, skip_special_tokens=True)

    split = 0
    for prompt, steps in target_steps:
        for i, step in enumerate(steps[:-1]):
            prefix = [*prompt, *(t for earlier in steps[:i] for t in earlier.token_ids)]
            before, last = text(step.token_ids[-2:-1]), text(step.token_ids[-1:])
            if not before.strip() or not last.strip():
                continue
            params = StepParams(delimiter=before[-1] + last.lstrip()[0])
            own = plain.generate_steps([StepRequest(i, prefix, 64)], params)[0].token_ids
            if len(own) < 3 or params.delimiter in text(own[-1:]) or own[-1] == own[-2]:
                continue  # the last token holds the whole delimiter: nothing is split
            split += 1
            proposal = [*own[:-2], own[-1], own[-1]]  # diverges where the delimiter's first half is
            got = verifying.generate_steps([StepRequest(i, prefix, 64, proposal)], params)[0]
            assert (got.token_ids, got.stop) == (own, StopReason.DELIMITER)
            assert got.speculation.from_proposal == len(own) - 2
            assert got.forwards > 2  # the next request went on past the delimiter it did not see
    assert split >= 2


@pytest.mark.served
@vllm
def test_auto_verifies_only_where_it_pays(servers, target_steps):
    """ "auto" (the default) verifies a proposal of at least `verify_min_tokens` tokens, on a replica with no other
    request in flight: a shorter one cannot save what the verifying request costs, and on a busy server that
    request's prefill slows the others. The steps are the same either way."""
    verifying = ServedStepGenerator(servers["target"].url, role="target")
    minimum = verifying.pool.options.verify_min_tokens
    prompt, steps = target_steps[0]
    own = steps[0].token_ids
    short = verifying.generate_steps([StepRequest("s", prompt, 64, own[: minimum - 1])], GREEDY)[0]
    long = verifying.generate_steps([StepRequest("l", prompt, 64, own[:minimum])], GREEDY)[0]
    assert short.token_ids == long.token_ids == own
    assert short.speculation is None and short.forwards == len(own)
    assert long.speculation is not None and long.speculation.from_proposal == minimum
    # Two at once: the first finds the replica idle, the second finds the first in flight.
    first, second = verifying.generate_steps([StepRequest(k, prompt, 64, own) for k in ("a", "b")], GREEDY)
    assert first.token_ids == second.token_ids == own
    assert first.speculation is not None and second.speculation is None


@pytest.mark.served
@vllm
def test_a_refused_verifying_request_leaves_rewrites_plain(servers, target_steps, caplog):
    """A server that answers the verifying request with HTTP 4xx (here: ids outside its vocabulary) gets the usual
    request for this step and every later one, with one warning; the step is the target's own."""
    verifying = ServedStepGenerator(servers["target"].url, role="target", verify="always")
    prompt, steps = target_steps[0]
    with caplog.at_level(logging.WARNING, logger="rsd.served"):
        got = verifying.generate_steps([StepRequest("r", prompt, 64, [10**6] * 12)], GREEDY)[0]
    assert (got.token_ids, got.stop) == (steps[0].token_ids, steps[0].stop)
    assert got.speculation is None and verifying.verify == "never"
    assert [r.levelno for r in caplog.records if r.name == "rsd.served"] == [logging.WARNING]


@pytest.mark.served
@vllm
def test_sampled_rewrites_ignore_the_proposal(servers, target_steps):
    """A served sampler's draws are not rsd's: with temperature > 0 the proposal is not verified; the step is the
    seeded one the plain request gives."""
    verifying = ServedStepGenerator(servers["target"].url, role="target")
    prompt, steps = target_steps[0]
    sampled = StepParams(temperature=0.8, seed=3)
    want = verifying.generate_steps([StepRequest("s", prompt, 64)], sampled)[0]
    got = verifying.generate_steps([StepRequest("s", prompt, 64, steps[0].token_ids)], sampled)[0]
    assert (got.token_ids, got.stop) == (want.token_ids, want.stop)
    assert got.speculation is None and got.forwards == len(got.token_ids)


def cli_json(args: list[str]) -> dict:
    """`rsd ARGS --json` through the same `main` as the console script."""
    from rsd.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--json"]) == 0
    return json.loads(out.getvalue())


def records(folder: Path) -> list[dict]:
    lines = (folder / "records.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: str(r["id"]))


@pytest.mark.served
@vllm
def test_rsd_eval_over_a_served_target_reports_what_verification_kept(models, servers, tmp_path):
    """`rsd eval` with the draft and PRM in process and the target served, one problem at a time (so every rewrite
    finds the server idle): `--rewrite auto` (verifying) and `plain` give the same records; the summary reports the
    proposal tokens verified and kept, and target forwards per target token below 1 (plain: exactly 1)."""
    common = ["eval", "--num-problems", "16", "--methods", "rsd", "--no-progress", "--grade-workers", "1",
              "--threads", "1", "--batch-size", "1", f"--draft={models['draft']}", f"--prm={models['prm']}",
              f"--target={servers['target'].url}"]  # fmt: skip
    summaries = {
        rewrite: cli_json([*common, "--rewrite", rewrite, "--out", str(tmp_path / rewrite)])["methods"][0]
        for rewrite in ("plain", "auto")
    }
    plain, auto = records(tmp_path / "plain"), records(tmp_path / "auto")
    assert [(r["response"], [s["kept"] for s in r["steps"]]) for r in auto] == [
        (r["response"], [s["kept"] for s in r["steps"]]) for r in plain
    ]
    assert 0 < summaries["auto"]["acceptance_rate"] < 1  # some steps rewritten
    assert "speculation" not in summaries["plain"]
    assert summaries["plain"]["target_forwards_per_target_token"] == 1.0
    spec = summaries["auto"]["speculation"]
    assert spec["proposal_tokens"] > 0 and 0 < spec["tokens_from_proposal"] <= spec["proposal_tokens"]
    assert spec["rounds"] > 0  # verifying requests, one per verified rewrite
    assert summaries["auto"]["target_forwards_per_target_token"] < 1.0


def speculating_server(servers):
    server = servers["speculative"]
    if isinstance(server, str):
        pytest.skip(f"vLLM CPU did not start a server with --speculative-config: {server}")
    return server


@pytest.fixture
def one_torch_thread():
    """The in-process models beside the servers: one thread, as `rsd eval` uses for the tiny world."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.served
@vllm
def test_rsd_runs_against_a_vllm_server_that_speculates_with_the_draft(models, servers, target_steps, one_torch_thread):
    """The target served with `--speculative-config` (the draft proposing 4 tokens a round): its greedy steps are
    the plain server's, token for token, with rewrites not verified there by default (and the same when verified);
    RSD over it (draft and PRM in process) gives the same trajectories; the server's /metrics show that it
    speculated and kept draft tokens."""
    server = speculating_server(servers)
    speculating = ServedStepGenerator(server.url, role="target")
    always = ServedStepGenerator(server.url, role="target", verify="always")
    assert speculating.speculating and not ServedStepGenerator(servers["target"].url, role="target").speculating
    for prompt, steps in target_steps:
        prefix = list(prompt)
        for i, step in enumerate(steps):
            half = [*step.token_ids[: len(step.token_ids) // 2], 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]
            got = speculating.generate_steps([StepRequest(i, prefix, 64, half)], GREEDY)[0]
            assert (got.token_ids, got.text, got.stop) == (step.token_ids, step.text, step.stop)
            assert got.speculation is None  # the server speculates itself: its rewrites are not verified first
            verified = always.generate_steps([StepRequest(i, prefix, 64, half)], GREEDY)[0]
            assert (verified.token_ids, verified.stop) == (step.token_ids, step.stop)
            assert verified.speculation.from_proposal == len(step.token_ids) // 2
            prefix += step.token_ids
    draft = HFStepGenerator(str(models["draft"]), role="draft", device="cpu", dtype="float32")
    prm = load_prm(str(models["prm"]), device="cpu", dtype="float32")
    problems = [
        Prompted(p.id, p.question, build_prompt(DEFAULT_TEMPLATE, p.question, draft.tokenizer))
        for p in load_tinyworld(split="test", n=8, seed=1)
    ]
    runs = {}
    for name, url in (("plain", servers["target"].url), ("speculating", server.url)):
        target = ServedStepGenerator(url, role="target")  # verifying rejected steps on the plain server only
        runs[name] = AsyncStepwiseDecoder(draft, CONFIG, prm, target, Threshold(DEFAULT_DELTA)).run(problems)
    assert [t.text for t in runs["speculating"]] == [t.text for t in runs["plain"]]
    assert any(not step.kept for traj in runs["plain"] for step in traj.steps)
    drafted = prometheus_counter(server.root, "vllm:spec_decode_num_draft_tokens_total")
    accepted = prometheus_counter(server.root, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted
