"""``dbmpi launch`` runs mpiexec as its child: the user sees the job's own lines and one last
line when it fails; MPICH's lines go to the run's log.

MPICH's hydra adds its own lines to every failure (``Abort(N) on node ...``, a
``BAD TERMINATION ... PID N`` block): after dbmpi's one-line error they are noise, and when a
rank is killed they name only a pid. Here they are kept out of the user's view (shown with
``--verbose``), appended to ``RUN_DIR/launch.log``, and a killed rank is named by its rank, role
and host from ``RUN_DIR/placement.json`` (written by every job at start-up). The exit status is
mpiexec's (2 bad input, 130 SIGINT, 143 SIGTERM, ...).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .runlock import EXIT_LOCKED

# hydra's own lines (mpiexec's stdout and stderr)
MPICH_LINE = re.compile(r"^(Abort\(\d+\) on node |={10,}\s*$|=   |YOUR APPLICATION TERMINATED"
                        r"|This typically refers to a problem with your application"
                        r"|Please see the FAQ page|\[mpiexec@|\[proxy:)")
RUN_DIR_LINE = re.compile(r"run directory:? (\S+)\s*$")
SIGPIPE_STATUS = 128 + signal.SIGPIPE  # mpiexec killed by SIGPIPE: see status_after_sigpipe


class _Stream(threading.Thread):
    """Copy one of the child's pipes to ``out``, holding back hydra's lines."""

    def __init__(self, fd: int, out, verbose: bool, state: "_State"):
        super().__init__(daemon=True)
        self.fd, self.out, self.verbose, self.state = fd, out, verbose, state
        self.blank = 0  # blank lines held: hydra opens its block with one

    def _emit(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _line(self, line: str) -> None:
        body = line.rstrip("\n")
        if MPICH_LINE.match(body):
            self.state.mpich.append(body)
            self.blank = 0
            if self.verbose:
                self._emit(line)
            return
        if not body.strip():
            self.blank += 1
            return
        self._emit("\n" * self.blank + line)
        self.blank = 0
        self.state.saw(body)

    def run(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            buf += chunk
            # whole lines are judged; a progress line rewritten with \r passes at once
            while True:
                cut = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0),
                          default=-1)
                if cut < 0:
                    break
                piece, buf = buf[:cut + 1].decode(errors="replace"), buf[cut + 1:]
                if piece.endswith("\n"):
                    self._line(piece)
                else:
                    self._emit(piece)
        if buf:
            self._line(buf.decode(errors="replace"))
        if self.blank:  # blank lines that no hydra line followed are the job's
            self._emit("\n" * self.blank)
        os.close(self.fd)


class _State:
    def __init__(self, run_dir: str | None):
        self.mpich: list[str] = []
        self.run_dir = run_dir
        self.errors = 0  # dbmpi's own one-line errors seen
        self.lock = threading.Lock()

    def saw(self, line: str) -> None:
        with self.lock:
            if line.startswith("dbmpi: error"):
                self.errors += 1
            m = RUN_DIR_LINE.search(line)
            if m and not self.run_dir:
                self.run_dir = m.group(1)


class FirstExit(threading.Thread):
    """Which of this host's ranks ended first: hydra's BAD TERMINATION names the first process
    in its own list, often one it killed while cleaning up, not the one that died (seen: shard 1
    killed, shard 0 reported). Every local rank's pidfd (placement.json) is watched; the
    first to end is the one that died."""

    def __init__(self, state: "_State", proc: subprocess.Popen, since: float):
        super().__init__(daemon=True)
        self.state, self.proc, self.since = state, proc, since
        self.pid: int | None = None

    def _rows(self) -> list:
        while self.proc.poll() is None:
            run = self.state.run_dir
            place = Path(run) / "placement.json" if run else None
            try:  # this job's, not one left by the run it resumes
                if place and place.stat().st_mtime >= self.since:
                    return json.loads(place.read_text())["ranks"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.2)
        return []

    def run(self) -> None:
        if not hasattr(os, "pidfd_open"):
            return
        host = socket.gethostname()
        fds = {}
        for row in self._rows():
            if row.get("host") == host:
                try:
                    fds[os.pidfd_open(row["pid"])] = row["pid"]
                except (OSError, KeyError, TypeError):
                    pass
        if not fds:
            return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ready = poller.poll()
        self.pid = fds[ready[0][0]] if len(ready) == 1 else None  # a tie tells nothing
        for fd in fds:
            os.close(fd)


def death(mpich_lines: list[str], first_pid: int | None = None,
          ) -> tuple[int, str | None, int] | None:
    """(pid, host, signal) of the rank killed by a signal (``first_pid``: the local rank seen
    to end first, else the one hydra names), or None."""
    text = "\n".join(mpich_lines)
    where = re.search(r"PID (\d+) RUNNING AT (\S+)", text)
    sig = re.search(r"EXIT STRING: .*\(signal (\d+)\)", text)
    if not where or not sig:
        return None
    if first_pid is not None:
        return first_pid, None, int(sig.group(1))
    return int(where.group(1)), where.group(2), int(sig.group(1))


def role_text(row: dict) -> str:
    """``coordinator``, ``shard 1``, ``replica 0`` (``replica 0.1``: partition 1)."""
    role = row.get("role", "?")
    if role == "coordinator":
        return role
    if role == "replica" and row.get("partitions", 1) > 1:
        return f"replica {row.get('index')}.{row.get('partition')}"
    return f"{role} {row.get('index')}"


def death_line(pid: int, host: str | None, signum: int, run_dir: str | None) -> str:
    """The job's last line when a rank was killed: rank, role and host from placement.json."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    rows = []
    if run_dir:
        try:
            rows = json.loads((Path(run_dir) / "placement.json").read_text())["ranks"]
        except (OSError, ValueError, KeyError, TypeError):
            rows = []
    parts = max((int(r.get("partition") or 0) for r in rows), default=0) + 1
    host = host or socket.gethostname()
    row = next((r for r in rows if r.get("pid") == pid and r.get("host") == host), None) \
        or next((r for r in rows if r.get("pid") == pid), None)
    who = (f"rank {row['rank']} ({role_text({**row, 'partitions': parts})}, host "
           f"{row.get('host', host)}, pid {pid})" if row
           else f"a rank (host {host}, pid {pid}) that had not started training")
    return (f"dbmpi: error: {who} died ({name}): the job was ended; re-run the same command "
            f"to resume from the last checkpoint")


