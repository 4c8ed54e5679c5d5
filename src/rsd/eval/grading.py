"""Grading: answer extraction, equivalence by math-verify in worker processes, majority vote, best-of-N.

Extraction reads the last `\\boxed{}` (or `\\fbox{}`) of a response, then falls back to "the answer is X" and
finally to the last number, the order of the Qwen2.5-Math evaluation suite. Equivalence is math-verify's
`verify(parse(gold), parse(answer))`, gold first (the comparison is not symmetric).

math-verify guards itself with `signal.alarm`, which works only in a main thread, and its timeout exception
derives from BaseException; sympy can also hang inside C code where no alarm reaches. So every comparison
runs in a worker process of `GradingPool`, under a deadline of our own: a worker past its deadline is killed
and replaced, and its item counts as wrong.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import wait
from pathlib import Path

from rsd.core import RSDError

DEFAULT_TIMEOUT = 10.0  # seconds per comparison; sympy finishes real answers in well under one
DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))
CHOICE_LETTERS = "ABCDE"  # more would turn a roman "(I)" or a pronoun "I" into a choice

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Extraction


def _braced_content(text: str, open_at: int) -> str | None:
    """The text inside the brace group that opens at `open_at`, nested braces included; None if unclosed."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), None when there is none."""
    starts = [(m.start(), m.end()) for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text)]
    for _start, end in reversed(starts):
        rest = text[end:]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            content = _braced_content(text, end + len(rest) - len(stripped))
            if content is not None:
                return content.strip()
        elif rest[:1] == " ":
            # `\boxed 5$`: the argument runs to the end of the math or of the line.
            return re.split(r"[$\n]", stripped, maxsplit=1)[0].strip()
    return None


_ANSWER_TRIGGERS = re.compile(r"(?:[Tt]he (?:final )?answer is|[Ff]inal [Aa]nswer:|答案是)\s*:?\s*")
_NUMBER = re.compile(r"-?\d*\.?\d+")


def _after_trigger(text: str) -> str | None:
    """The answer after the last "the answer is" / "Final answer:", up to the end of its sentence."""
    matches = list(_ANSWER_TRIGGERS.finditer(text))
    if not matches:
        return None
    tail = text[matches[-1].end() :]
    inline = re.match(r"\$\$?(.+?)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", tail, flags=re.DOTALL)
    if inline:
        return next(g for g in inline.groups() if g is not None).strip()
    # Plain text: up to the end of the line, less a closing full stop ("is 42." -> "42").
    return re.split(r"\n|\.\s|\.$", tail.strip(), maxsplit=1)[0].strip()


def _clean(answer: str) -> str:
    answer = answer.strip()
    answer = re.sub(r"^\$+|\$+$", "", answer).strip()
    return answer.rstrip(".").strip()


def extract_answer(response: str) -> str:
    """The final answer of a response: last boxed, else "the answer is X", else the last number, else ""."""
    boxed = last_boxed(response)
    if boxed is not None:
        return _clean(boxed)
    stated = _after_trigger(response)
    if stated:
        return _clean(stated)
    numbers = _NUMBER.findall(response.replace(",", ""))
    return numbers[-1] if numbers else ""


_LETTER = f"[{CHOICE_LETTERS}]"
_MACRO_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def _standalone_letters(text: str) -> list[str]:
    return re.findall(rf"(?<![A-Za-z]){_LETTER}(?![A-Za-z])", text)


def extract_choice(response: str) -> str:
    """The letter a multiple-choice response picks ("A".."E"), or "" when it names none.

    Looks at the last boxed answer, then "the answer is (X)", then the last "(X)", then a final line that is
    only a letter. Letters must be capitals: a lowercase "a" is an article, not a choice.
    """
    boxed = last_boxed(response)
    if boxed is not None:
        letters = _standalone_letters(_MACRO_TEXT.sub(r"\1", boxed))
        if letters:
            return letters[0]
    stated = re.findall(rf"(?i:answer is):?\s*\(?({_LETTER})(?![A-Za-z])", response)
    if stated:
        return stated[-1]
    parenthesized = re.findall(rf"\(({_LETTER})\)", response)
    if parenthesized:
        return parenthesized[-1]
    lines = response.strip().splitlines()
    alone = re.fullmatch(rf"\W*({_LETTER})\W*", lines[-1]) if lines else None
    return alone.group(1) if alone else ""


