"""Knowing that a process of the job died, and not hanging because of it (docs/faults.md).

MPICH's launcher (hydra) started with ``-disable-auto-cleanup`` does not end a job when one
of its processes dies: it sends SIGUSR1 to every other process (measured on MPICH 5.0.2: within
5 ms, on every survivor). That *death notice* says that a process died, not which one: the
Downpour coordinator then takes a census by heartbeat (:mod:`dbmpi.train.downpour.census`).
SIGUSR1's default action is to terminate, so every rank installs :data:`NOTICE` first thing.
MPICH's own fault tolerance (``MPIX_Comm_get_failed``, ``Shrink``, ``Agree``) is not usable
here: ``MPIR_CVAR_ENABLE_FT=1`` fails an assertion in ``MPI_Init`` on ch4, ``Get_failed``
returns an empty group, ``Shrink`` and any collective over the dead rank hang.

:class:`Watchdog` is a thread that runs while the main thread may be blocked inside MPI,
where no Python signal handler runs: a partition whose peer died waits in its halo exchange
forever, and a rank whose coordinator died would wait for orders forever.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from .errors import EX_TEMPFAIL
from .log import get_logger

log = get_logger("liveness")


class DeathNotice:
    """Counts SIGUSR1s: hydra's notice that a process of the job ended without finalizing.

    A Python handler runs only when the main thread runs Python, never while it is blocked in
    MPI; the C-level handler also writes each signal's number to a pipe
    (``signal.set_wakeup_fd``) that :class:`Watchdog` reads at once.
    """

    def __init__(self):
        self.count = 0  # seen by the main thread
        self.at = 0.0  # time.monotonic() of the latest notice
        self.pipe = -1  # read end: one byte per signal received (any signal)

    def install(self) -> "DeathNotice":
        def handler(signum, frame):
            self.count += 1
            self.at = time.monotonic()

        signal.signal(signal.SIGUSR1, handler)
        if self.pipe < 0:
            r, w = os.pipe()
            os.set_blocking(w, False)
            os.set_blocking(r, False)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self.pipe = r
        return self

    def drain(self) -> int:
        """Notices written to the pipe since the last call (other signals are dropped)."""
        try:
            data = os.read(self.pipe, 4096) if self.pipe >= 0 else b""
        except BlockingIOError:
            return 0
        return data.count(bytes([signal.SIGUSR1]))

    def ignore(self) -> None:
        """From here on ignore notices: at the end, ranks leave one by one and each departure
        is a notice; Python resets a handler it installed (not SIG_IGN) to the default,
        terminate, before MPI_Finalize is done."""
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


NOTICE = DeathNotice()


class Teardown:
    """How this rank ends: ``collective`` (free the windows together, MPI_Finalize), or not,
    after a rank was lost: every collective over COMM_WORLD, MPI_Finalize included, would
    wait for the dead forever, so each survivor writes what it owns and exits."""

    COLLECTIVE, LEAVE = 1, 2

    def __init__(self):
        self.mode = self.COLLECTIVE

    @property
    def collective(self) -> bool:
        return self.mode == self.COLLECTIVE


TEARDOWN = Teardown()


class Watchdog(threading.Thread):
    """After a death notice: a worker stuck ``2 * lost_after_s`` seconds without a heartbeat of
    its main thread leaves (its replica lost a partition: the coordinator counts the whole replica
    lost), and any rank whose coordinator has not answered the notice with a census within
    ``answer_s`` seconds ends the job (MPI_Abort, exit 75: the coordinator is gone).

    ``census()`` returns the censuses the coordinator has published to this rank (a load from
    its own memory, no MPI call). The main thread calls :meth:`beat` whenever it makes
    progress, and :meth:`stop` before it leaves or frees the windows.
    """

    def __init__(self, label: str, census, lost_after_s: float, answer_s: float,
                 leave_if_stuck: bool):
        super().__init__(name="dbmpi-watchdog", daemon=True)
        self.label, self.census = label, census
        self.lost_after_s, self.answer_s = lost_after_s, answer_s
        self.leave_if_stuck = leave_if_stuck
        self.last = time.monotonic()
        self._stop_event = threading.Event()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        notice_at = asked_at = 0.0
        census_then = 0
        while not self._stop_event.wait(0.2):
            now = time.monotonic()
            if NOTICE.drain():  # a new notice: the coordinator owes a census
                notice_at = asked_at = now
                census_then = int(self.census())
            if not notice_at:
                continue
            # twice the census's wait: a worker stuck because a *shard* died must not leave
            # before the coordinator has seen that and ended the job
            if (self.leave_if_stuck and now - notice_at >= 2 * self.lost_after_s
                    and now - self.last >= 2 * self.lost_after_s):
                self._leave(now - self.last)
            if asked_at and int(self.census()) > census_then:
                asked_at = 0.0  # answered
            elif asked_at and now - asked_at >= self.answer_s:
                self._abort()

    def _leave(self, stuck: float) -> None:
        log.warning("%s: stuck %.0f s after a process of the job died: a rank of this replica "
                    "is gone; leaving (the others go on)", self.label, stuck)
        logging.shutdown()
        os._exit(0)

    def _abort(self) -> None:
        from mpi4py import MPI

        print(f"dbmpi: error on {self.label}: a process of the job died and the coordinator "
              f"(rank 0) did not take a census within {self.answer_s:g} s: it is gone; "
              f"re-run the same command to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        # as the runner does: hydra's proxy may act on the abort before it forwards the line
        time.sleep(0.5)
        MPI.COMM_WORLD.Abort(EX_TEMPFAIL)
