"""Files that a crash cannot leave half-written, and folders that one process owns at a time.

- `write_atomic` / `atomic_output`: a whole file (summary, report, config, plot, graded output) is written to a
  temporary file beside it, fsync'ed, then renamed over the old one, so a kill at any moment leaves either the
  old content or the new, never a mix. The folder is fsync'ed after the rename so the new name survives a
  power cut too.
- `FolderLock`: an OS lock (`flock`) on `FOLDER/.rsd.lock`. The kernel drops it when its process ends, however
  it ends (SIGKILL included), so there are no stale locks to clean up; the file holds who took it (pid, host,
  command, start time) so that a second process can say who owns the folder.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rsd.core import RSDError

try:
    import fcntl
except ImportError:  # not POSIX: folders are not locked (one process per folder is then up to the user)
    fcntl = None

LOCK = ".rsd.lock"
TMP_MARK = ".tmp-"  # in the names of temporary files: `.NAME.tmp-PID.SUFFIX`


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def temporary_name(final: Path) -> Path:
    """A hidden sibling that keeps the suffix (matplotlib picks the image format from it)."""
    return final.with_name(f".{final.stem}{TMP_MARK}{os.getpid()}{final.suffix}")


@contextmanager
def atomic_output(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsync'ed and renamed to `final`, else removed."""
    final = Path(final)
    tmp = temporary_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_atomic(folder: str | Path, name: str, content: str | bytes) -> Path:
    """Replace `folder/name` with `content` in one step."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    final = Path(folder) / name
    with atomic_output(final) as tmp:
        tmp.write_bytes(data)
    return final


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


# ----------------------------------------------------------------------------------------------------------
# One process per folder


def holder_info() -> dict:
    """Who holds a lock: enough for a user to find the process (or see that it is on another machine)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(["rsd", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def describe_holder(lock_path: Path, patience_s: float = 1.0) -> str:
    """The holder as its lock file names it; a holder that took the lock a moment ago gets a moment to write."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            info = json.loads(lock_path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']} (`{info['command']}`, started {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "another process (an rsd merge reading it, or a run that has just started)"
            time.sleep(0.05)


class FolderLock:
    """An exclusive (writer) or shared (reader) lock on a folder, refused at once when someone else holds it."""

    def __init__(self, folder: str | Path, shared: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.shared = shared
        self._file = None

    def acquire(self, in_use_hint: str) -> FolderLock:
        """Take the lock, or raise RSDError naming the holder; `in_use_hint` says what the user can do."""
        if fcntl is None:
            return self
        self._file = self._open()
        if self._file is None:
            return self  # a read-only folder without a lock file: nobody can be writing it
        try:
            fcntl.flock(self._file.fileno(), (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise RSDError(f"{self.folder} is in use by {describe_holder(self.path)}; {in_use_hint}") from None
        if not self.shared:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(json.dumps(holder_info()) + "\n")
            self._file.flush()
        return self

    def _open(self):
        if self.shared:
            try:
                return open(self.path, encoding="utf-8")  # noqa: SIM115 - held until release()
            except FileNotFoundError:
                return None
        try:
            return open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        except OSError as exc:
            raise RSDError(f"cannot write in {self.folder} ({exc.strerror}); pass a folder you can write to.") from None

    def release(self) -> None:
        if self._file is not None:
            if not self.shared:
                self._file.truncate(0)  # no stale name for a reader's lock to be mistaken for
            self._file.close()  # closing the descriptor drops the lock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