_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|\s+")


def normalize_answer(answer: str) -> str:
    """A light canonical form: equal strings are surely equivalent (a fast path and the vote's first key)."""
    s = _clean(str(answer))
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _MACRO_TEXT.sub(r"\1", s)
    s = _SPACING.sub("", s)
    return s.rstrip(".")


# ----------------------------------------------------------------------------------------------------------
# Equivalence (runs inside the worker processes)


@lru_cache(maxsize=4096)
def _parsed(answer: str, alarm_s: int | None) -> list:
    from math_verify import parse

    # "$...$" makes math-verify read the whole string as one LaTeX expression.
    return parse(f"${answer}$", parsing_timeout=alarm_s)


def _equivalent(gold: str, answer: str, alarm_s: int | None = None) -> bool:
    """math-verify's verdict on an extracted answer, gold first; `alarm_s` is its own (main-thread) alarm."""
    from math_verify import verify

    if not answer.strip() or not gold.strip():
        return False
    if normalize_answer(gold) == normalize_answer(answer):
        return True
    parsed_gold, parsed_answer = _parsed(gold, alarm_s), _parsed(answer, alarm_s)
    if not parsed_gold or not parsed_answer:
        return False
    return bool(verify(parsed_gold, parsed_answer, timeout_seconds=alarm_s))


_READY = "ready"


