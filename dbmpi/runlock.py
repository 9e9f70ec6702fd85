"""One job per run directory: ``RUN_DIR/dbmpi.lock``, taken by rank 0 before anything is written.

Two jobs in one run directory both train, race on the checkpoint rename and interleave their
metrics. The lock is a file made with ``O_CREAT | O_EXCL``: that create is atomic on local
disks and on NFS (v3 and later), where run directories of clusters live. ``flock``/``fcntl``
locks were not used: ``flock`` does not reach other NFS clients, and ``fcntl`` locks depend on
the site's lock daemon and vanish silently when it restarts.

A file outlives a job killed with SIGKILL, so a lock can be stale. On the holder's host a lock
whose pid is gone is stale. From another host the pid cannot be checked: the holder touches
the file every ``HEARTBEAT_S`` seconds, and a lock not touched for ``STALE_S`` is stale. A
stale lock is taken over with one warning line.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from .errors import DbmpiError

LOCK_NAME = "dbmpi.lock"
HEARTBEAT_S = 10.0
STALE_S = 6 * HEARTBEAT_S  # a few missed heartbeats: a loaded node can be slow, not dead
EXIT_LOCKED = 69  # EX_UNAVAILABLE: the run directory is busy (75 is a frozen rank)


class RunLocked(DbmpiError):
    """The run directory is in use by another job."""

    exit_code = EXIT_LOCKED


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    # A zombie answers kill(0) too. A rank whose keep-going shell (dbmpi.launch) was killed
    # first is reparented to init, and some inits (seen: a VM's) reap it seconds later.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def holder_text(info: dict) -> str:
    job = info.get("slurm_job_id")
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
            + (f", SLURM job {job}" if job else ""))


def stale_reason(info: dict, age_s: float, host: str | None = None) -> str | None:
    """Why the lock described by ``info`` (its file untouched for ``age_s``) is stale, or None
    while its holder may be alive."""
    host = host or socket.gethostname()
    if info.get("host") == host:
        pid = info.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return f"its pid {pid} is gone"
        return None
    if age_s > STALE_S:
        return f"its heartbeat stopped {age_s:.0f} s ago"
    return None


class RunLock:
    """Hold ``RUN_DIR/dbmpi.lock`` for this process; :meth:`release` removes it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.held = False
        self._stop = threading.Event()
        self._thread = None

    def acquire(self, warn=print) -> "RunLock":
        """Take the lock, or raise RunLocked naming its holder; ``warn`` gets one line when a
        stale lock is taken over."""
        for _ in range(3):  # a stale lock removed under a racing job: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info, age = self._read()
                if info is None:  # vanished (its job ended) between our create and read
                    continue
                why = stale_reason(info, age)
                if why is None:
                    raise RunLocked(
                        f"run.dir: {self.path.parent} is in use by another job "
                        f"({holder_text(info)}, since {info.get('started', '?')}): wait for "
                        f"it to end or stop it, or use another run directory with --set "
                        f"run.dir=PATH; if that job is gone, delete {self.path}") from None
                self._take_over(info, why, warn)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.info, fh)
                fh.write("\n")
            self.held = True
            self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunLocked(f"run.dir: could not take {self.path}: another job keeps taking it; "
                        f"use another run directory with --set run.dir=PATH")

    def _read(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            info = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):  # half-written by a job killed while creating it
            info = {}
        return (info if isinstance(info, dict) else {}), age

    def _take_over(self, info: dict, why: str, warn) -> None:
        # rename, not unlink: of two jobs taking over at once only one rename succeeds
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        warn(f"dbmpi: warning: {self.path}: taking over the lock of a job that ended "
             f"({holder_text(info)}: {why})")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # a missed beat; the next one tries again
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours (never another job's that took it over)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        info, _ = self._read()
        if info and info.get("pid") == self.info["pid"] and info.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)
