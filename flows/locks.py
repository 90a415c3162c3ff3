"""OS file locks: one writer per run directory, one alias move at a time in a model registry.

    with hold(run_dir / ".lock", purpose="run 'nightly'"):       # LockHeld at once if taken
        ...
    with hold(lock_path, purpose="register", wait_s=120):         # waits its turn (LockHeld after 120 s)
        ...

`flock(2)` on an open file: the kernel drops the lock when the holding process ends, however it ends
(SIGKILL included), so a lock left by a killed run never blocks anyone. The holder writes who it is (pid,
host, start time, purpose) into the lock file, so whoever is refused can name it. The lock file itself is
never deleted: unlinking it would let a third process lock a new inode while the second still holds the
old one.

Locks are re-entrant within one process (the CLI takes the run lock before the pipeline takes it again),
counted per path; flock alone would refuse a second open file description in the same process.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class LockHeld(RuntimeError):
    """Another process holds the lock; `holder` is what it wrote about itself (may be empty)."""

    def __init__(self, path: Path, holder: dict[str, Any], purpose: str):
        self.path, self.holder, self.purpose = path, holder, purpose
        super().__init__(f"{purpose} is in use by {describe_holder(holder)} (lock {path})")


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (it has not said which yet)"
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('started_at', '?')}"


def read_holder(path: Path) -> dict[str, Any]:
    """What the holder wrote into the lock file ({} while it is still writing, or if unreadable)."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_held: dict[str, tuple[int, int]] = {}  # resolved path -> (fd, depth) for the locks this process holds
_guard = threading.Lock()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def hold(path: str | os.PathLike[str], *, purpose: str, wait_s: float = 0.0,
         poll_s: float = 0.05) -> Iterator[dict[str, Any]]:
    """Hold an exclusive lock on `path` for the block; yields what was written about this holder.
    Raises `LockHeld` if another process holds it after `wait_s` seconds (0: do not wait)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _guard:
        if key in _held:  # this process holds it already: nest
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield read_holder(path)
        finally:
            _release(key)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            os.close(fd)
            raise LockHeld(path, read_holder(path), purpose)
        time.sleep(poll_s)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
          "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    with _guard:
        _held[key] = (fd, 1)
    try:
        yield me
    finally:
        _release(key)


def _release(key: str) -> None:
    with _guard:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
            return
        del _held[key]
    try:
        os.ftruncate(fd, 0)  # nobody is named as holder once it is free
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


RUN_LOCK_FILE = ".lock"  # in the run directory, beside the stage directories


@contextmanager
def run_lock(run_dir: Path, run_name: str) -> Iterator[dict[str, Any]]:
    """One `witclip run` per run directory, for the whole run: a second one on the same run name is a
    user mistake (UserError naming the holder), caught before any work."""
    from flows.errors import UserError

    lock = hold(Path(run_dir) / RUN_LOCK_FILE, purpose=f"run '{run_name}'")
    try:
        me = lock.__enter__()
    except LockHeld as held:
        raise UserError(f"run_name '{run_name}' is in use by {describe_holder(held.holder)}: wait for it to "
                        "finish, or give this run another run_name") from None
    try:
        yield me
    finally:
        lock.__exit__(None, None, None)