def _limit_cpu(seconds: float) -> None:
    """Let the kernel end this worker after `seconds` more CPU seconds, even deep inside C code.

    The parent's deadline (wall time, which CPU time cannot outrun) normally comes first; this is the backstop
    for a worker whose parent died mid-item and so can neither kill it nor close its stdin.
    """
    try:
        import resource
    except ImportError:  # not POSIX: the parent's kill is the only deadline
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if hard == resource.RLIM_INFINITY or soft <= hard:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def serve_worker() -> None:
    """A grading worker's main loop: JSON [gold, answer, cpu budget] lines on stdin, "1"/"0" lines on stdout."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Our parent enforces deadlines by killing us, so math-verify's alarms stay off; its warnings about that
    # and about each swallowed parse error would only be noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # a stray print from a library must not corrupt the channel
    _equivalent("1/2", "0.5")  # imports sympy and builds the parsers before the handshake, outside any deadline
    channel.write(_READY + "\n")
    for line in sys.stdin:  # EOF (the parent closed the pipe or died) ends the loop
        gold, answer, cpu_budget_s = json.loads(line)
        _limit_cpu(cpu_budget_s)
        try:
            verdict = _equivalent(gold, answer)
        except BaseException:  # math-verify's TimeoutException is a BaseException; any failure means "wrong"
            verdict = False
        channel.write("1\n" if verdict else "0\n")


# ----------------------------------------------------------------------------------------------------------
# The worker pool

# The package's own folder goes last on the worker's path: found even when the parent imported rsd from a path
# it added itself, never shadowing anything the interpreter would find first.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_WORKER_COMMAND = [
    sys.executable,
    "-c",
    f"import sys; sys.path.append({_PACKAGE_ROOT!r}); from rsd.eval.grading import serve_worker; serve_worker()",
]
_STARTUP_TIMEOUT_S = 120.0  # a cold import of sympy on a slow disk
_ORPHAN_GRACE_S = 10.0  # CPU seconds past the deadline after which a worker ends itself (see `_limit_cpu`)


@dataclass
class _Worker:
    process: subprocess.Popen
    item: int | None = None  # the index it is working on
    deadline: float = math.inf


@dataclass
class GradingPool:
    """Worker processes that compare (gold, answer) pairs, each comparison under a `timeout` in seconds.

    A worker past its deadline is killed and replaced; its pair counts as not equivalent and its index is
    recorded in `timed_out`. Workers are fresh interpreters (`python -c`), not forks: no torch threads or
    CUDA state copied from the parent, and no re-import of the caller's `__main__`. `workers=0` compares in
    this process instead (no hard deadline; math-verify's own alarm applies when this is the main thread).
    Use as a context manager, or call `close()`.
    """

    workers: int = DEFAULT_WORKERS
    timeout: float = DEFAULT_TIMEOUT
    timed_out: list[int] = field(default_factory=list, init=False)
    _pool: list[_Worker] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise RSDError(f"workers must be >= 0 (got {self.workers}); use 0 to grade in this process.")
        if not self.timeout > 0:
            raise RSDError(f"the grading timeout must be > 0 seconds (got {self.timeout}).")

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._pool:
            self._stop(worker)
        self._pool.clear()

    def compare(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each answer is equivalent to its gold; `timed_out` lists the indices that ran out of time."""
        self.timed_out = []
        if not pairs:
            return []
        if self.workers == 0:
            return self._compare_inline(pairs)
        return self._compare_in_workers(pairs)

    def _compare_inline(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        in_main = threading.current_thread() is threading.main_thread()
        alarm_s = max(1, math.ceil(self.timeout)) if in_main else None
        verdicts = []
        for gold, answer in pairs:
            try:
                verdicts.append(_equivalent(str(gold), str(answer), alarm_s))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # math-verify's TimeoutException is a BaseException
                verdicts.append(False)
        return verdicts

    def _compare_in_workers(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        verdicts = [False] * len(pairs)
        pending = deque(range(len(pairs)))
        self._grow(min(self.workers, len(pairs)))
        while pending or any(w.item is not None for w in self._pool):
            for worker in self._pool:
                if worker.item is None and pending:
                    self._assign(worker, pending.popleft(), pairs)
            busy = [w for w in self._pool if w.item is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.process.stdout for w in busy], timeout=wait_s)
            for worker in busy:
                if worker.process.stdout in ready:
                    self._collect(worker, verdicts)
                elif time.monotonic() >= worker.deadline:
                    self.timed_out.append(worker.item)
                    self._replace(worker)
        self.timed_out.sort()
        return verdicts

    def _grow(self, size: int) -> None:
        fresh = [self._launch() for _ in range(size - len(self._pool))]
        try:
            for process in fresh:  # launched together, so their imports overlap
                self._pool.append(_Worker(self._handshake(process)))
        finally:
            started = {w.process for w in self._pool}
            for process in fresh:  # after a failed handshake, stop the ones not yet in the pool
                if process not in started:
                    self._stop(_Worker(process))

    def _assign(self, worker: _Worker, item: int, pairs: Sequence[tuple[str, str]]) -> None:
        gold, answer = pairs[item]
        worker.item, worker.deadline = item, time.monotonic() + self.timeout
        try:
            task = [str(gold), str(answer), self.timeout + _ORPHAN_GRACE_S]
            worker.process.stdin.write(json.dumps(task) + "\n")
            worker.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died between items: the next wait sees its closed pipe and `_collect` replaces it

    def _collect(self, worker: _Worker, verdicts: list[bool]) -> None:
        line = worker.process.stdout.readline()
        if line.strip() in ("0", "1"):
            verdicts[worker.item] = line.strip() == "1"
            worker.item, worker.deadline = None, math.inf
        else:  # it crashed on this item (sympy recursion, memory): the item is wrong, the pool goes on
            logger.warning("a grading worker died on item %d; counting that answer as wrong", worker.item)
            self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        self._stop(worker)
        worker.process, worker.item, worker.deadline = self._handshake(self._launch()), None, math.inf

    @staticmethod
    def _launch() -> subprocess.Popen:
        try:
            return subprocess.Popen(
                _WORKER_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            )
        except OSError as exc:
            raise RSDError(f"cannot start a grading worker ({exc}); pass workers=0 to grade in-process.") from exc

    @staticmethod
    def _handshake(process: subprocess.Popen) -> subprocess.Popen:
        ready = wait([process.stdout], timeout=_STARTUP_TIMEOUT_S)
        if not ready or process.stdout.readline().strip() != _READY:
            process.kill()
            process.wait()
            raise RSDError(
                f"a grading worker ({_WORKER_COMMAND[0]} -c ...) failed to start (exit code "
                f"{process.returncode}); check that math-verify imports in this environment, or pass workers=0."
            )
        return process

    @staticmethod
    def _stop(worker: _Worker) -> None:
        # A worker holds no state worth a clean exit, and letting sympy's interpreter shut down takes longer.
        process = worker.process
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(BrokenPipeError, OSError):
                stream.close()


# ----------------------------------------------------------------------------------------------------------
# Grading


def _per_item(flag: bool | Sequence[bool], n: int) -> list[bool]:
    if isinstance(flag, bool):
        return [flag] * n
    if len(flag) != n:
        raise RSDError(f"multiple_choice has {len(flag)} flags for {n} answers; pass one per answer or a bool.")
    return [bool(f) for f in flag]


def extract(response: str, multiple_choice: bool = False) -> str:
    """The answer of one response: a letter for multiple-choice problems, else `extract_answer`."""
    return extract_choice(response) if multiple_choice else extract_answer(response)


def answers_match(
    golds: Sequence[str],
    answers: Sequence[str],
    *,
    multiple_choice: bool | Sequence[bool] = False,
    pool: GradingPool | None = None,
    workers: int = DEFAULT_WORKERS,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[bool]:
    """Whether each already-extracted answer equals its gold (letters compared as letters)."""
    if len(golds) != len(answers):
        raise RSDError(f"{len(golds)} gold answers but {len(answers)} answers; pass one gold per answer.")
    choice = _per_item(multiple_choice, len(golds))
    verdicts = [
        str(a).strip().upper() == str(g).strip().upper() if c else False
        for g, a, c in zip(golds, answers, choice, strict=True)
    ]
    math_items = [i for i, c in enumerate(choice) if not c]
    pairs = [(str(golds[i]), str(answers[i])) for i in math_items]
    own_pool = pool is None
    pool = pool or GradingPool(workers=workers, timeout=timeout)
    try:
        for i, verdict in zip(math_items, pool.compare(pairs), strict=True):
            verdicts[i] = verdict
    finally:
        if own_pool:
            pool.close()
    return verdicts


def grade_answers(
    golds: Sequence[str],
    responses: Sequence[str],
    *,
    multiple_choice: bool | Sequence[bool] = False,
    workers: int = DEFAULT_WORKERS,
    timeout: float = DEFAULT_TIMEOUT,
    pool: GradingPool | None = None,
) -> list[bool]:
    """Whether each response's final answer equals its gold; a comparison past `timeout` seconds is wrong."""
    if len(golds) != len(responses):
        raise RSDError(f"{len(golds)} gold answers but {len(responses)} responses; pass one gold per response.")
    choice = _per_item(multiple_choice, len(responses))
    answers = [extract(r, c) for r, c in zip(responses, choice, strict=True)]
    return answers_match(golds, answers, multiple_choice=choice, pool=pool, workers=workers, timeout=timeout)


_shared: GradingPool | None = None
_shared_lock = threading.Lock()


def is_correct(gold: str, response: str, *, multiple_choice: bool = False, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """One response against one gold, in one worker kept for later calls (batch with `grade_answers`)."""
    global _shared
    with _shared_lock:  # a pool serves one caller at a time
        if _shared is None:
            _shared = GradingPool(workers=1)
            atexit.register(_shared.close)
        _shared.timeout = timeout
        return grade_answers([gold], [response], multiple_choice=multiple_choice, pool=_shared)[0]


# ----------------------------------------------------------------------------------------------------------
# Majority vote and best-of-N


@dataclass
class Vote:
    """The outcome of a majority vote over one problem's responses."""

    index: int  # the response that represents the winning answer (its class's first member); -1 if none
    answer: str  # that response's extracted answer
    count: int  # responses in the winning class
    classes: list[list[int]]  # response indices per equivalence class, in order of first appearance


def majority_votes(
    response_lists: Sequence[Sequence[str]],
    *,
    multiple_choice: bool | Sequence[bool] = False,
    workers: int = DEFAULT_WORKERS,
    timeout: float = DEFAULT_TIMEOUT,
    pool: GradingPool | None = None,
) -> list[Vote]:
    """A majority vote per problem over the equivalence classes of the responses' extracted answers.

    Classes: answers with the same `normalize_answer` form share a class at once; a new form then joins the
    first existing class (in order of first appearance) whose representative math-verify finds equivalent,
    the representative as gold, or starts a class of its own. Responses without an answer do not vote.
    Winner: the largest class; a tie goes to the class that appeared first in the list, so the result never
    depends on anything but the order of the responses. `Vote.index` is that class's first response.
    """
    choice = _per_item(multiple_choice, len(response_lists))
    answers = [[extract(r, c) for r in responses] for responses, c in zip(response_lists, choice, strict=True)]
    own_pool = pool is None
    pool = pool or GradingPool(workers=workers, timeout=timeout)
    try:
        classes = _equivalence_classes(answers, choice, pool)
    finally:
        if own_pool:
            pool.close()
    return [_winner(cls, ans) for cls, ans in zip(classes, answers, strict=True)]


def majority_vote(responses: Sequence[str], *, multiple_choice: bool = False, **kwargs) -> Vote:
    """`majority_votes` for one problem."""
    return majority_votes([responses], multiple_choice=multiple_choice, **kwargs)[0]


def _forms(answers: list[str], is_choice: bool) -> list[list[int]]:
    """Response indices grouped by the normalized form of their answer, in order of first appearance."""
    by_form: dict[str, list[int]] = {}
    for i, answer in enumerate(answers):
        key = answer.strip().upper() if is_choice else normalize_answer(answer)
        if key:
            by_form.setdefault(key, []).append(i)
    return list(by_form.values())


def _equivalence_classes(answers: list[list[str]], choice: list[bool], pool: GradingPool) -> list[list[list[int]]]:
    """Per problem, response indices grouped into classes (see `majority_votes`)."""
    # Equal normalized forms first: most votes agree letter for letter and need no sympy at all.
    forms = [_forms(a, c) for a, c in zip(answers, choice, strict=True)]
    # Letters need no math-verify; math answers merge one form per problem per round, each round one batch.
    classes: list[list[list[int]]] = [[list(m) for m in f] if c else [] for f, c in zip(forms, choice, strict=True)]
    queues = [deque() if c else deque(f) for f, c in zip(forms, choice, strict=True)]
    while any(queues):
        pairs, owners = [], []
        for p, queue in enumerate(queues):
            if queue:
                newcomer = answers[p][queue[0][0]]
                for c, members in enumerate(classes[p]):
                    pairs.append((answers[p][members[0]], newcomer))
                    owners.append((p, c))
        joined: dict[int, int] = {}
        for (p, c), same in zip(owners, pool.compare(pairs), strict=True):
            if same:
                joined.setdefault(p, c)  # the first class in order of appearance wins
        for p, queue in enumerate(queues):
            if queue:
                members = queue.popleft()
                if p in joined:
                    classes[p][joined[p]].extend(members)
                else:
                    classes[p].append(list(members))
    return [[sorted(members) for members in problem] for problem in classes]


def _winner(classes: list[list[int]], answers: list[str]) -> Vote:
    if not classes:
        return Vote(index=-1, answer="", count=0, classes=[])
    # max() keeps the first of equal maxima and classes are ordered by first appearance: the earliest wins.
    ordered = sorted(classes, key=lambda members: members[0])
    best = max(ordered, key=len)
    return Vote(index=best[0], answer=answers[best[0]], count=len(best), classes=ordered)


def score_value(score: object) -> float:
    """A reward as a number: a number itself, or the last element of a (nested) list; missing -> -inf."""
    while isinstance(score, list | tuple):
        if not score:
            return -math.inf
        score = score[-1]
    if score is None or isinstance(score, bool | str):
        return -math.inf
    value = float(score)
    return -math.inf if math.isnan(value) else value


def best_of_n(scores: Sequence[object]) -> int:
    """The index of the highest-scored response (the first of equal maxima); -1 for no responses."""
    values = [score_value(s) for s in scores]
    if not values:
        return -1
    return max(range(len(values)), key=lambda i: (values[i], -i))