def supervise(cmd: list[str], env: dict, run_dir: str | None, verbose: bool = False) -> int:
    """Run ``cmd`` (mpiexec) to its end; SIGINT and SIGTERM are passed on to it (hydra passes
    them to every rank: a last checkpoint, then 130 or 143). Returns its exit status."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    def child_setup():
        # its own session: a terminal's Ctrl-C reaches it once, through us (hydra takes a
        # second Ctrl-C as "abort at once"); and it dies with us (a killed launch leaves no
        # job running on its own: hydra then ends the ranks)
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    since = time.time() - 1  # a placement.json older than this is another job's
    proc = subprocess.Popen(cmd, env=env, stdout=out_w, stderr=err_w, start_new_session=True,
                            preexec_fn=child_setup)
    os.close(out_w)
    os.close(err_w)
    state = _State(run_dir)
    streams = [_Stream(out_r, sys.stdout, verbose, state),
               _Stream(err_r, sys.stderr, verbose, state)]
    for s in streams:
        s.start()
    first = FirstExit(state, proc, since)
    first.start()
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
        for s in streams:
            s.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    rc = 128 - rc if rc < 0 else rc
    _keep_log(state, rc)
    first.join(timeout=1.0)
    if rc == SIGPIPE_STATUS and not state.errors:
        return status_after_sigpipe(state.run_dir, since, forwarded, verbose)
    died = death(state.mpich, first.pid) if rc and not state.errors else None
    if died:
        print(death_line(*died, state.run_dir), file=sys.stderr, flush=True)
    elif rc and not state.errors and not forwarded and rc != EXIT_LOCKED:
        where = (f"; its messages are in {Path(state.run_dir) / 'launch.log'}"
                 if state.run_dir and state.mpich else "")
        print(f"dbmpi: error: mpiexec ended with status {rc}{where} (--verbose shows them)",
              file=sys.stderr, flush=True)
    return rc


def status_after_sigpipe(run_dir: str | None, since: float, forwarded: list,
                         verbose: bool = False) -> int:
    """The job's status when mpiexec was killed by SIGPIPE, which hydra 5.0.2 does to itself as a
    multi-host job ends (seen with strace; 4 of 20 runs of a 3-host job beside three CPU hogs).
    Under -disable-auto-cleanup a proxy keeps a rank's PMI socket after PMI finalize, so every
    rank's normal exit reads as a death: the proxy reports it and mpiexec sends SIGUSR1 to every
    proxy; a proxy whose ranks have all ended has closed its socket, and that write kills
    mpiexec. Our pipes are read to their end, so no other write of mpiexec's can raise it.

    The ranks' statuses went with mpiexec, so the run directory answers: a summary.json the
    coordinator wrote during this launch means every rank reached the end (0, or 143 / 130 for
    a run stopped by a signal after its checkpoint); without one the job did not finish."""
    summary = None
    if run_dir:
        path = Path(run_dir) / "summary.json"
        try:
            if path.stat().st_mtime >= since:
                summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = None
    if isinstance(summary, dict):
        if summary.get("interrupted"):
            rc = 128 + (signal.SIGINT if forwarded and signal.SIGTERM not in forwarded
                        else signal.SIGTERM)
        else:
            rc = 0
        if verbose:
            print(f"dbmpi: mpiexec was killed by SIGPIPE after the job had ended (hydra "
                  f"signalling a host whose ranks had left); the job's status is {rc}",
                  file=sys.stderr, flush=True)
        return rc
    print("dbmpi: error: mpiexec was killed by SIGPIPE (hydra signalling a host whose ranks had "
          "left) before the job recorded its end; re-run the same command to resume from the "
          "last checkpoint", file=sys.stderr, flush=True)
    return SIGPIPE_STATUS


def _keep_log(state: _State, rc: int) -> None:
    """Append hydra's lines to RUN_DIR/launch.log (never into a run directory that another
    job holds: a refused launch writes nothing there)."""
    if not state.mpich or not state.run_dir or rc == EXIT_LOCKED:
        return
    run = Path(state.run_dir)
    if not run.is_dir():
        return
    try:
        with open(run / "launch.log", "a") as fh:
            fh.write("\n".join(state.mpich) + "\n")
    except OSError:
        pass
