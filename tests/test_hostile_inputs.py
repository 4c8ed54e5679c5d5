"""Hostile and careless input, typed as a new user would: every refusal is one line on stderr, comes before any model
loads, and leaves finished work as it was; a second process, a crash or an edited data file never loses, doubles or
reuses a result.

Everything runs the real `rsd` command in subprocesses, on the built-in tiny world. Refusals run with "poisoned"
model folders (a config.json no library can load): a refusal that names the input and not the model shows that the
input was checked before any model loaded.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsd.eval.files import FolderLock

RSD = [sys.executable, "-m", "rsd.cli"]
REFUSE_WITHIN_S = 10.0  # "before models load": generous for two busy cores
DATA_DIR = Path(os.environ.get("RSD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA_DIR / "gsm8k").is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
# Fast tiny-world runs: the draft alone, graded in-process.
SMALL = ["--methods", "draft", "--no-progress", "--grade-workers", "0"]
# The tiny world's models, named, for problems other than its own task.
TINY_MODELS = ["--draft", "tinyworld", "--target", "tinyworld", "--prm", "tinyworld"]


def run_rsd(*args: object, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [*RSD, *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    return result, time.perf_counter() - started


def assert_refused(result: subprocess.CompletedProcess, seconds: float, *fragments: str) -> str:
    """Exit status 2, one line on stderr naming the problem, no traceback, in well under the time of a model load."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("rsd")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert seconds < REFUSE_WITHIN_S, f"{seconds:.1f} s to refuse"
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".rsd.lock"}


def records_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def assert_each_problem_once(folder: Path, problems: int, methods: int = 1) -> None:
    """Nothing finished lost or counted twice: the summary counts each problem once per method."""
    summary = summary_of(folder)
    assert [m["n"] for m in summary["methods"]] == [problems] * methods
    assert summary["records"]["counted"] == problems * methods


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def poisoned(root) -> list[str]:
    """--draft/--target/--prm folders that exist but cannot load: reaching a model turns a refusal into another."""
    args = []
    for role in ("draft", "target", "prm"):
        folder = root / "poisoned" / role
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
        args += [f"--{role}", str(folder)]
    return args


@pytest.fixture(scope="module")
def finished(root) -> tuple[Path, list[str]]:
    """A finished tiny-world run and the command that made it."""
    args = ["eval", "--num-problems", 3, *SMALL, "--out", root / "finished"]
    result, _ = run_rsd(*args)
    assert result.returncode == 0, result.stderr
    return root / "finished", [str(a) for a in args]


@pytest.fixture(scope="module")
def shards(root) -> list[Path]:
    folders = []
    for i in range(2):
        folder = root / f"shard{i}"
        result, _ = run_rsd("eval", "--num-problems", 4, *SMALL, "--shard", f"{i}/2", "--out", folder)
        assert result.returncode == 0, result.stderr
        folders.append(folder)
    return folders


def data_file(path: Path, rows: list[dict] | None = None, raw: bytes | None = None) -> Path:
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


