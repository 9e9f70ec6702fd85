"""Parameter-server windows, the shard's service loop and the worker's client.

The protocol (windows, locks, when a push becomes visible, what a fetch may observe) is
documented in :mod:`dbmpi.ps`.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import EX_TEMPFAIL, DbmpiError, TrainingError
from ..log import get_logger
from ..protocol import NSLOTS, ShardCtrl
from ..topology import Role, Topology
from .apply import APPLY_CHUNK, apply_chunks
from .layout import ParamLayout
from .rma import Window, progress

log = get_logger("ps")

# Gradient slots per worker (NSLOTS, dbmpi.protocol): a worker fills push q+1 into one slot
# while the shards still apply push q from the other, so pushing overlaps with their apply.
# Seconds a shard with workers on other nodes keeps calling MPI after applying a push.
HOT_S = 0.005
# ctrl window layout on each shard: ShardCtrl, then per worker SEQ, DONE, BASE of each slot,
# RETIRED (the worker pushes no more: finished, or lost), FETCHED of each slot (others' pushes
# applied at the fetch the slot's gradient was computed on; staleness-aware shards only)
STOP, APPLIED, CKPT_REQ, CKPT_ACK, WRITING = ShardCtrl
CTRL_HEAD, PER_WORKER = len(ShardCtrl), 2 + NSLOTS + 1 + NSLOTS
RETIRED = 2 + NSLOTS  # offsets in a worker's row
FETCHED = RETIRED + 1


def seq_index(worker: int) -> int:
    return CTRL_HEAD + PER_WORKER * worker


def ctrl_size(num_workers: int) -> int:
    return CTRL_HEAD + PER_WORKER * num_workers


class Backoff:
    """Sleep between polls, growing from ~0 to ``cap`` seconds, so waiting ranks yield the CPU."""

    def __init__(self, cap: float = 0.002, first: float = 2e-5):
        self.cap = cap
        self.first = first
        self.delay = 0.0

    def reset(self) -> None:
        self.delay = 0.0

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.cap, self.delay * 2 if self.delay else self.first)


class ParameterServer:
    """The windows of the parameter server. Collective over ``topo.comm``.

    ``worker_ranges[p]`` is the global ``[start, stop)`` of the flat vector owned by model
    partition ``p`` (the whole vector when a replica is not partitioned).

    ``mapped[s, w]``: shard ``s`` reads worker ``w``'s slots in place (same node, see
    :meth:`dbmpi.ps.rma.Window.shared`); every other pair with parameters in common has an
    *inbox* on the shard (``inbox_at``) into which the worker puts its pushes.
    """

    def __init__(self, topo: Topology, layout: ParamLayout,
                 worker_ranges: list[tuple[int, int]]):
        if layout.num_shards != topo.cfg.shards:
            raise ValueError("layout and topology disagree on the number of shards")
        if len(worker_ranges) != topo.cfg.partitions:
            raise ValueError("need one parameter range per model partition")
        self.topo = topo
        self.layout = layout
        self.worker_ranges = [tuple(map(int, r)) for r in worker_ranges]
        self.num_workers = topo.num_workers
        is_shard = topo.role is Role.SHARD
        block = layout.block_size(topo.index) if is_shard else 0
        comm = topo.comm
        self.params = Window(comm, block, np.float32, "params")
        # Each worker exposes NSLOTS slots of its own range; same-node shards read them.
        self.slot_size = 0
        if topo.role is Role.REPLICA:
            a, b = self.worker_ranges[topo.partition]
            self.slot_size = b - a
        self.grads = Window(comm, NSLOTS * self.slot_size, np.float32, "grads")
        self.ctrl = Window(comm, ctrl_size(self.num_workers) if is_shard else 0, np.int64, "ctrl")
        self.mapped = self._pair_up()
        self.inbox_at: dict[tuple[int, int], tuple[int, int]] = {}  # (s, w) -> (offset, n)
        sizes = [0] * layout.num_shards
        for s in range(layout.num_shards):
            for w in range(self.num_workers):
                n = self.overlap(s, w)
                if n and not self.mapped[s, w]:
                    self.inbox_at[s, w] = (sizes[s], n)
                    sizes[s] += NSLOTS * n
        self.inbox = Window(comm, sizes[topo.index] if is_shard else 0, np.float32, "inbox")
        self.post_windows = [self.inbox]  # what a worker's push puts into; flushed before SEQ
        self.push_windows = [self.grads, self.inbox]  # where a shard reads pushes from

    def overlap(self, shard: int, worker: int) -> int:
        """How many parameters worker ``worker``'s range has on shard ``shard``."""
        lo, hi = self.layout.block(shard)
        ws, we = self.worker_ranges[worker % self.topo.cfg.partitions]
        return max(0, min(hi, we) - max(lo, ws))

    def _pair_up(self) -> np.ndarray:
        """Which shards can map which workers' slots: each shard tries, everyone learns."""
        topo = self.topo
        row = np.zeros(self.num_workers, np.int8)
        if topo.role is Role.SHARD:
            P = topo.cfg.partitions
            for w in range(self.num_workers):
                rank = topo.worker_rank(*divmod(w, P))
                row[w] = self.grads.shared(rank) is not None
        rows = np.zeros((topo.comm.Get_size(), self.num_workers), np.int8)
        topo.comm.Allgather(row, rows)
        return rows[[topo.shard_rank(s) for s in range(self.layout.num_shards)]].astype(bool)

    def free(self) -> None:
        """Collective: free every window."""
        for w in (self.params, self.grads, self.ctrl, *self.post_windows):
            w.free()


