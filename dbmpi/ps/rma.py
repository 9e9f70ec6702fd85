"""One-sided MPI windows: the only place dbmpi calls MPI RMA.

A :class:`Window` is allocated collectively with ``MPI.Win.Allocate`` and spends its whole life
inside one passive-target access epoch opened with ``Lock_all(MODE_NOCHECK)``; every operation
is completed with ``Flush``. Measured on MPICH (see the README's notes on RMA): windows made
with ``Win.Allocate`` and used in NOCHECK epochs progress without the target calling MPI, while
``Win.Create`` windows and ordinary lock epochs stall until the target re-enters MPI, and mixing
NOCHECK and ordinary epochs on one window hangs MPICH 5.0. So there is exactly one discipline.

Atomicity: MPI's default ``accumulate_ops=same_op_no_op`` lets the library assume that
concurrent accumulate-family calls on one location use one op or ``NO_OP``. Every location in
dbmpi therefore has one writer op (SUM or REPLACE) and readers that use ``NO_OP``.

Transfers larger than ``CHUNK`` elements are split, so counts stay well inside ``int``.

Two facts of MPI's network path shape every window (measured with MPICH 5 over UCX/TCP and
libfabric tcp; see docs/multihost.md):

* ``Win.Allocate`` does not zero its memory. On one node MPICH happens to hand out fresh
  shared memory; across nodes a new window can hold whatever the last one left (up to 1,228
  non-zero int64 were seen), so a counter would start at garbage. Every window is zeroed here,
  before any rank can reach it.
* Passive-target operations complete only while the *target* is inside an MPI call that makes
  progress (``Iprobe``, ``Flush``; not ``Win.Sync``): over TCP the library emulates RMA in
  software, and MPICH sends every accumulate-family call as an active message even on
  InfiniBand. A rank that owns a window others operate on therefore calls :func:`progress`
  while it waits or polls, and no operation targets a rank that may compute for long.

On-node fast path: MPI-4 lets ``MPI_Win_shared_query`` be called on a window made with
``Win.Allocate``; where the target's memory is directly addressable (same node), :meth:`shared`
returns it as a numpy array and bulk data moves with plain loads and stores (no copy through
the MPI library, and a shard can apply a gradient straight from a worker's memory). Ranks on
other nodes, or MPI libraries that do not share the memory, get ``None`` and the RMA calls.
``DBMPI_RMA_SHARED=0`` turns the fast path off (the tests run the protocol both ways).
Counters always go through atomics.
"""

from __future__ import annotations

import os

import numpy as np
from mpi4py import MPI

from ..protocol import Tag

CHUNK = 1 << 22  # elements per RMA call (16 MiB of float32)
SHARED_MEMORY = os.environ.get("DBMPI_RMA_SHARED", "1") != "0"

_MPI_TYPES = {
    np.dtype(np.float32): MPI.FLOAT,
    np.dtype(np.float64): MPI.DOUBLE,
    np.dtype(np.int64): MPI.INT64_T,
}


def progress() -> None:
    """Let MPI complete one-sided operations that target this rank (cheap: one ``Iprobe``,
    ~1 us on one node). Call it from every loop in which a window owner waits or polls."""
    MPI.COMM_WORLD.Iprobe(MPI.ANY_SOURCE, Tag.PROGRESS)  # a tag never sent


