"""Test-only fault injection, so tests can prove that one failing rank ends the whole job.

``DBMPI_FAULT=RANK:SECONDS`` makes world rank RANK raise ``RuntimeError`` once it has run its
training loop for SECONDS. Unset (the normal case), :meth:`Fault.check` costs one comparison.
"""

from __future__ import annotations

import os
import time


class InjectedFault(RuntimeError):
    pass


class Fault:
    def __init__(self, rank: int, env: str | None = None):
        spec = os.environ.get("DBMPI_FAULT", "") if env is None else env
        self.deadline = None
        if spec:
            target, _, seconds = spec.partition(":")
            if int(target) == rank:
                self.deadline = time.monotonic() + float(seconds or 0)
        self.rank = rank

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise InjectedFault(f"fault injected on rank {self.rank} by DBMPI_FAULT")


class KillPoint:
    """Test-only: ``DBMPI_FAULT_KILL=RANK:PUSH:SHARDS[,...]`` SIGKILLs world rank RANK (a
    worker) during its push number PUSH, once the push's data is in place and its SEQ has
    moved on SHARDS of its shards (0: on none yet). Unset: :attr:`active` is False and nothing
    is called."""

    def __init__(self, rank: int, env: str | None = None):
        spec = os.environ.get("DBMPI_FAULT_KILL", "") if env is None else env
        self.push = self.shards = None
        for item in filter(None, spec.split(",")):
            target, push, shards = (int(x) for x in item.split(":"))
            if target == rank:
                self.push, self.shards = push, shards
        self.active = self.push is not None

    def at(self, push: int, shards: int) -> None:
        if push == self.push and shards == self.shards:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class Termination:
    """SIGTERM (what SLURM sends before it kills a job) or SIGINT (Ctrl-C: mpiexec forwards it
    to every rank) sets a flag instead of killing the rank, so training can stop in order and
    write a last checkpoint; the job then exits 128 + the signal (143, 130). A second signal
    exits at once."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.requested = False
        self.signum = 0  # the first signal received (0: none)
        # False where the algorithm never looks at the flag (Sandblaster): Ctrl-C then stops
        # the rank at once, as before, instead of being ignored
        self.graceful = True
        self._previous = {}

    @property
    def name(self) -> str:
        """The signal's name for messages (SIGTERM when the request came from another rank)."""
        import signal

        return signal.Signals(self.signum).name if self.signum else "SIGTERM"

    def install(self) -> "Termination":
        import signal

        def handler(signum, frame):
            if signum == signal.SIGINT and not self.graceful:
                raise KeyboardInterrupt
            if self.requested:
                raise SystemExit(128 + signum)
            self.requested, self.signum = True, signum

        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous.setdefault(sig, signal.signal(sig, handler))
        return self

    def uninstall(self) -> None:
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


TERMINATION = Termination()


def checkpoint_delay() -> float:
    """Test-only: ``DBMPI_CKPT_DELAY=SECONDS`` makes each shard sleep after writing its
    checkpoint file, before acknowledging it, so a test can kill a job mid-checkpoint."""
    return float(os.environ.get("DBMPI_CKPT_DELAY", "0") or 0)


def write_fault(path) -> None:
    """Test-only: ``DBMPI_FAULT_ENOSPC=PATTERN`` (a glob on the file name, e.g.
    ``shard-0001.h5`` or ``summary.json``) makes the write of a matching file fail as a full
    disk would, so the disk-full path is tested without filling a disk. Unset: one lookup."""
    pattern = os.environ.get("DBMPI_FAULT_ENOSPC")
    if pattern:
        import errno
        from fnmatch import fnmatch
        from pathlib import Path

        if fnmatch(Path(path).name, pattern):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def rank_pids(cfg) -> dict[int, int]:
    """World rank -> pid of this host's ranks of the job started on config file ``cfg`` (from
    /proc: the config path in the command line, PMI_RANK in the environment). For tests and
    benchmarks that kill or stop a chosen rank."""
    from pathlib import Path

    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
            if str(cfg).encode() not in cmdline or b"dbmpi" not in cmdline:
                continue
            if Path(cmdline[0].decode(errors="replace")).name == "sh":
                continue  # the rank's keep-going shell (dbmpi.launch.KEEP_GOING)
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0")
                       if b"=" in kv)
        except OSError:
            continue
        if b"PMI_RANK" in env:
            out[int(env[b"PMI_RANK"])] = int(d.name)
    return out