class ShardService:
    """The loop run by one shard: apply posted pushes to its block, until told to stop.

    ``state`` (the optimizer's accumulator) and ``applied`` may come from a checkpoint.
    ``on_checkpoint(sequence, service)``, if given, is called when the coordinator asks for
    checkpoint ``sequence`` (by then every worker has paused with its pushes applied).
    ``record_order``: keep ``order``, (worker, push, learning-rate divisor) of every push
    applied, and raise WRITING while the block changes (:mod:`dbmpi.order`).
    """

    def __init__(self, ps: ParameterServer, optimizer, init_block: np.ndarray,
                 state: np.ndarray | None = None, applied: int = 0, on_checkpoint=None,
                 staleness_aware: bool = False, record_order: bool = False):
        topo = ps.topo
        assert topo.role is Role.SHARD
        self.ps = ps
        self.shard = topo.index
        self.me = topo.shard_rank(self.shard)
        self.optimizer = optimizer
        lo, hi = ps.layout.block(self.shard)
        self.block = hi - lo
        if init_block.shape != (self.block,):
            raise ValueError(f"shard {self.shard}: initial block has shape {init_block.shape}, "
                             f"expected ({self.block},)")
        self.params = ps.params.local
        self.params[:] = init_block
        ps.params.sync()
        # the optimizer's state, (len(state_names), block): cut like the block, kept whole
        self.state = optimizer.init_state(self.block)
        if state is not None and state.size:
            if state.shape != self.state.shape:
                raise ValueError(f"shard {self.shard}: optimizer state has shape {state.shape}, "
                                 f"{optimizer.name} needs {self.state.shape}")
            self.state[:] = state
        self.on_checkpoint = on_checkpoint
        self.checkpointed = 0
        # Zhang et al. 2016: a push's step is divided by its staleness (the others' pushes
        # applied since its fetch, FETCHED in its row), so a stale gradient moves less
        self.staleness_aware = staleness_aware
        self.record_order = record_order
        self.order: list[tuple[int, int, int]] = []
        self._ctrl = np.zeros(ctrl_size(ps.num_workers), dtype=np.int64)
        # Per worker: (its rank, its slot size, offset of my part in its slot, my local lo,
        # my local hi), or None when its range misses my block.
        self.worker_slices: list[tuple[int, int, int, int, int] | None] = []
        P = topo.cfg.partitions
        for w in range(ps.num_workers):
            replica, part = divmod(w, P)
            ws, we = ps.worker_ranges[part]
            a, b = max(ws, lo), min(we, hi)
            self.worker_slices.append(
                (topo.worker_rank(replica, part), we - ws, a - ws, a - lo, b - lo)
                if a < b else None)
        self.applied = applied
        self.busy_s = 0.0  # wall seconds spent applying pushes
        self.busy_cpu_s = 0.0  # CPU seconds spent applying pushes

    def _load_ctrl(self) -> np.ndarray:
        """My own counters, read with local loads after a progress call (which completes the
        atomics other ranks aimed at them; ``Win.Sync`` alone does not, off-node)."""
        progress()
        self.ps.ctrl.sync()  # remote atomics on my window are visible to my loads from here
        np.copyto(self._ctrl, self.ps.ctrl.local)
        return self._ctrl

    def _publish(self, offset: int, value: int) -> None:
        """Write one of my own counters (DONE, BASE, APPLIED, CKPT_ACK) with a local store;
        the caller's ``ctrl.sync()`` makes it visible to remote reads."""
        self.ps.ctrl.local[offset] = value

    def poll(self) -> int:
        """Apply every posted push once; return how many were applied."""
        ps = self.ps
        ctrl = self._load_ctrl()
        if ctrl[CKPT_REQ] > self.checkpointed:
            self._checkpoint(int(ctrl[CKPT_REQ]))
        pending = [w for w in range(ps.num_workers)
                   if ctrl[seq_index(w)] > ctrl[seq_index(w) + 1]]
        if not pending:
            return 0
        t0, c0 = time.perf_counter(), time.process_time()
        if self.record_order:  # a recorded fetch copies my block only while this is 0
            self._publish(WRITING, 1)
            ps.ctrl.sync()
        for win in ps.push_windows:
            win.sync()  # the pushes' data is visible from here (mapped slots and inboxes)
        # in the global order (push number, worker): each worker's in its own order, and the
        # order a staleness bound relies on (dbmpi.train.downpour.bound)
        order = sorted((push, w) for w in pending
                       for push in range(int(ctrl[seq_index(w) + 1]) + 1,
                                         int(ctrl[seq_index(w)]) + 1))
        for push, w in order:
            slot = (push - 1) % NSLOTS
            divisor = 1
            if self.worker_slices[w] is not None:
                if self.staleness_aware:
                    divisor = max(1, self.applied - (push - 1)
                                  - int(ctrl[seq_index(w) + FETCHED + slot]))
                    with self.optimizer.lr_scaled(1.0 / divisor):
                        self._apply_push(w, slot)
                else:
                    self._apply_push(w, slot)
            if self.record_order:
                self.order.append((w, push, divisor))
            self._publish(seq_index(w) + 2 + slot, self.applied)  # BASE of this push
            self.applied += 1
        applied = len(order)
        ps.params.sync()  # updates visible to fetches from here on
        self._publish(APPLIED, self.applied)
        for w in pending:
            i = seq_index(w)
            self._publish(i + 1, int(ctrl[i]))  # DONE_w = SEQ_w: acknowledged
        if self.record_order:
            self._publish(WRITING, 0)  # after APPLIED: a fetch that saw both saw the block whole
        ps.ctrl.sync()
        self.busy_s += time.perf_counter() - t0
        self.busy_cpu_s += time.process_time() - c0
        return applied

    def _slot(self, w: int, slot: int, a: int, b: int) -> np.ndarray:
        """Worker ``w``'s gradient for my block's ``[a, b)`` in push slot ``slot``: in its own
        memory when it is on my node, else in my inbox, where it put it before posting."""
        rank, size, off, a0, _ = self.worker_slices[w]
        ps = self.ps
        if ps.mapped[self.shard, w]:
            base = slot * size + off - a0
            return ps.grads.shared(rank)[base + a:base + b]
        at, n = ps.inbox_at[self.shard, w]
        base = at + slot * n - a0
        return ps.inbox.local[base + a:base + b]

    def _apply_push(self, w: int, slot: int) -> None:
        """Apply my part of worker ``w``'s push in ``slot``."""
        _, _, _, a, b = self.worker_slices[w]
        self._apply(w, a, self._slot(w, slot, a, b))

    def _apply(self, w: int, a: int, g: np.ndarray) -> None:
        """Apply gradient ``g`` of worker ``w`` to my block at ``a``, one cache-sized chunk at a
        time with a progress call between chunks.

        Refuses a non-finite push so that parameters and checkpoints stay clean: the job ends
        here, before any NaN reaches the block (the check rides on the update's own pass).
        """
        bad = apply_chunks(self.optimizer, self.params, self.state, g, a, APPLY_CHUNK, progress)
        if bad >= 0:
            lo_global = self.ps.layout.block(self.shard)[0]
            raise TrainingError(
                f"shard {self.shard}: worker {w} pushed a gradient holding NaN or Inf "
                f"(near parameter {lo_global + a + bad}); training diverged: lower "
                f"optimizer.learning_rate")

    def _checkpoint(self, sequence: int) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(sequence, self)
        self.checkpointed = sequence
        self._publish(CKPT_ACK, sequence)
        self.ps.ctrl.sync()

    def stop_requested(self) -> bool:
        return bool(self._load_ctrl()[STOP])

    def serve(self, heartbeat=None) -> int:
        """Poll until the coordinator sets STOP and nothing is pending; return pushes applied.

        ``heartbeat`` (if given) is called once per iteration (fault checks, progress).
        """
        # After a pass that applied something, poll again at once (another worker's push is
        # often posted by then); otherwise sleep 0.5 ms, 1 ms, 2 ms: each wake-up of a shard
        # on a node whose cores run replicas preempts one (measured: 20 us first sleeps cost
        # a third more shard CPU per push than 0.5 ms ones, for no gain in throughput).
        # With workers on other nodes every Put and Get aimed at me advances only while I am
        # in MPI (a 1 MiB Put took 3-6 of my progress calls over TCP): after an applied push
        # (the worker's fetch and next push follow) keep calling MPI for HOT_S, and sleep at
        # most 0.2 ms between polls.
        remote = any(s == self.shard for s, _ in self.ps.inbox_at)
        backoff = Backoff(first=2e-5, cap=2e-4) if remote else Backoff(first=5e-4)
        hot_until = 0.0
        while True:
            if heartbeat is not None:
                heartbeat()
            if self.poll():
                backoff.reset()
                hot_until = time.perf_counter() + HOT_S if remote else 0.0
                continue
            if self.stop_requested():
                # A worker may have posted between the poll and the STOP read.
                while self.poll():
                    pass
                return self.applied
            if time.perf_counter() >= hot_until:
                backoff.wait()


