"""One writer per store or shard folder: a POSIX lock on ``<folder>/.wildreid.lock``.

The lock file holds who took it (host, pid, command, time) so that a second
writer can be told who is in the way. Why ``fcntl.lockf`` (POSIX record locks)
rather than ``flock``: the kernel drops a POSIX lock the moment its process
dies (kill -9, OOM killer included) and never hands it to forked children, so
DataLoader workers or shard-writing processes that outlive a killed parent for
a moment cannot keep a dead run's folder locked. A lock left by a dead process
is therefore simply free again; the record it left is reported when the next
writer takes over.

POSIX locks belong to a process, not to a file descriptor: a process must not
open the lock file a second time while it holds the lock (closing that second
descriptor would drop the lock). Code that already holds a folder's lock passes
that on instead of locking again (``mine(..., locked=True)`` inside training).

On NFS the lock goes through the NFS lock manager (NLM for NFSv3, built into
NFSv4) and holds across machines; on a mount with ``nolock`` (or ``local_lock``)
it only holds between processes of one machine.

The lock file is left in place, emptied, when released: removing it would let a
process that opened the old file and a process that creates a new one both
hold "the" lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from wildreid.core.errors import LockedError, StoreError

__all__ = ["LOCK_NAME", "WriterLock"]

LOCK_NAME = ".wildreid.lock"


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', '?')!r}, since {since})"


class WriterLock:
    """The exclusive writer lock of ``folder``; use as a context manager or call :meth:`release`.

    ``took_over`` is the record of a previous holder that died without releasing
    (kill -9, power loss), or None; ``log`` is told about it.
    """

    def __init__(self, folder: str | Path, command: str | None = None, log: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.took_over: dict | None = None
        self._fd: int | None = None
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"{self.folder} is a file; expected a folder (a store or shard folder) to write into")
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            who = _describe(holder) if holder else "another process (it has not recorded itself yet)"
            raise LockedError(
                f"{self.folder} is being written by {who}; a second writer would corrupt it: "
                "wait for that command to finish, or stop it (it resumes with the same "
                "command), then run this again"
            ) from None
        previous = _read(fd)
        if previous and not (previous.get("host") == socket.gethostname() and previous.get("pid") == os.getpid()):
            self.took_over = previous
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if self.took_over is not None and log is not None:
            log(self.took_over_message)

    @property
    def took_over_message(self) -> str | None:
        if self.took_over is None:
            return None
        return (
            f"took over the writer lock of {self.folder} left by {_describe(self.took_over)}, which ended "
            "without releasing it (killed or crashed); its finished work is kept and resumed"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
            if self._created and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
                # the command made the folder and then wrote nothing (it failed early): leave no trace
                try:
                    self.path.unlink()
                    self.folder.rmdir()
                except OSError:
                    pass  # something else appeared in the folder meanwhile: leave it
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
