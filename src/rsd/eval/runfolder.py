"""A run folder: the records of finished problems, appended one line at a time, so no finished work is lost.

Layout: `config.json` (the resolved configuration), `records.jsonl` (one line per method and problem, written
and fsync'ed the moment the problem is graded), `summary.json` and `report.md` (rewritten from the records,
each in one atomic step), `.rsd.lock` (who is writing the folder now).

- One process writes a folder at a time: a second one is refused at once, with the holder's pid and command.
- A run killed at any moment, SIGKILL included, loses at most the line being written; running the same command
  again drops that cut line (and says so) and decodes only the problems without a record.
- A record is keyed by its method, its problem id and a hash of everything that decides it about the problem
  (question, gold answer, prompt): a problem whose data changed since is run again, never reused.
- The summary counts the last complete record of each (method, problem), whatever else the file holds.
- Any other unreadable line is an error naming the file and line, never skipped without a word.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rsd.core import RSDError
from rsd.eval.files import LOCK, FolderLock, fsync_dir, is_temporary, write_atomic

RECORDS = "records.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
REPORT = "report.md"
PLOT = "tradeoff.png"
OUTPUTS = (SUMMARY, REPORT, PLOT)  # derived from the records; gone while new records are being added
OWN_FILES = {RECORDS, CONFIG, LOCK, *OUTPUTS}
RECORD_HASH = "problem_hash"  # the field of a record that holds its problem's hash


def fresh_run_dir(root: str | Path = "runs", prefix: str = "eval") -> Path:
    """A new folder name under `root`: the time, then a few random letters against collisions."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{prefix}-{stamp}-{secrets.token_hex(2)}"