def request_stop(ps: ParameterServer) -> None:
    """Coordinator: tell every shard to finish (after all workers have been acknowledged)."""
    for s in range(ps.layout.num_shards):
        ps.ctrl.store(1, ps.topo.shard_rank(s), STOP)


class RankUnreachable(DbmpiError):
    """A rank did not answer the coordinator within ``checkpoint.deadline_s`` (frozen, hung,
    or its node lost): the job ends without committing, so the previous checkpoint stays the
    newest. Its own exit status, so a job script can tell it from bad input (2) and SIGTERM
    (143): 75, EX_TEMPFAIL, "try again later": the same command resumes once the node is back."""

    exit_code = EX_TEMPFAIL


def stuck_shards(ps: ParameterServer, pause: float = 0.25) -> list[int]:
    """Coordinator: the shards that hold a posted push and applied none of them over
    ``pause`` seconds (a live shard applies one within milliseconds): frozen or hung."""
    def pending() -> dict[int, list[int]]:
        out = {}
        for s in range(ps.layout.num_shards):
            r = ps.topo.shard_rank(s)
            out[s] = [int(ps.ctrl.load(r, seq_index(w) + 1)) for w in range(ps.num_workers)
                      if ps.ctrl.load(r, seq_index(w)) > ps.ctrl.load(r, seq_index(w) + 1)]
        return out

    before = pending()
    t = time.monotonic() + pause
    while time.monotonic() < t:
        progress()
        time.sleep(0.01)
    after = pending()
    return [s for s in before if before[s] and after[s] and before[s] == after[s]]


def request_checkpoint(ps: ParameterServer, sequence: int, heartbeat=None,
                       deadline: float | None = None) -> list[int]:
    """Coordinator: have every shard write checkpoint ``sequence``; return when all have, or
    at ``deadline`` (``time.monotonic()``) with the shards that have not (``[]``: all have).

    Call only while no push is in flight (workers paused or finished). Each load of a shard's
    counter completes without that shard on one node (shared memory); over the network MPICH
    completes it only while the shard is inside MPI, so a frozen remote shard blocks the load
    itself, where no deadline of ours can reach (docs/faults.md).
    """
    ranks = [ps.topo.shard_rank(s) for s in range(ps.layout.num_shards)]
    for r in ranks:
        ps.ctrl.store(sequence, r, CKPT_REQ)
    backoff = Backoff(cap=0.01)
    for r in ranks:
        while ps.ctrl.load(r, CKPT_ACK) < sequence:
            if deadline is not None and time.monotonic() >= deadline:
                return [s for s, r in enumerate(ranks) if ps.ctrl.load(r, CKPT_ACK) < sequence]
            if heartbeat is not None:
                heartbeat()
            progress()
            backoff.wait()
    return []