# -- arguments: numbers, counts, URLs, options that do not apply ---------------------------------------------------
ARGUMENT_CASES = [
    (["--num-problems", "0"], "--num-problems 0"),
    (["--num-problems", "-2"], "--num-problems -2"),
    (["--n", "0"], "--n 0"),
    (["--delta", "nan"], "--delta nan"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--top-p", "inf"], "--top-p inf"),
    (["--alpha=-inf"], "--alpha -inf"),
    (["--sample-temperature", "-1"], "--sample-temperature -1"),
    (["--max-steps", "0"], "--max-steps 0"),
    (["--batch-size", "-1"], "--batch-size -1"),
    (["--shard", "2/2"], "--shard '2/2'"),
    (["--delimiter", "\\x"], "--delimiter"),
    (["--template", "no-such-template"], "unknown template"),
    (["--question-field", "q"], "tinyworld"),
    (["--dataset", "gsm8k", "--problem-seed", "3"], "--problem-seed"),
    (["--draft", "http://localhost:99999/v1"], "Port out of range"),
    (["--target", "http://localhost:80a/v1"], "could not be cast"),
    (["--prm", "ftp://host:8000/v1"], "http:// or https://"),
    (["--draft", "localhost:8000/v1"], "without its scheme"),
    (["--device", "gpu"], "--device gpu"),
    (["--dtype", "fp16"], "--dtype fp16"),
    (["--num-problems", "x"], "invalid int value"),
]


@pytest.mark.parametrize(("extra", "fragment"), ARGUMENT_CASES, ids=[" ".join(c[0]) for c in ARGUMENT_CASES])
def test_bad_arguments_are_refused_in_one_line_before_models(root, poisoned, extra, fragment):
    out = root / "never-written"
    result, seconds = run_rsd("eval", *poisoned, "--out", out, *extra)
    assert_refused(result, seconds, fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        (["sweep", "--deltas", "0.5,nan"], "--deltas"),
        (["calibrate", "--target-share", "nan"], "--target-share nan"),
        (["calibrate", "--rounds", "-1"], "--rounds -1"),
        (["calibrate", "--tolerance", "0"], "--tolerance 0"),
        (["generate", "--question", "x" * 20_001], "20,001 characters"),
        (["generate", "--question", "  "], "--question is empty"),
        (["generate", "--question", "1+1?", "--top-p", "nan"], "--top-p nan"),
    ],
    ids=["sweep-deltas", "calibrate-share", "calibrate-rounds", "calibrate-tolerance", "long", "empty", "top-p"],
)
def test_every_command_checks_its_numbers_first(poisoned, command, fragment):
    result, seconds = run_rsd(*command, *poisoned)
    assert_refused(result, seconds, fragment)


# -- data files and templates --------------------------------------------------------------------------------------
def test_a_data_file_that_is_not_utf8_is_one_line(root, poisoned):
    path = data_file(
        root / "latin1.jsonl", raw=b'{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9", "answer": "1"}\n'
    )
    result, seconds = run_rsd("eval", *poisoned, "--dataset", path, "--out", root / "x")
    assert_refused(result, seconds, f"{path} line 2 is not UTF-8", "0xe9")


@pytest.mark.skipif(sys.platform != "linux", reason="reads ru_maxrss in KiB, as Linux reports it")
def test_a_question_over_the_bound_is_refused_and_memory_stays_bounded(root, poisoned):
    long = data_file(root / "long.jsonl", [{"question": "x" * 100_000, "answer": "1"}])
    result, seconds = run_rsd("eval", *poisoned, "--dataset", long, "--out", root / "x")
    assert_refused(result, seconds, "100,000 characters", "--max-question-chars")

    def peak_mib(path: Path) -> tuple[float, subprocess.CompletedProcess]:
        """The child's peak memory, read by a wrapper process of its own (this one ran other children)."""
        wrapper = (
            "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr)"
        )
        args = [sys.executable, "-c", wrapper, *RSD, "eval", *poisoned, "--dataset", str(path), "--out", "x"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=root)
        return int(done.stdout.strip()) / 1024, done

    small, _ = peak_mib(data_file(root / "small-bad.jsonl", raw=b"{not json\n"))
    huge_path = root / "huge.jsonl"
    with huge_path.open("wb") as f:  # one 64 MiB line: a reader that holds it whole needs 64 MiB and more
        f.write(b'{"question": "')
        for _ in range(64):
            f.write(b"x" * 2**20)
        f.write(b'", "answer": "1"}\n')
    huge, done = peak_mib(huge_path)
    assert done.returncode == 0 and "longer than" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert huge - small < 40, f"peak memory grew by {huge - small:.0f} MiB for a 64 MiB line"


