"""Downpour's control plane: the coordinator's flags to the workers, the workers' reports to it.

Two small int64 windows, laid out so that nothing a worker does every step waits for the
coordinator, which may be evaluating for seconds: across nodes a one-sided operation completes
only while its target is inside MPI (see :mod:`dbmpi.ps.rma`), so a per-step read of the
coordinator's memory cost a replica a third of its time over TCP.

``flags`` (on partition 0 of every replica; REPLACE by the coordinator, RELEASED by replica 0)
    :class:`dbmpi.protocol.Flag`. The worker reads its own copy with local loads after a
    progress call: no message per step. A writer starts the REPLACE on every worker and then
    completes them all, so it waits at most for the slowest worker's next step.
``board`` (on the coordinator; written by the workers)
    :class:`~dbmpi.protocol.Board` (TERM REPLACE, DONE and STEPS SUM), then one
    :class:`~dbmpi.protocol.Row` per worker
    (REPLACE). STEPS, reported every ``log_every`` steps, goes with a request-based accumulate
    that the worker only ever tests: steps reported while the last report is still in flight
    are added to the next one. The rare reports (checkpoint answers, the last state) complete
    before the worker goes on. The coordinator reads the board with local loads.

Every location has one writer op and NO_OP readers, as in :mod:`dbmpi.ps`.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ...protocol import Board, Flag, Row
from ...ps.rma import Window, progress
from ...topology import COORDINATOR_RANK, Role, Topology

HEAD, ROW = len(Board), len(Row)


class Control:
    """The two windows. Collective over ``topo.comm``."""

    def __init__(self, topo: Topology):
        self.topo = topo
        W = topo.num_workers
        self.readers = [topo.worker_rank(r, 0) for r in range(topo.cfg.replicas)]
        is_reader = topo.role is Role.REPLICA and topo.partition == 0
        self.flags = Window(topo.comm, len(Flag) if is_reader else 0, np.int64, "flags")
        is_coord = topo.role is Role.COORDINATOR
        self.board = Window(topo.comm, HEAD + ROW * W if is_coord else 0, np.int64, "board")
        self._flags = np.zeros(len(Flag), np.int64)
        self._one = np.zeros(1, np.int64)
        self._steps = np.zeros(1, np.int64)  # the STEPS report in flight
        self._steps_req: MPI.Request | None = None
        self._steps_owed = 0
        self._last = np.zeros(1, np.int64)  # the final STEPS report

    # -- the coordinator (and replica 0 for RELEASED) -------------------------------------------
    def raise_flag(self, flag: Flag, value: int) -> None:
        """Set ``flag`` to ``value`` on every replica; returns when all hold it."""
        self._one[0] = value
        for r in self.readers:
            self.flags.accumulate(self._one, r, int(flag), op=MPI.REPLACE)
        for r in self.readers:
            self.flags.flush(r)

    def board_view(self) -> np.ndarray:
        """The coordinator's board, current as of this call (its own memory: read, not write)."""
        progress()
        self.board.sync()
        return self.board.local

    def rows(self) -> np.ndarray:
        """A copy of the workers' rows, (workers, ROW)."""
        return self.board_view()[HEAD:].reshape(-1, ROW).copy()

    # -- a worker --------------------------------------------------------------------------------
    def read_flags(self) -> np.ndarray:
        """My flags (partition 0 of a replica), read with local loads."""
        progress()
        self.flags.sync()
        np.copyto(self._flags, self.flags.local)
        return self._flags

    def report_steps(self, steps: int) -> None:
        """Add ``steps`` to STEPS without waiting for the coordinator."""
        self._steps_owed += steps
        if self._steps_req is not None and not self._steps_req.Test():
            return  # the last report is still in flight: this one rides with the next
        self._steps[0], self._steps_owed = self._steps_owed, 0
        self._steps_req = self.board.raccumulate(self._steps, COORDINATOR_RANK, Board.STEPS)

    def report(self, worker: int, **fields: int) -> None:
        """Store fields of my row (``ACK``, ``STEP``, ...) and complete them."""
        base = HEAD + ROW * worker
        for name, value in fields.items():
            self.board.store(int(value), COORDINATOR_RANK, base + Row[name])

    def terminate(self) -> None:
        """Tell the coordinator that this rank received SIGTERM."""
        self.board.store(1, COORDINATOR_RANK, Board.TERM)

    def finish(self, worker: int, step: int, epoch: int, position: int) -> None:
        """My last state, FINISHED, and DONE += 1; completes every report of mine first."""
        if self._steps_req is not None:
            self._steps_req.Wait()
            self._steps_req = None
        if self._steps_owed:
            self._last[0], self._steps_owed = self._steps_owed, 0
            self.board.accumulate(self._last, COORDINATOR_RANK, Board.STEPS)
            self.board.flush(COORDINATOR_RANK)
        self.report(worker, STEP=step, EPOCH=epoch, POSITION=position, FINISHED=1)
        self._one[0] = 1
        self.board.accumulate(self._one, COORDINATOR_RANK, Board.DONE)
        self.board.flush(COORDINATOR_RANK)

    def free(self) -> None:
        """Collective."""
        self.flags.free()
        self.board.free()
