"""A run folder: the records of finished problems, appended one line at a time, so no finished work is lost.

Layout: `config.json` (the resolved configuration), `records.jsonl` (one line per method and problem, written
and fsync'ed the moment the problem is graded), `summary.json` and `report.md` (rewritten from the records).
A run killed at any moment, SIGKILL included, loses at most the line being written; running the same command
again drops that partial line and decodes only the problems without a record.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from rsd.core import RSDError

RECORDS = "records.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
REPORT = "report.md"


def fresh_run_dir(root: str | Path = "runs", prefix: str = "eval") -> Path:
    """A new folder name under `root`: the time, then a few random letters against collisions."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{prefix}-{stamp}-{secrets.token_hex(2)}"


class RunFolder:
    def __init__(self, path: str | Path, config: dict, resume_keys: Iterable[str] = ()) -> None:
        """Open (or create) the folder; refuse to mix records of a different configuration.

        `resume_keys` are configuration fields that may differ between a run and its resumption (none by
        default: the same command must be run again).
        """
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.records_path = self.path / RECORDS
        self._check_config(config, set(resume_keys))
        self.records = self._read_records()
        self._file = open(self.records_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def _check_config(self, config: dict, may_differ: set[str]) -> None:
        config_path = self.path / CONFIG
        if config_path.exists():
            saved = json.loads(config_path.read_text())
            changed = sorted(
                k for k in set(saved) | set(config) if k not in may_differ and saved.get(k) != config.get(k)
            )
            if changed:
                raise RSDError(
                    f"run folder {self.path} holds a run with another configuration (differs in: "
                    f"{', '.join(changed)}); run the same command again to resume it, or pass a new --out."
                )
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _read_records(self) -> list[dict]:
        """Every complete line; a partial last line (a run killed mid-write) is cut off the file."""
        if not self.records_path.exists():
            return []
        data = self.records_path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(self.records_path, "r+b") as f:
                f.truncate(len(complete))
        return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]

    def done(self, method: str) -> set[str]:
        return {r["id"] for r in self.records if r["method"] == method}

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._file.close()


def write_atomic(folder: str | Path, name: str, text: str) -> None:
    """Replace a file in one step, so a kill never leaves half a summary."""
    tmp = Path(folder) / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, Path(folder) / name)


def read_records(path: str | Path) -> list[dict]:
    records_path = Path(path) / RECORDS
    if not records_path.exists():
        raise RSDError(f"{path} holds no {RECORDS}; pass run folders written by `rsd eval`.")
    lines = records_path.read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a partial last line from a killed run
    return out