class Window:
    """A typed window of ``count`` elements on this rank (0 on ranks that expose nothing).

    Collective over ``comm``. ``local`` is this rank's own memory as a numpy array (writes to
    it become visible to other ranks after :meth:`sync`).
    """

    def __init__(self, comm: MPI.Comm, count: int, dtype=np.float32, name: str = "window"):
        self.dtype = np.dtype(dtype)
        self.mpi_type = _MPI_TYPES[self.dtype]
        self.name = name
        itemsize = self.dtype.itemsize
        self.win = MPI.Win.Allocate(int(count) * itemsize, itemsize, MPI.INFO_NULL, comm)
        mem = self.win.tomemory()
        self.local = np.frombuffer(mem, dtype=self.dtype, count=int(count)) if count else \
            np.zeros(0, dtype=self.dtype)
        self.local[:] = 0  # Allocate does not zero (see above)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.win.Sync()
        comm.Barrier()  # nobody reaches a window before its owner has zeroed it
        self._freed = False
        self._shared: dict[int, np.ndarray | None] = {}
        self._one = np.zeros(1, dtype=self.dtype)
        self._res = np.zeros(1, dtype=self.dtype)

    def _check(self) -> None:
        if self._freed:
            raise RuntimeError(f"RMA window '{self.name}' was used after free()")

    def _chunks(self, buf: np.ndarray, offset: int):
        n = buf.shape[0]
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            yield buf[lo:hi], (offset + lo, hi - lo, self.mpi_type)

    def get(self, buf: np.ndarray, target: int, offset: int = 0) -> None:
        """Start reading ``len(buf)`` elements at ``offset`` of ``target`` into ``buf``.

        Complete with :meth:`flush` before reading ``buf``.
        """
        self._check()
        for part, spec in self._chunks(buf, offset):
            self.win.Get([part, self.mpi_type], target, spec)

    def get_rows(self, buf: np.ndarray, target: int, rows: np.ndarray, offset: int = 0) -> None:
        """Start reading rows ``rows`` (int64) of a row-major table of rows of ``buf.shape[1]``
        elements at ``offset`` of ``target`` into ``buf`` (k, row_len), in one ``Get`` with an
        indexed datatype (byte displacements, so offsets may pass 2**31 elements). Complete
        with :meth:`flush`; an empty ``rows`` does nothing."""
        self._check()
        k, row_len = buf.shape
        if k == 0:
            return
        itemsize = self.dtype.itemsize
        disp = ((offset + np.asarray(rows, np.int64) * row_len) * itemsize).tolist()
        rowtype = self.mpi_type.Create_hindexed_block(row_len, disp).Commit()
        try:
            self.win.Get([buf, k * row_len, self.mpi_type], target, (0, 1, rowtype))
        finally:
            rowtype.Free()  # MPI keeps it alive until the Get completes

    def put(self, buf: np.ndarray, target: int, offset: int = 0) -> None:
        """Start writing ``buf`` at ``offset`` of ``target``; complete with :meth:`flush`."""
        self._check()
        for part, spec in self._chunks(buf, offset):
            self.win.Put([part, self.mpi_type], target, spec)

    def accumulate(self, buf: np.ndarray, target: int, offset: int = 0, op=MPI.SUM) -> None:
        """Start an element-wise atomic ``op`` of ``buf`` into ``target``."""
        self._check()
        for part, spec in self._chunks(buf, offset):
            self.win.Accumulate([part, self.mpi_type], target, spec, op)

    def raccumulate(self, buf: np.ndarray, target: int, offset: int = 0,
                    op=MPI.SUM) -> MPI.Request:
        """Start an element-wise atomic ``op`` of ``buf`` (at most ``CHUNK`` elements) into
        ``target`` and return its request: ``Test`` it instead of waiting in :meth:`flush`
        for a target that may be busy. ``buf`` must stay untouched until it completes."""
        self._check()
        return self.win.Raccumulate([buf, self.mpi_type], target,
                                    (offset, buf.shape[0], self.mpi_type), op)

    def shared(self, target: int) -> np.ndarray | None:
        """``target``'s window memory as an array this rank can load and store directly, or
        None (another node, the fast path off, or an empty window). Order accesses with
        :meth:`sync` as for :attr:`local`."""
        self._check()
        if target not in self._shared:
            view = None
            if SHARED_MEMORY:
                try:
                    mem, _ = self.win.Shared_query(target)
                    n = len(mem) // self.dtype.itemsize if mem is not None else 0
                    if n:
                        view = np.frombuffer(mem, dtype=self.dtype, count=n)
                except MPI.Exception:  # not shared with this rank
                    view = None
            self._shared[target] = view
        return self._shared[target]

    def read(self, out: np.ndarray, target: int, offset: int = 0) -> np.ndarray:
        """Atomic (per element) read of ``len(out)`` elements; completes before returning."""
        self._check()
        for part, spec in self._chunks(out, offset):
            self.win.Get_accumulate([part, self.mpi_type], [part, self.mpi_type], target, spec,
                                    MPI.NO_OP)
        self.win.Flush(target)
        return out

    def fetch_and_op(self, value, target: int, offset: int = 0, op=MPI.SUM):
        """Atomically apply ``op`` with ``value`` at one element and return its old value."""
        self._check()
        self._one[0] = value
        self.win.Fetch_and_op([self._one, self.mpi_type], [self._res, self.mpi_type], target,
                              offset, op)
        self.win.Flush(target)
        return self._res[0].item()

    def load(self, target: int, offset: int = 0):
        """Atomic read of one element."""
        return self.fetch_and_op(0, target, offset, MPI.NO_OP)

    def store(self, value, target: int, offset: int = 0) -> None:
        """Atomic write of one element (``Accumulate`` with ``REPLACE``), completed."""
        self.fetch_and_op(value, target, offset, MPI.REPLACE)

    def flush(self, target: int) -> None:
        """Complete every operation this rank started on ``target``."""
        self._check()
        self.win.Flush(target)

    def sync(self) -> None:
        """Memory barrier between local loads/stores of ``local`` and RMA (unified model)."""
        self._check()
        self.win.Sync()

    def free(self) -> None:
        """Collective: close the epoch and free the window. Any later use raises."""
        if self._freed:
            return
        self.win.Unlock_all()
        self.local = None
        self._shared.clear()
        self.win.Free()
        self._freed = True
