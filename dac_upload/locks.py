"""Locks on shared file systems: flock where it works, a soft lock (a file) where it does not.

flock through filelock is released by the kernel when its holder dies. Some Lustre and NFS
mounts refuse flock; there filelock's soft lock is used, whose staleness (dead pid on the same
host, or too old) we detect and report, but never break unless told to. Used for the job's
nightly lock and for a run's submission lock (two resubmissions of one run never race).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import filelock

from .files import atomic_write_text

_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


class LockError(Exception):
    """The job's lock is held, or stale: one line saying by whom and what to do."""


@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    started: float
    mode: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on {self.host} since {when} ({self.mode} lock)"

    def dead(self) -> bool:
        """Provably gone: same host and no such process (another host cannot be checked)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def flock_works(directory: Path) -> bool:
    """Whether flock(2) works on this file system (some Lustre/NFS mounts refuse it)."""
    probe = directory / ".flock-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return True          # another process is probing right now: flock works
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return False
        raise
    finally:
        os.close(fd)


class JobLock:
    """A lock in ``directory`` named ``name``: flock through filelock where the file system
    supports it, else filelock's soft lock; the holder's host, pid and time are recorded
    beside it (``<name>.lock.json``)."""

    def __init__(self, directory: Path, mode: str = "auto", stale_after: float = 86400,
                 name: str = "nightly") -> None:
        self.path = directory / f"{name}.lock"
        self.info_path = directory / f"{name}.lock.json"
        self.what = "nightly run of this job" if name == "nightly" else f"{name} of this run"
        self.mode = ("flock" if flock_works(directory) else "soft") if mode == "auto" else mode
        self.stale_after = stale_after
        self.notes: list[str] = []
        self._lock: filelock.BaseFileLock | None = None

    def holder(self) -> LockInfo | None:
        try:
            return LockInfo(**json.loads(self.info_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self, break_stale: bool = False) -> None:
        if self.mode == "soft":
            self.notes.append("flock does not work on this file system: using a soft lock "
                              f"({self.path}); see docs/operations.md (Lustre/NFS)")
            self._check_stale_soft(break_stale)
            lock: filelock.BaseFileLock = filelock.SoftFileLock(str(self.path), timeout=0)
        else:
            lock = filelock.UnixFileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            holder = self.holder()
            raise LockError(f"another {self.what} holds its lock: "
                            + (holder.describe() if holder else str(self.path))) from None
        self._lock = lock
        previous = self.holder()
        if previous is not None and self.mode == "flock":
            self.notes.append(f"the previous nightly ({previous.describe()}) ended without "
                              "clearing its lock record; its flock was released by the system")
        info = LockInfo(socket.gethostname(), os.getpid(), time.time(), self.mode)
        atomic_write_text(self.info_path, json.dumps(info.__dict__) + "\n")

    def _check_stale_soft(self, break_stale: bool) -> None:
        if not self.path.exists():
            return
        holder = self.holder()
        age = time.time() - (holder.started if holder else self.path.stat().st_mtime)
        reason = ("its process is gone" if holder and holder.dead() else
                  f"it is {age / 3600:.1f} h old" if age > self.stale_after else None)
        who = holder.describe() if holder else f"unknown holder, file {self.path}"
        if reason is None:
            raise LockError(f"another {self.what} holds its lock: {who}")
        if not break_stale:
            fix = ("run again with --break-stale-lock" if self.path.name == "nightly.lock"
                   else f"remove {self.path} and {self.info_path.name}")
            raise LockError(f"stale lock ({reason}): {who}; if no {self.what} is running, "
                            f"{fix}")
        self.notes.append(f"removed a stale lock ({reason}): {who}")
        self.path.unlink()

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.info_path.unlink()
            self._lock.release()
            if self.mode == "soft":
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._lock = None




@contextlib.contextmanager
def run_submission_lock(run_dir: Path) -> Iterator[JobLock]:
    """Held while a run's state is judged and its tasks submitted: two resubmissions of the
    same run (a person and the nightly) must not both submit the same tasks."""
    mode = os.environ.get("DAC_UPLOAD_LOCK", "auto")
    lock = JobLock(run_dir, mode if mode in ("flock", "soft") else "auto", 3600, name="submit")
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