@pytest.mark.parametrize(
    ("rows", "extra", "fragment"),
    [
        ([{"q": "1+1?", "a": "2"}], ["--question-field", "nope", "--answer-field", "a"], "no field 'nope'"),
        ([{"id": "7", "question": "A?", "answer": "1"}, {"id": "7", "question": "B?", "answer": "2"}], ["--strict"],
         "'7' on lines 1, 2"),
        (None, [], "not found"),
    ],
    ids=["missing-field", "duplicate-ids-strict", "missing-file"],
)  # fmt: skip
def test_data_problems_are_one_line(root, poisoned, rows, extra, fragment):
    path = data_file(root / "rows.jsonl", rows) if rows is not None else root / "nope.jsonl"
    result, seconds = run_rsd("eval", *poisoned, "--dataset", path, "--out", root / "x", *extra)
    assert_refused(result, seconds, fragment)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"Q: {question}\n\xff\xfe", "is not UTF-8"), (b"no placeholder here", "no {question} placeholder")],
    ids=["not-utf8", "no-placeholder"],
)
def test_template_files_are_checked_before_models(root, poisoned, content, fragment):
    template = root / "template.txt"
    template.write_bytes(content)
    result, seconds = run_rsd("eval", *poisoned, "--template", template, "--out", root / "x")
    assert_refused(result, seconds, str(template), fragment)


@needs_data
def test_field_options_on_a_builtin_benchmark_keep_its_rules_or_are_refused(poisoned):
    from rsd.eval.datasets import load_problems

    mmlu = load_problems("mmlu_stem", data_dir=DATA_DIR, question_field="question", limit=1)[0]
    assert mmlu.answer == "C" and "\nAnswer Choices: (A)" in mmlu.question  # still a letter, still the choices
    gsm8k = load_problems("gsm8k", data_dir=DATA_DIR, answer_field="answer", limit=1)[0]
    assert gsm8k.answer == "18"  # still the text after ####, not the whole solution
    result, seconds = run_rsd(
        "eval", *poisoned, "--dataset", "mmlu_stem", "--data-dir", DATA_DIR, "--answer-field", "question"
    )
    assert_refused(result, seconds, "field 'question' is not an index into the 4 choices")


def test_repeated_ids_are_named_in_a_warning(tmp_path, caplog):
    from rsd.eval.datasets import load_problems

    rows = [{"id": "7", "question": "A?", "answer": "1"}, {"id": "7", "question": "B?", "answer": "2"}]
    with caplog.at_level("WARNING", logger="rsd.eval.datasets"):
        problems = load_problems(data_file(tmp_path / "dup.jsonl", rows))
    assert [p.id for p in problems] == ["7@line1", "7@line2"]
    assert "1 id(s) repeated" in caplog.text and "'7' on lines 1, 2" in caplog.text


# -- the output folder --------------------------------------------------------------------------------------------
def test_out_folders_that_cannot_hold_a_run_are_refused(root, poisoned, finished):
    a_file = root / "a-file"
    a_file.write_text("mine")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    orphan = root / "orphan"
    orphan.mkdir()
    shutil.copy(finished[0] / "records.jsonl", orphan / "records.jsonl")
    cases = [
        (a_file, "is a file, not a folder"),
        (a_file / "sub", "cannot be created (Not a directory)"),
        (foreign, "is not an rsd run folder (it holds notes.txt)"),
        (orphan, "holds records.jsonl but no config.json"),
        (finished[0], "another configuration"),
    ]
    for out, fragment in cases:
        before = snapshot(out) if out.is_dir() else None
        result, seconds = run_rsd("eval", *poisoned, "--out", out)
        assert_refused(result, seconds, fragment)
        assert before is None or snapshot(out) == before
    assert a_file.read_text() == "mine"


def test_a_run_that_fails_before_its_first_record_leaves_no_folder(root, poisoned):
    out = root / "failed-at-load"
    result, _ = run_rsd("eval", *poisoned, "--num-problems", "2", "--out", out)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "could not load the draft tokenizer" in result.stderr  # the checks passed; the model itself failed
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_out_folder_is_refused(root, poisoned):
    locked = root / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result, seconds = run_rsd("eval", *poisoned, "--out", locked)
        assert_refused(result, seconds, "cannot write in", str(locked))
    finally:
        locked.chmod(0o755)


