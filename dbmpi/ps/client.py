"""A worker's (or the coordinator's) client of the parameter server: fetch, push, staleness.

The protocol is documented in :mod:`dbmpi.ps`; the windows and the shard's loop are in
:mod:`dbmpi.ps.server`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .server import (
    APPLIED,
    FETCHED,
    NSLOTS,
    PER_WORKER,
    RETIRED,
    WRITING,
    Backoff,
    ParameterServer,
    ctrl_size,
    seq_index,
)


@dataclass
class _ShardCounters:
    pushes: int = 0  # my pushes posted to this shard
    done: int = 0  # my pushes it had acknowledged when I last read its counters
    others_at_fetch: int = 0  # other workers' pushes applied there when I last fetched
    last_recorded: int = 0  # my push whose staleness was recorded last
    staleness: list = field(default_factory=list)


class PSClient:
    """A worker's (or the coordinator's) view of the parameter server for ``[start, stop)``."""

    def __init__(self, ps: ParameterServer, start: int, stop: int, worker: int | None = None,
                 replica: int = 0):
        self.ps = ps
        self.start, self.stop = start, stop
        self.worker = worker
        self.replica = replica
        self.segments = ps.layout.segments(start, stop)
        self.counters = {seg.shard: _ShardCounters() for seg in self.segments}
        self.pushes = 0  # pushes posted (to every shard of my range)
        self._mine = np.zeros(PER_WORKER, dtype=np.int64)
        self._all = np.zeros(ctrl_size(ps.num_workers), dtype=np.int64)
        self.wait_s = 0.0
        # test-only (dbmpi.faults.KillPoint): called with the number of shards whose SEQ has
        # moved for the push being posted (0: its data is in place, no SEQ moved yet)
        self.on_post = None
        # a staleness-aware PS (dbmpi.ps.ShardService) reads each push's fetch point
        self.report_fetch = False
        # a recorded run (dbmpi.order): each fetch copies whole blocks and notes, per shard,
        # how many pushes that block held
        self.record_order = False
        self.fetch_log: list[list[int]] = []

    # -- fetch -------------------------------------------------------------------------------
    def fetch(self, params: np.ndarray, read_own_pushes: bool = False) -> None:
        """Read the current parameters of my range into ``params`` (length stop - start)."""
        if read_own_pushes:
            self.wait_acknowledged()
        ps = self.ps
        seen = []
        for seg in self.segments:
            target = ps.topo.shard_rank(seg.shard)
            self._note_fetch(seg.shard, target)
            lo = seg.start - self.start
            view = ps.params.shared(target)
            if self.record_order:
                seen.append(self._fetch_whole(seg, params[lo:lo + seg.count], target, view))
            elif view is not None:  # same node: copy with loads, no RMA
                ps.params.sync()
                np.copyto(params[lo:lo + seg.count], view[seg.offset:seg.offset + seg.count])
            else:
                ps.params.get(params[lo:lo + seg.count], target, seg.offset)
        self._complete_fetch()
        if self.record_order:
            self.fetch_log.append(seen)

    def _fetch_whole(self, seg, dst: np.ndarray, target: int, view) -> int:
        """Copy my part of ``seg.shard``'s block while no push changes it, and return how many
        pushes it held: the shard's WRITING was 0 and its APPLIED the same before and after
        the copy (a sequence lock; the shard raises WRITING before its first store to the
        block and lowers it after publishing APPLIED)."""
        ps, backoff = self.ps, Backoff(cap=0.0005)
        while True:
            before = self._applied_if_still(target)
            if before >= 0:
                if view is not None:
                    ps.params.sync()
                    np.copyto(dst, view[seg.offset:seg.offset + seg.count])
                    ps.params.sync()  # the copy's loads before the second reading
                else:
                    ps.params.get(dst, target, seg.offset)
                    ps.params.flush(target)
                if self._applied_if_still(target) == before:
                    return before
            backoff.wait()

    def _applied_if_still(self, target: int) -> int:
        """The shard's APPLIED, or -1 while it is changing its block."""
        if self.ps.ctrl.load(target, WRITING):
            return -1
        return int(self.ps.ctrl.load(target, APPLIED))

    def _note_fetch(self, shard: int, target: int) -> None:
        """One read of a shard's counters at a fetch, for staleness (workers only)."""
        if self.worker is None:
            return
        ctrl = self.ps.ctrl.read(self._all, target)
        i = seq_index(self.worker)
        self._record(shard, ctrl[i:i + PER_WORKER])  # against the last fetch
        self.counters[shard].others_at_fetch = int(ctrl[APPLIED] - ctrl[i + 1])

    def _complete_fetch(self) -> None:
        """Complete the fetch's Gets (shards on other nodes; same-node copies are done)."""
        ps = self.ps
        for seg in self.segments:
            target = ps.topo.shard_rank(seg.shard)
            if ps.params.shared(target) is None:
                ps.params.flush(target)

    # -- push --------------------------------------------------------------------------------
    def push_buffer(self) -> np.ndarray:
        """The slot my next push goes to, once every shard has pulled what it last held.

        Fill it (e.g. accumulate gradients into it) and pass it to :meth:`push`: no copy.
        """
        assert self.worker is not None, "only workers push"
        push = self.pushes + 1
        for seg in self.segments:
            self._wait_slot(seg.shard, self.ps.topo.shard_rank(seg.shard), push - NSLOTS)
        size = self.stop - self.start
        assert size == self.ps.slot_size, "a worker pushes exactly its partition's range"
        k = (push - 1) % NSLOTS
        return self.ps.grads.local[k * size:(k + 1) * size]

    def push(self, grads: np.ndarray) -> None:
        """Post the gradient of my range (length stop - start) to the shards.

        ``grads`` is copied into my next slot unless it is that slot (:meth:`push_buffer`).
        Waits only while that slot holds a push some shard has not pulled yet (at most
        NSLOTS pushes of mine are in flight). The shards Get it from my window.
        """
        ps = self.ps
        slot = self.push_buffer()
        if not (grads.__array_interface__["data"][0] == slot.__array_interface__["data"][0]
                and grads.shape == slot.shape):
            np.copyto(slot, grads)
        ps.grads.sync()  # my stores to the slot are visible before any shard sees SEQ move
        sent = [ps.topo.shard_rank(seg.shard) for seg in self.segments
                if self._post(seg, slot, self.pushes % NSLOTS)]
        for target in sent:  # the inboxes hold the push before SEQ moves
            for win in ps.post_windows:
                win.flush(target)
        if self.report_fetch:  # before SEQ moves: the shard reads it when it applies the push
            k = self.pushes % NSLOTS
            for seg in self.segments:
                self.ps.ctrl.store(self.counters[seg.shard].others_at_fetch,
                                   ps.topo.shard_rank(seg.shard),
                                   seq_index(self.worker) + FETCHED + k)
        if self.on_post is not None:
            self.on_post(0)
        for i, seg in enumerate(self.segments):
            ps.ctrl.fetch_and_op(1, ps.topo.shard_rank(seg.shard), seq_index(self.worker))
            self.counters[seg.shard].pushes += 1
            if self.on_post is not None:
                self.on_post(i + 1)
        self.pushes += 1

    def _post(self, seg, slot: np.ndarray, k: int) -> bool:
        """Start putting my part of ``slot`` (slot number ``k``) on shard ``seg.shard`` into
        its inbox, unless that shard reads my memory in place; True if a Put was started.

        A push goes into shard-side memory because a shard on another node could only pull
        it while I am inside MPI, i.e. after my next compute step (measured over TCP: a 52 ms
        pull for 50 ms of compute)."""
        ps = self.ps
        if ps.mapped[seg.shard, self.worker]:
            return False
        at, n = ps.inbox_at[seg.shard, self.worker]
        lo = seg.start - self.start
        ps.inbox.put(slot[lo:lo + n], ps.topo.shard_rank(seg.shard), at + k * n)
        return True

    def shard_counters(self) -> list[np.ndarray]:
        """A copy of the ``ctrl`` counters of each shard of my range (atomic per element)."""
        return [self.ps.ctrl.read(self._all, self.ps.topo.shard_rank(seg.shard)).copy()
                for seg in self.segments]

    def retire(self) -> None:
        """Mark me as pushing no more on every shard of my range (their RETIRED)."""
        for seg in self.segments:
            self.ps.ctrl.store(1, self.ps.topo.shard_rank(seg.shard),
                               seq_index(self.worker) + RETIRED)

    def wait_acknowledged(self) -> None:
        """Block until every shard has applied all my pushes."""
        for seg in self.segments:
            self._wait_slot(seg.shard, self.ps.topo.shard_rank(seg.shard),
                            self.counters[seg.shard].pushes)

    def drain_staleness(self) -> list[list[tuple[int, int]]]:
        """(push number, staleness) of my pushes acknowledged since the last call, per shard."""
        out = []
        for seg in self.segments:
            c = self.counters[seg.shard]
            out.append(c.staleness)
            c.staleness = []
        return out

    def _read_worker(self, target: int) -> np.ndarray:
        """[SEQ, DONE, BASE of each slot] of my row on ``target``."""
        return self.ps.ctrl.read(self._mine, target, seq_index(self.worker))

    def _wait_slot(self, shard: int, target: int, need: int) -> None:
        """Wait until the shard has consumed my pushes up to number ``need``."""
        c = self.counters[shard]
        if c.done >= need:  # known from an earlier read: no MPI call
            return
        self._record(shard, self._read_worker(target))
        if c.done < need:
            t0 = time.perf_counter()
            backoff = Backoff(cap=0.0005)
            while c.done < need:
                backoff.wait()
                self._record(shard, self._read_worker(target))
            self.wait_s += time.perf_counter() - t0

    def _record(self, shard: int, mine: np.ndarray) -> None:
        """Take in a reading of my row [SEQ, DONE, BASE...] on ``shard``: the acknowledged
        count, and the staleness of pushes newly acknowledged."""
        c = self.counters[shard]
        c.done = int(mine[1])
        for push in range(c.last_recorded + 1, c.done + 1):
            # Push number `push` is acknowledged and its slot not yet reused: its BASE pushes
            # were applied before it, push - 1 of them mine. Counters are read one element at
            # a time, so a fetch racing my own acknowledgement can make this 1 too small.
            base = int(mine[2 + (push - 1) % NSLOTS])
            others_before = base - (push - 1)
            c.staleness.append((push, max(0, others_before - c.others_at_fetch)))
            c.last_recorded = push
