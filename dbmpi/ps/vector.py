"""Sandblaster's parameter server: shard-local vector math driven by small commands.

The coordinator runs L-BFGS (:mod:`dbmpi.optim.lbfgs`) without holding any vector. Every
vector the optimiser uses (the point being evaluated ``W``, its gradient, the iterate, the
gradient there, the direction and the history pairs) is cut into the S blocks of
:class:`~dbmpi.ps.layout.ParamLayout`, and shard s holds block s of each, in float64.

Protocol
========
Commands (coordinator -> shards, point-to-point)
    A *program* is a float64 array of fixed-size records ``[op, a, b, c, alpha, beta]``
    (:class:`Op`); ``a``, ``b``, ``c`` are vector handles. The coordinator queues operations and
    sends the program, with a standard ``Send`` of tag :attr:`dbmpi.protocol.Tag.COMMAND` on a
    duplicate of the job's communicator, to every shard when it needs results (dot products) or
    an acknowledgement. A shard polls (``Iprobe`` with backoff, so an idle shard yields its
    core), receives the program, executes the records in order on its blocks, and joins a
    ``Reduce`` (SUM, root = coordinator) over the coordinator+shards communicator of a vector
    holding its partial dot products (one slot when there are none: the acknowledgement). Only
    these scalars travel back; every program is a synchronous round trip, so when ``dots``
    returns, every shard has finished every operation sent before.
Windows (``MPI.Win.Allocate``, one ``Lock_all(MODE_NOCHECK)`` epoch, :mod:`dbmpi.ps.rma`)
    ``x`` (float64, block)
        Vector ``W`` itself: the point being evaluated. Replicas ``Get`` it at the start of
        an evaluation (a *fetch*). Shards write it only while executing a program, and the
        coordinator hands out an evaluation's work only after the program that set ``W``
        returned, so a fetch for evaluation e always sees e's point.
    ``gacc`` (float64, block)
        Where replicas ``Accumulate(SUM)`` their gradient sums (a *push*). Zeroed by the shard
        (``BEGIN_EVAL``, local stores between two ``Win.Sync``) while no push can be in flight.
    ``count`` (int64, 1)
        Examples pushed so far, over the whole run: after its data is complete (``Flush``) a
        push adds its example count with ``Accumulate(SUM)``; the shard reads it with
        ``Get_accumulate(NO_OP)``. One writer op and NO_OP readers, as everywhere in dbmpi.
Evaluations
    ``BEGIN_EVAL`` zeroes ``gacc``. ``END_EVAL(dst, n, target, l2)`` waits until ``count``
    reaches ``target`` (every push of the evaluation has landed: the coordinator knows the
    cumulative total because it grants each push, see :mod:`dbmpi.train.sandblaster`), then
    sets ``dst = gacc / n + l2 * W``: the gradient of the mean loss plus the L2 term.

Why point-to-point commands rather than a command window: a command is tiny and latency
bound, the shard has nothing else to do meanwhile, and MPI's message ordering gives program
order for free; the reply needs a reduction over shards anyway.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence

import numpy as np
from mpi4py import MPI

from ..protocol import Tag
from ..topology import COORDINATOR_RANK, Role, Topology
from .layout import ParamLayout
from .rma import Window
from .server import Backoff

RECORD = 6  # float64 fields per command record


@enum.unique
class Op(enum.IntEnum):
    COPY = 1  # a = b
    SCALE = 2  # a *= alpha
    AXPY = 3  # a += alpha * b
    LINCOMB = 4  # a = alpha * b + beta * c
    DOT = 5  # result: a . b
    BEGIN_EVAL = 6  # gacc = 0
    END_EVAL = 7  # wait for count >= c; a = gacc / b + alpha * W
    STOP = 8  # leave the service loop
    MUL = 9  # a = b * c, coefficient-wise


class VectorWindows:
    """The windows and communicators of the vector service. Collective over ``topo.comm``."""

    def __init__(self, topo: Topology, layout: ParamLayout):
        if layout.num_shards != topo.cfg.shards:
            raise ValueError("layout and topology disagree on the number of shards")
        self.topo, self.layout = topo, layout
        is_shard = topo.role is Role.SHARD
        block = layout.block_size(topo.index) if is_shard else 0
        self.comm = topo.comm.Dup()  # commands and Sandblaster's scheduling messages
        in_cs = topo.role in (Role.COORDINATOR, Role.SHARD)
        self.comm_cs = topo.comm.Split(0 if in_cs else MPI.UNDEFINED, topo.rank)
        self.x = Window(topo.comm, block, np.float64, "x")
        self.gacc = Window(topo.comm, block, np.float64, "gacc")
        self.count = Window(topo.comm, 1 if is_shard else 0, np.int64, "count")

    def free(self) -> None:
        """Collective: free the windows and communicators."""
        for w in (self.x, self.gacc, self.count):
            w.free()
        if self.comm_cs != MPI.COMM_NULL:
            self.comm_cs.Free()
        self.comm.Free()


class VectorShard:
    """One shard: its blocks of every vector, and the loop executing the coordinator's programs.

    ``vectors - 1`` blocks are local arrays; vector 0 (``W``) is the ``x`` window's memory.
    """

    def __init__(self, win: VectorWindows, num_vectors: int, w0: np.ndarray,
                 heartbeat=None):
        from ..optim.lbfgs import NumpySpace

        topo = win.topo
        assert topo.role is Role.SHARD
        self.win = win
        self.me = topo.rank
        n = win.layout.block_size(topo.index)
        if w0.shape != (n,):
            raise ValueError(f"shard {topo.index}: initial block has shape {w0.shape}, "
                             f"expected ({n},)")
        win.x.local[:] = w0
        win.x.sync()
        win.gacc.local[:] = 0.0
        win.gacc.sync()
        self.space = NumpySpace([win.x.local] + [np.zeros(n) for _ in range(num_vectors - 1)])
        self.heartbeat = heartbeat
        self._count = np.zeros(1, np.int64)
        self.programs = 0
        self.busy_s = 0.0
        self.push_wait_s = 0.0

    def init_vector(self, handle: int, values: np.ndarray) -> None:
        self.space.v[handle][:] = values

    def _recv_program(self) -> np.ndarray:
        comm, status = self.win.comm, MPI.Status()
        backoff = Backoff(cap=0.001)
        while not comm.Iprobe(COORDINATOR_RANK, Tag.COMMAND, status):
            if self.heartbeat is not None:
                self.heartbeat()
            backoff.wait()
        prog = np.empty(status.Get_count(MPI.DOUBLE), np.float64)
        comm.Recv([prog, MPI.DOUBLE], COORDINATOR_RANK, Tag.COMMAND)
        return prog.reshape(-1, RECORD)

    def _wait_count(self, target: int) -> None:
        t0 = time.perf_counter()
        backoff = Backoff(cap=0.0005)
        while self.win.count.read(self._count, self.me)[0] < target:
            if self.heartbeat is not None:
                self.heartbeat()
            backoff.wait()
        self.push_wait_s += time.perf_counter() - t0

    def execute(self, prog: np.ndarray) -> tuple[np.ndarray, bool]:
        """Run one program; return (partial dot products, stop requested)."""
        sp, results, stop = self.space, [], False
        for op, a, b, c, alpha, beta in prog:
            op, a, b, c = int(op), int(a), int(b), int(c)
            if op == Op.COPY:
                sp.copy(a, b)
            elif op == Op.SCALE:
                sp.scale(a, alpha)
            elif op == Op.AXPY:
                sp.axpy(a, alpha, b)
            elif op == Op.LINCOMB:
                sp.lincomb(a, alpha, b, beta, c)
            elif op == Op.DOT:
                results.append(sp.dot(a, b))
            elif op == Op.BEGIN_EVAL:
                self.win.gacc.sync()
                self.win.gacc.local[:] = 0.0
                self.win.gacc.sync()
            elif op == Op.END_EVAL:
                self._wait_count(c)
                self.win.gacc.sync()
                np.multiply(self.win.gacc.local, 1.0 / b, out=sp.v[a])
                if alpha:
                    sp.v[a] += alpha * sp.v[0]
            elif op == Op.MUL:
                sp.mul(a, b, c)
            elif op == Op.STOP:
                stop = True
            else:
                raise ValueError(f"unknown Sandblaster command {op}")
            if a == 0 and op in (Op.COPY, Op.SCALE, Op.AXPY, Op.LINCOMB, Op.MUL):
                self.win.x.sync()  # W changed: visible to the next fetch
        return np.array(results or [0.0], np.float64), stop

    def serve(self) -> int:
        """Execute programs until STOP; return how many were executed."""
        while True:
            prog = self._recv_program()
            t0 = time.perf_counter()
            results, stop = self.execute(prog)
            self.busy_s += time.perf_counter() - t0
            self.win.comm_cs.Reduce([results, MPI.DOUBLE], None, MPI.SUM, root=0)
            self.programs += 1
            if stop:
                return self.programs


class ShardVectors:
    """The coordinator's :class:`~dbmpi.optim.lbfgs.VectorSpace` over the shards' blocks.

    Operations are queued and sent as one program with the next :meth:`dots` or
    :meth:`flush`; each of those is one round trip.
    """

    def __init__(self, win: VectorWindows):
        assert win.topo.role is Role.COORDINATOR
        self.win = win
        self.shard_ranks = [win.topo.shard_rank(s) for s in range(win.layout.num_shards)]
        self.queue: list[tuple] = []
        self.round_trips = 0
        self.wait_s = 0.0

    def _op(self, op: Op, a: int = 0, b: int = 0, c: int = 0, alpha: float = 0.0,
            beta: float = 0.0) -> None:
        self.queue.append((float(op), a, b, c, alpha, beta))

    def copy(self, dst: int, src: int) -> None:
        self._op(Op.COPY, dst, src)

    def scale(self, x: int, alpha: float) -> None:
        self._op(Op.SCALE, x, alpha=alpha)

    def axpy(self, y: int, alpha: float, x: int) -> None:
        self._op(Op.AXPY, y, x, alpha=alpha)

    def lincomb(self, dst: int, alpha: float, x: int, beta: float, y: int) -> None:
        self._op(Op.LINCOMB, dst, x, y, alpha, beta)

    def mul(self, dst: int, x: int, y: int) -> None:
        self._op(Op.MUL, dst, x, y)

    def begin_eval(self) -> None:
        self._op(Op.BEGIN_EVAL)

    def end_eval(self, dst: int, n_examples: int, target: int, l2: float) -> None:
        """Queue: wait for ``target`` examples pushed, then ``dst = gacc / n + l2 * W``."""
        self._op(Op.END_EVAL, dst, n_examples, target, l2)

    def dots(self, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        for a, b in pairs:
            self._op(Op.DOT, a, b)
        out = self._send()
        return out[:len(pairs)]

    def flush(self) -> None:
        """Send what is queued and wait until every shard has executed it."""
        self._send()

    def stop(self) -> None:
        self._op(Op.STOP)
        self._send()

    def _send(self) -> np.ndarray:
        prog = np.array(self.queue, np.float64).reshape(-1, RECORD)
        self.queue = []
        comm = self.win.comm
        for r in self.shard_ranks:
            comm.Send([prog, MPI.DOUBLE], r, Tag.COMMAND)
        n_dots = int(np.count_nonzero(prog[:, 0] == Op.DOT))
        mine = np.zeros(max(1, n_dots), np.float64)
        out = np.zeros_like(mine)
        t0 = time.perf_counter()
        self.win.comm_cs.Reduce([mine, MPI.DOUBLE], [out, MPI.DOUBLE], MPI.SUM, root=0)
        self.wait_s += time.perf_counter() - t0
        self.round_trips += 1
        return out


class VectorClient:
    """A replica's (or the coordinator's) access to ``W`` and ``gacc`` on every shard."""

    def __init__(self, win: VectorWindows):
        self.win = win
        n = win.layout.total
        self.segments = win.layout.segments(0, n)
        self.ranks = [win.topo.shard_rank(seg.shard) for seg in self.segments]
        self._one = np.zeros(1, np.int64)
        self.fetches = 0
        self.pushes = 0

    def fetch(self, out: np.ndarray) -> None:
        """Read vector ``W`` (float64, the full length) into ``out``."""
        for seg, r in zip(self.segments, self.ranks):
            self.win.x.get(out[seg.start:seg.stop], r, seg.offset)
        for r in self.ranks:
            self.win.x.flush(r)
        self.fetches += 1

    def push(self, grad_sum: np.ndarray, n_examples: int) -> None:
        """Add a gradient sum over ``n_examples`` examples into every shard's ``gacc``.

        The data is complete at each shard (``Flush``) before its example count moves.
        """
        for seg, r in zip(self.segments, self.ranks):
            self.win.gacc.accumulate(grad_sum[seg.start:seg.stop], r, seg.offset, MPI.SUM)
        self._one[0] = n_examples
        for r in self.ranks:
            self.win.gacc.flush(r)
            self.win.count.accumulate(self._one, r, 0, MPI.SUM)
        for r in self.ranks:
            self.win.count.flush(r)
        self.pushes += 1