def test_a_corrupt_middle_line_names_file_and_line_and_loses_nothing(root, finished):
    folder, args = finished
    copy = root / "corrupt"
    shutil.copytree(folder, copy)
    lines = (copy / "records.jsonl").read_bytes().split(b"\n")
    lines[1] = lines[1][:40] + b"\n" + lines[1][60:]  # line 2 broken in two
    (copy / "records.jsonl").write_bytes(b"\n".join(lines))
    before = snapshot(copy)
    result, seconds = run_rsd(*args[: args.index("--out")], "--out", copy)
    assert_refused(result, seconds, f"{copy / 'records.jsonl'} line 2 is not a complete record", "delete that line")
    assert snapshot(copy) == before


def test_a_cut_last_line_is_repaired_and_said(root, finished):
    folder, args = finished
    copy = root / "cut"
    shutil.copytree(folder, copy)
    data = (copy / "records.jsonl").read_bytes()
    (copy / "records.jsonl").write_bytes(data[:-200])  # a kill in the middle of the third record
    result, _ = run_rsd(*args[: args.index("--out")], "--out", copy)
    assert result.returncode == 0, result.stderr
    assert "line 3 was cut off" in result.stderr
    assert_each_problem_once(copy, 3)
    assert [r["id"] for r in records_of(copy)] == [r["id"] for r in records_of(folder)]


def test_the_summary_counts_a_doubled_record_once(root, finished):
    folder, args = finished
    copy = root / "doubled"
    shutil.copytree(folder, copy)
    with (copy / "records.jsonl").open("a") as f:
        f.write((folder / "records.jsonl").read_text().splitlines()[0] + "\n")
    result, _ = run_rsd(*args[: args.index("--out")], "--out", copy)
    assert result.returncode == 0, result.stderr
    assert "1 earlier duplicate record(s)" in result.stderr
    assert_each_problem_once(copy, 3)
    assert summary_of(copy)["records"]["duplicates_ignored"] == 1
    assert summary_of(copy)["methods"] == summary_of(folder)["methods"]


# -- rsd merge ----------------------------------------------------------------------------------------------------
def test_merge_never_replaces_a_folder_and_names_what_is_missing(root, shards, finished):
    before = snapshot(finished[0])
    result, seconds = run_rsd("merge", *shards, "--out", finished[0])
    assert_refused(result, seconds, "exists and is not empty")
    assert snapshot(finished[0]) == before
    result, seconds = run_rsd("merge", shards[0], "--out", root / "merged-partial")
    assert_refused(result, seconds, "shard 1/2 is missing", "--partial")
    assert not (root / "merged-partial").exists()
    result, seconds = run_rsd("merge", shards[0], root, "--out", root / "m")
    assert_refused(result, seconds, f"{root} is not an rsd run folder")
    result, _ = run_rsd("merge", shards[0], "--out", root / "merged-partial", "--partial", "--json")
    assert result.returncode == 0, result.stderr
    summary = summary_of(root / "merged-partial")
    assert summary["config"]["missing_shards"] == ["1/2"] and summary["methods"][0]["n"] == 2
    assert "partial: shard 1/2 missing" in (root / "merged-partial" / "report.md").read_text()


