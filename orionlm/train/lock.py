"""A run directory's lock: the process writing a run holds RUN/run.lock, so that no other run writes into it and
no quickstart deletes it.

The lock file names its holder ({"pid": ..., "host": ...}) for the messages; the exclusion itself is an flock on
the file, which the kernel drops when the process ends however it ends. So a lock file left by a run that was
killed (its PID dead, or reused by another program) is taken over on this host, with a note; one that another
host wrote is refused, as this host cannot see whether that run still lives. The holder deletes the file when it
lets go, and removes the run directory if taking the lock created it and nothing was written since (a refused
run leaves nothing behind). A process may take the lock of a run it already holds (quickstart holds its --out
while the trainer inside it runs).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import OrionError

LOCK_FILE = "run.lock"


class RunLocked(OrionError):
    """The run directory is held by another process."""


@dataclass
class _Held:
    file: IO[str]
    created_dir: bool  # taking the lock created the run directory
    depth: int = 1


_HELD: dict[Path, _Held] = {}  # this process's locks, by lock file path


def _holder(path: Path) -> dict[str, Any]:
    """Who wrote the lock file ({} when it is empty or unreadable: a holder that has not written it yet)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "another process"
    return f"process {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") != socket.gethostname() else "")


def _open_locked(path: Path) -> IO[str]:
    """The lock file, open and flocked by this process; RunLocked when another process holds it."""
    while True:
        file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")  # held open until release
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            run = path.parent
            raise RunLocked(f"{run} is in use by {_describe(_holder(path))} (its {LOCK_FILE}): wait for that run to "
                            "end or stop it, or choose another run directory") from None  # fmt: skip
        try:
            if os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
                return file
        except FileNotFoundError:
            pass
        file.close()  # its holder let go and deleted it between our open and our flock: take the new one


def acquire(run_dir: str | Path) -> Path:
    """Take the lock of run_dir (created if missing); returns the lock file's path, for release()."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / LOCK_FILE
    if path in _HELD:
        _HELD[path].depth += 1
        return path
    if run_dir.exists() and not run_dir.is_dir():
        raise OrionError(f"{run_dir} is a file, not a run directory: choose another run directory")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    file = _open_locked(path)
    previous, host = _holder(path), socket.gethostname()
    if previous.get("host", host) != host:
        file.close()
        raise RunLocked(f"{path} was written by {_describe(previous)}, which this host cannot check on; if that run "
                        "has ended, delete the file")  # fmt: skip
    if previous.get("pid", os.getpid()) != os.getpid():
        print(f"note: taking over {path}, left by process {previous['pid']}, which has ended", file=sys.stderr)
    file.seek(0)
    file.truncate()
    file.write(json.dumps({"pid": os.getpid(), "host": host}) + "\n")
    file.flush()
    _HELD[path] = _Held(file, created)
    return path


def release(path: Path) -> None:
    """Let go of a lock taken with acquire(): the last release deletes the lock file (and the run directory if
    acquiring created it and it is empty)."""
    held = _HELD[path]
    held.depth -= 1
    if held.depth:
        return
    del _HELD[path]
    path.unlink(missing_ok=True)  # while still flocked: no process can hold the file we delete
    held.file.close()
    if held.created_dir:
        try:
            path.parent.rmdir()
        except OSError:  # the run wrote something: keep it
            pass


class RunLock:
    """`with RunLock(run_dir):` holds run_dir's lock for the block, released on any exit (errors and
    KeyboardInterrupt included)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = run_dir

    def __enter__(self) -> Path:
        self.path = acquire(self.run_dir)
        return self.path

    def __exit__(self, *exc: object) -> None:
        release(self.path)
