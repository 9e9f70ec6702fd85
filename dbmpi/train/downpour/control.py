"""Downpour's control plane: the coordinator's flags to the ranks, the ranks' reports to it.

Two small int64 windows, laid out so that nothing a worker does every step waits for the
coordinator, which may be evaluating for seconds: across nodes a one-sided operation completes
only while its target is inside MPI (see :mod:`dbmpi.ps.rma`), so a per-step read of the
coordinator's memory cost a replica a third of its time over TCP.

``flags`` (on every worker and shard; REPLACE by the coordinator, RELEASED by replica 0)
    :class:`dbmpi.protocol.Flag`. A rank reads its own copy with local loads after a
    progress call: no message per step. A writer starts the REPLACE on every rank it tells
    and then completes them all, so it waits at most for the slowest one's next step. Ranks
    counted lost (:mod:`.census`) are never written to again.
``board`` (on the coordinator; written by the workers and shards)
    :class:`~dbmpi.protocol.Board` (TERM REPLACE, DONE and STEPS SUM), then one
    :class:`~dbmpi.protocol.Row` per worker (REPLACE), then one heartbeat per shard
    (REPLACE). STEPS, reported every ``log_every`` steps, and heartbeats (BEAT and AT_STEP,
    at most every ``BEAT_S``) go with request-based accumulates that the sender only ever
    tests: what is sent while the last one is still in flight rides with the next. The rare
    reports (checkpoint answers, the last state) complete before the worker goes on. The
    coordinator reads the board with local loads.

Every location has one writer op and NO_OP readers, as in :mod:`dbmpi.ps`.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from ...protocol import Board, Flag, Row
from ...ps.rma import Window, progress
from ...topology import COORDINATOR_RANK, Role, Topology

HEAD, ROW = len(Board), len(Row)
BEAT_S = 0.1  # seconds between a rank's heartbeats, at most


class Control:
    """The two windows. Collective over ``topo.comm``."""

    def __init__(self, topo: Topology):
        self.topo = topo
        W, P = topo.num_workers, topo.cfg.partitions
        self.workers = [topo.worker_rank(*divmod(w, P)) for w in range(W)]
        self.shards = [topo.shard_rank(s) for s in range(topo.cfg.shards)]
        self.lost: set[int] = set()  # ranks counted lost: never written to again
        is_coord = topo.role is Role.COORDINATOR
        self.flags = Window(topo.comm, 0 if is_coord else len(Flag), np.int64, "flags")
        self.shard_beats = HEAD + ROW * W  # where the shards' heartbeats start
        self.board = Window(topo.comm, self.shard_beats + topo.cfg.shards if is_coord else 0,
                            np.int64, "board")
        self._beat = np.zeros(2, np.int64)  # [BEAT, AT_STEP] in flight
        self._beat_req: MPI.Request | None = None
        self._beat_at = 0.0
        self.watchdog = None  # this rank's dbmpi.liveness.Watchdog, if it runs one
        self._flags = np.zeros(len(Flag), np.int64)
        self._one = np.zeros(1, np.int64)
        self._steps = np.zeros(1, np.int64)  # the STEPS report in flight
        self._steps_req: MPI.Request | None = None
        self._steps_owed = 0
        self._last = np.zeros(1, np.int64)  # the final STEPS report

    # -- the coordinator (and replica 0 for RELEASED) -------------------------------------------
    def raise_flag(self, flag: Flag, value: int, shards: bool = False) -> None:
        """Set ``flag`` to ``value`` on every live worker (and shard); returns when all hold it."""
        self.tell([r for r in self.workers + (self.shards if shards else [])
                   if r not in self.lost], flag, value)

    def tell(self, ranks: list[int], flag: Flag, value: int) -> None:
        """Set ``flag`` to ``value`` on ``ranks``; returns when all hold it."""
        self._one[0] = value
        for r in ranks:
            self.flags.accumulate(self._one, r, int(flag), op=MPI.REPLACE)
        for r in ranks:
            self.flags.flush(r)

    def board_view(self) -> np.ndarray:
        """The coordinator's board, current as of this call (its own memory: read, not write)."""
        progress()
        self.board.sync()
        return self.board.local

    def rows(self) -> np.ndarray:
        """A copy of the workers' rows, (workers, ROW)."""
        return self.board_view()[HEAD:self.shard_beats].reshape(-1, ROW).copy()

    def beats(self) -> tuple[np.ndarray, np.ndarray]:
        """Heartbeats so far: (per worker, per shard), copies."""
        board = self.board_view()
        rows = board[HEAD:self.shard_beats].reshape(-1, ROW)
        return rows[:, Row.BEAT].copy(), board[self.shard_beats:].copy()

    # -- a worker or shard ------------------------------------------------------------------------
    def read_flags(self) -> np.ndarray:
        """My flags, read with local loads."""
        progress()
        self.flags.sync()
        np.copyto(self._flags, self.flags.local)
        return self._flags

    def beat(self, step: int = 0) -> None:
        """A heartbeat to the coordinator (at most every BEAT_S; never waits for it)."""
        if self.watchdog is not None:
            self.watchdog.beat()
        now = time.monotonic()
        if now - self._beat_at < BEAT_S:
            return
        if self._beat_req is not None and not self._beat_req.Test():
            return
        self._beat_at = now
        self._beat[0] += 1
        self._beat[1] = step
        topo = self.topo
        if topo.role is Role.SHARD:
            self._beat_req = self.board.raccumulate(self._beat[:1], COORDINATOR_RANK,
                                                    self.shard_beats + topo.index, MPI.REPLACE)
        else:
            self._beat_req = self.board.raccumulate(
                self._beat, COORDINATOR_RANK, HEAD + ROW * topo.worker_id + Row.BEAT,
                MPI.REPLACE)

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
        if self._beat_req is not None:  # no request of mine outlives the windows
            self._beat_req.Wait()
            self._beat_req = None
        if self._steps_owed:
            self._last[0], self._steps_owed = self._steps_owed, 0
            self.board.accumulate(self._last, COORDINATOR_RANK, Board.STEPS)
            self.board.flush(COORDINATOR_RANK)
        self.report(worker, STEP=step, EPOCH=epoch, POSITION=position, FINISHED=1)
        self._one[0] = 1
        self.board.accumulate(self._one, COORDINATOR_RANK, Board.DONE)
        self.board.flush(COORDINATOR_RANK)

    def settle(self) -> None:
        """Complete my heartbeat in flight (before the windows go, or before leaving)."""
        if self._beat_req is not None:
            self._beat_req.Wait()
            self._beat_req = None

    def free(self) -> None:
        """Collective."""
        self.settle()
        self.flags.free()
        self.board.free()