def test_merge_refuses_a_shard_cut_inside_a_character_or_with_a_corrupt_line(root, shards):
    cut = root / "shard1-cut"
    shutil.copytree(shards[1], cut)
    records = records_of(cut)
    records[-1]["question"] = "Zoë hat 3 Äpfel."
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    (cut / "records.jsonl").write_bytes(text[: text.rindex("ë".encode()) + 1])  # half of the two bytes of ë
    result, seconds = run_rsd("merge", shards[0], cut, "--out", root / "m")
    assert_refused(result, seconds, f"shard {cut} is unfinished", "line 2 was cut off")

    broken = root / "shard1-broken"
    shutil.copytree(shards[1], broken)
    lines = (broken / "records.jsonl").read_text().splitlines()
    (broken / "records.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    result, seconds = run_rsd("merge", shards[0], broken, "--out", root / "m")
    assert_refused(result, seconds, f"{broken / 'records.jsonl'} line 1 is not a complete record")
    assert not (root / "m").exists()


def test_merge_refuses_a_shard_that_is_being_written(root, shards):
    with FolderLock(shards[1]).acquire("test"):
        result, seconds = run_rsd("merge", *shards, "--out", root / "m")
    assert_refused(result, seconds, f"{shards[1]} is in use by pid {os.getpid()}")


def test_a_merge_killed_mid_write_leaves_no_part_of_a_run(root, shards):
    out = root / "merged-killed"
    for attempt in range(3):
        if attempt == 1:
            out.mkdir()  # an empty folder given as --out must stay empty
        proc = subprocess.Popen([*RSD, "merge", *map(str, shards), "--out", str(out)], stderr=subprocess.DEVNULL)
        building = root / f".merged-killed.merging-{proc.pid}"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not building.exists():
            time.sleep(0.002)
        time.sleep(0.05 * attempt)  # as the writing starts, and a little later
        assert proc.poll() is None, "the merge ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists() or not any(out.iterdir()), "a killed merge left a part of a run at --out"
    result, _ = run_rsd("merge", *shards, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "left by a merge that was killed" in result.stderr
    assert not list(root.glob(".merged-killed.merging-*"))
    assert summary_of(out)["methods"][0]["n"] == 4 and len(records_of(out)) == 4


# -- rsd grade ----------------------------------------------------------------------------------------------------
def test_grade_checks_its_output_before_grading(root):
    rows = data_file(root / "graded.jsonl", [{"gold": "2", "response": "\\boxed{2}"}] * 3)
    a_file = root / "grade-file"
    a_file.write_text("x")
    for output, fragment in ((root, "is a folder"), (a_file / "out.jsonl", "cannot be written")):
        result, seconds = run_rsd(
            "grade", rows, "--gold-field", "gold", "--response-field", "response", "--output", output
        )
        assert_refused(result, seconds, "--output", fragment)
    result, seconds = run_rsd("grade", data_file(root / "bad.jsonl", raw=b'{"gold": "\xff"}\n'), "--gold-field", "g",
                              "--response-field", "r")  # fmt: skip
    assert_refused(result, seconds, "line 1 is not UTF-8")
    result, seconds = run_rsd("grade", rows, "--gold-field", "gold", "--response-field", "response", "--timeout", "inf")
    assert_refused(result, seconds, "--timeout inf")


# -- tracebacks only when asked -------------------------------------------------------------------------------------
def test_debug_shows_the_traceback(poisoned):
    for extra, env in ((["--debug"], None), ([], {"RSD_DEBUG": "1"})):
        result, _ = run_rsd("eval", *poisoned, "--num-problems", "0", *extra, env=env)
        assert result.returncode == 2
        assert "Traceback" in result.stderr and "RSDError" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("rsd: error: --num-problems 0")


# -- processes: two writers, an edited data file, Ctrl-C -------------------------------------------------------------
def test_two_writers_on_one_folder_one_refused_nothing_doubled(root):
    out = root / "two-writers"
    args = [*RSD, "eval", "--num-problems", "3", *SMALL, "--out", str(out)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(refused.strip().splitlines()) == 1 and f"{out} is in use by pid" in refused
    assert any(str(p.pid) in refused for p in procs) and "rsd eval --num-problems 3" in refused
    assert_each_problem_once(out, 3)
    assert len(records_of(out)) == 3


def test_an_edited_data_row_is_run_again_never_reused(root):
    from rsd.tinyworld.task import load_tinyworld

    problems = [{"question": p.question, "answer": str(p.answer)} for p in load_tinyworld(n=4)]
    path = data_file(root / "edited.jsonl", problems[:3])  # ids are line numbers: no id field
    out = root / "edited-run"
    args = ["eval", "--dataset", path, *TINY_MODELS, *SMALL, "--out", out]
    assert run_rsd(*args)[0].returncode == 0
    first = {r["id"]: r for r in records_of(out)}

    problems[1]["answer"] = "-1"  # a gold edited: the old verdict must not be reused
    data_file(path, [problems[3], *problems[:3]])  # and a row inserted on top: every line-number id moves
    result, _ = run_rsd(*args)
    assert result.returncode == 0, result.stderr
    assert "3 record(s) of problems whose question, gold or prompt changed" in result.stderr
    assert_each_problem_once(out, 4)
    fresh = root / "edited-fresh"
    assert run_rsd("eval", "--dataset", path, *TINY_MODELS, *SMALL, "--out", fresh)[0].returncode == 0
    assert summary_of(out)["methods"][0]["correct"] == summary_of(fresh)["methods"][0]["correct"]
    latest = {r["id"]: r for r in records_of(out)}
    assert latest["2"]["question"] == first["1"]["question"] != first["2"]["question"]
    assert latest["3"]["gold"] == "-1" and latest["3"]["correct"] is False


def test_ctrl_c_names_the_folder_and_the_command_that_resumes(root):
    out = root / "interrupted"
    args = ["eval", "--num-problems", "16", "--batch-size", "1", *SMALL]
    proc = subprocess.Popen([*RSD, *args, "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "records.jsonl").exists() and (out / "records.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted; make it longer"
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130
    line = stderr.strip().splitlines()[-1]
    assert f"finished problems are saved in {out}" in line and "Traceback" not in stderr
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "rsd" and command[1:] == [*args, "--out", str(out)]
    result, _ = run_rsd(*command[1:])
    assert result.returncode == 0, result.stderr
    assert_each_problem_once(out, 16)


@needs_data
def test_shards_of_a_real_benchmark_merge_as_documented(root):
    args = ["eval", "--dataset", "gsm8k", "--data-dir", DATA_DIR, "--num-problems", "4", *TINY_MODELS, *SMALL]
    args += ["--max-new-tokens", "16"]
    for i in range(2):
        assert run_rsd(*args, "--shard", f"{i}/2", "--out", root / f"gsm8k-{i}")[0].returncode == 0
    result, _ = run_rsd("merge", root / "gsm8k-0", root / "gsm8k-1", "--out", root / "gsm8k")
    assert result.returncode == 0, result.stderr
    assert summary_of(root / "gsm8k")["methods"][0]["n"] == 4
    assert sorted(r["gold"] for r in records_of(root / "gsm8k")) == sorted(["18", "3", "70000", "540"])


def test_finish_reasons_are_counted_in_the_summary():
    from rsd.eval.report import finish_reason_note, report_markdown, summarize

    tokens = {"draft_kept": 1, "draft_discarded": 0, "target": 0, "prm": 0}
    stats = {"steps_kept": 1, "steps_rejected": 0, "num_steps": 1, "steps_target_only": 0, "tokens": tokens}
    stats |= {"flops": {}, "wall_time_s": {}}
    records = [
        {"method": "rsd", "id": str(i), "correct": True, "finish_reason": reason, "stats": stats}
        for i, reason in enumerate(["eos", "eos", "context", "max_new_tokens"])
    ]
    [summary] = summarize(records, ["rsd"])
    assert summary["finish_reasons"] == {"context": 1, "eos": 2, "max_new_tokens": 1}
    assert finish_reason_note([summary]) == "problems by finish reason: rsd 1 context, 2 eos, 1 max_new_tokens"
    assert "1 context" in report_markdown("t", [summary], {})
    only_eos = summarize(records[:2], ["rsd"])
    assert finish_reason_note(only_eos) is None