def note(message: str) -> None:
    """One line on stderr that a user should see but that does not stop the run."""
    print(f"rsd: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# The folder a run may write


def prepare_run_dir(path: Path) -> None:
    """Create `path` (a folder) or accept it: empty, or a run folder of rsd; refuse anything else."""
    if path.exists() and not path.is_dir():
        raise RSDError(f"--out {path} is a file, not a folder; pass the path of a folder (new or a run folder).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RSDError(f"--out {path} cannot be created ({exc.strerror}); pass a folder you can write to.") from None
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise RSDError(f"--out {path} cannot be read ({exc.strerror}); pass a folder you can use.") from None
    if CONFIG in names:
        return
    if RECORDS in names:
        raise RSDError(
            f"--out {path} holds {RECORDS} but no {CONFIG}, so nothing says which run wrote them; pass a new --out "
            f"(or restore its {CONFIG})."
        )
    foreign = [n for n in names if n not in OWN_FILES and not is_temporary(n)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RSDError(
            f"--out {path} is not empty and is not an rsd run folder (it holds {shown}); pass a new or empty folder."
        )


def read_config(path: Path, hint: str = "pass a new --out.") -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RSDError(f"{path} is not a readable rsd configuration ({exc}); {hint}") from None
    if not isinstance(config, dict):
        raise RSDError(f"{path} is not an rsd configuration (not a JSON object); {hint}")
    return config


class RunFolder:
    def __init__(self, path: str | Path, config: dict, resume_keys: Iterable[str] = ()) -> None:
        """Open (or create) the folder and own it; refuse another process's folder or another configuration.

        `resume_keys` are configuration fields that may differ between a run and its resumption (none by
        default: the same command must be run again).
        """
        self.path = Path(path)
        self.created = not self.path.exists()
        prepare_run_dir(self.path)
        self.records_path = self.path / RECORDS
        self._lock = FolderLock(self.path).acquire("wait for it to end, or pass another --out.")
        try:
            self._check_config(config, set(resume_keys))
            self.records = read_records(self.records_path, repair=True)
            existed = self.records_path.exists()
            self._file = open(self.records_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            if not existed:
                fsync_dir(self.path)
        except BaseException:
            self._lock.release()
            raise
        self._outputs_current = True

    def _check_config(self, config: dict, may_differ: set[str]) -> None:
        config_path = self.path / CONFIG
        if config_path.exists():
            saved = read_config(config_path)
            changed = sorted(
                k for k in set(saved) | set(config) if k not in may_differ and saved.get(k) != config.get(k)
            )
            if changed:
                raise RSDError(
                    f"run folder {self.path} holds a run with another configuration (differs in: "
                    f"{', '.join(changed)}); run the same command again to resume it, or pass a new --out."
                )
        write_atomic(self.path, CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def done(self, method: str) -> set[tuple[str, str | None]]:
        """(problem id, problem hash) of every record of `method`."""
        return {(r["id"], r.get(RECORD_HASH)) for r in self.records if r["method"] == method}

    def append(self, record: dict) -> None:
        if self._outputs_current:
            self._drop_outputs()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)

    def _drop_outputs(self) -> None:
        """A summary on disk must describe the records on disk: it goes when they change and comes back, rewritten,
        when the run ends. Until then the folder has none, which says the run is unfinished."""
        for name in OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        self._outputs_current = False

    def close(self) -> None:
        self._file.close()
        self._lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, *exc) -> None:
        abandoned = kind is not None and self.created and not self.records
        if abandoned:  # a run that failed before its first record leaves no empty folder behind
            self._file.close()
            for name in (CONFIG, RECORDS, LOCK):  # while still holding the lock: nobody else has written here
                (self.path / name).unlink(missing_ok=True)
        self.close()
        if abandoned:
            with contextlib.suppress(OSError):  # another process may have started in it since
                self.path.rmdir()


# ----------------------------------------------------------------------------------------------------------
# Reading records


def corrupt_line(path: Path, number: int, why: str) -> str:
    return f"{path} line {number} is not a complete record ({why})"


def parse_record(raw: bytes) -> dict:
    """One line as a record; ValueError saying why it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"byte {raw[exc.start]:#04x} at column {exc.start + 1} is not UTF-8") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(record, dict) or not isinstance(record.get("method"), str) or "id" not in record:
        raise ValueError("a JSON line without the 'method' and 'id' of an rsd record")
    return record


def read_records(
    path: str | Path,
    repair: bool = False,
    skip_corrupt: bool = False,
    hint: str = "or pass a new --out.",
    dropped: list[str] | None = None,
) -> list[dict]:
    """Every record of a records file (or of a run folder's), in file order.

    A cut last line (a run killed mid-write, no newline yet) is dropped and reported (on stderr, or in `dropped`
    for the caller to report); with `repair` it is also cut off the file, so the next record starts on a line of
    its own. Any other line that is not a record is an RSDError naming the file and line, or, with
    `skip_corrupt`, dropped and reported.
    """
    path = Path(path)
    if path.is_dir():  # a run folder: its records file
        if not (path / RECORDS).is_file():
            raise RSDError(f"{path} holds no {RECORDS}; pass run folders written by `rsd eval`.")
        path = path / RECORDS
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.split(b"\n")[:-1]
    if len(complete) != len(data):
        cut = len(lines) + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(complete))
        message = f"{path} line {cut} was cut off by a run killed mid-write"
        if dropped is None:
            note(f"{message}; dropped it (that problem runs again).")
        else:
            dropped.append(message)
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append(parse_record(raw))
        except ValueError as exc:
            if not skip_corrupt:
                raise RSDError(
                    f"{corrupt_line(path, number, str(exc))}; delete that line (its problem runs again on the next "
                    f"resume) {hint}"
                ) from None
            note(f"{corrupt_line(path, number, str(exc))}; dropped it.")
    return records


@dataclass
class RecordSelection:
    """The records a summary counts: the last complete one of each (method, problem) whose problem is unchanged."""

    records: list[dict] = field(default_factory=list)
    duplicates: int = 0  # earlier records of a (method, problem) that has a later one
    stale: int = 0  # records of a problem whose question, gold or prompt changed since (or without a hash)

    def counts(self) -> dict:
        return {"counted": len(self.records), "duplicates_ignored": self.duplicates, "stale_ignored": self.stale}

    def message(self) -> str | None:
        parts = []
        if self.duplicates:
            parts.append(f"{self.duplicates} earlier duplicate record(s) (the last of each counts)")
        if self.stale:
            parts.append(
                f"{self.stale} record(s) of problems whose question, gold or prompt changed, or that carry no hash "
                f"of them (run again)"
            )
        return f"ignored {' and '.join(parts)}." if parts else None


def current_records(records: Iterable[dict], wanted: Mapping[str, str], methods: Sequence[str]) -> RecordSelection:
    """`wanted` maps each problem id of the run to its hash; records come back in (method, problem) order."""
    latest: dict[tuple[str, str], dict] = {}
    selection = RecordSelection()
    allowed = set(methods)
    for record in records:
        if record["method"] not in allowed or record["id"] not in wanted:
            continue
        if record.get(RECORD_HASH) != wanted[record["id"]]:
            selection.stale += 1
            continue
        key = (record["method"], record["id"])
        selection.duplicates += key in latest
        latest[key] = record
    selection.records = [latest[(m, i)] for m in methods for i in wanted if (m, i) in latest]
    return selection
