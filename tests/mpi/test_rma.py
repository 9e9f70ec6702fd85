"""RMA windows (dbmpi.ps.rma) at any number of ranks: run under mpiexec -n 2 and -n 4."""

import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.ps.rma import Window

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def test_get_put_roundtrip_every_target():
    n = 1000
    win = Window(comm, n, np.float32, "t")
    win.local[:] = rank * 1000 + np.arange(n, dtype=np.float32)
    win.sync()
    comm.Barrier()
    for target in range(size):
        buf = np.empty(n // 2, np.float32)
        win.get(buf, target, offset=n // 4)
        win.flush(target)
        np.testing.assert_array_equal(buf, target * 1000 + np.arange(n // 4, n // 4 + n // 2))
    comm.Barrier()
    # each rank puts its id into its own slot of rank 0's window
    win.put(np.full(1, rank + 0.5, np.float32), 0, offset=rank)
    win.flush(0)
    comm.Barrier()
    if rank == 0:
        win.sync()
        np.testing.assert_array_equal(win.local[:size], np.arange(size) + 0.5)
    comm.Barrier()
    win.free()


def test_accumulate_and_counters_are_atomic():
    win = Window(comm, 4 if rank == 0 else 0, np.int64, "c")
    if rank == 0:
        win.local[:] = 0
        win.sync()
    comm.Barrier()
    olds = [win.fetch_and_op(1, 0, 0) for _ in range(50)]
    win.accumulate(np.array([rank + 1], np.int64), 0, 1)
    win.flush(0)
    comm.Barrier()
    assert win.load(0, 0) == 50 * size
    assert win.load(0, 1) == size * (size + 1) // 2
    # every fetched old value is distinct across ranks: each increment happened once
    all_olds = np.concatenate(comm.allgather(np.array(olds)))
    assert sorted(all_olds.tolist()) == list(range(50 * size))
    comm.Barrier()
    if rank == size - 1:
        win.store(42, 0, 2)
    comm.Barrier()
    out = np.zeros(3, np.int64)
    win.read(out, 0, 0)
    assert out.tolist() == [50 * size, size * (size + 1) // 2, 42]
    comm.Barrier()
    win.free()


def test_large_transfer_is_chunked(monkeypatch):
    import dbmpi.ps.rma as rma

    monkeypatch.setattr(rma, "CHUNK", 1000)
    n = 4321
    win = Window(comm, n, np.float32, "big")
    win.local[:] = np.arange(n) + rank
    win.sync()
    comm.Barrier()
    target = (rank + 1) % size
    buf = np.empty(n, np.float32)
    win.get(buf, target)
    win.flush(target)
    np.testing.assert_array_equal(buf, np.arange(n) + target)
    comm.Barrier()
    win.free()


def test_use_after_free_raises():
    win = Window(comm, 8, np.float32, "gone")
    win.free()
    with pytest.raises(RuntimeError, match="used after free"):
        win.get(np.empty(1, np.float32), 0)
    win.free()  # a second free is harmless


def test_a_new_window_is_zero_even_where_its_memory_was_used_before():
    """``Win.Allocate`` does not zero memory: off-node a fresh window held what an earlier one
    left (up to 1,228 non-zero int64 seen over UCX/TCP), so counters started at garbage. Dirty
    a window, free it, allocate the same size again: every rank's memory, read locally and by
    every other rank, must be zero."""
    n = 4096
    for _ in range(3):
        old = Window(comm, n, np.int64, "dirty")
        old.local[:] = np.arange(1, n + 1) * (rank + 7)
        old.sync()
        comm.Barrier()
        old.free()
        new = Window(comm, n, np.int64, "fresh")
        assert not new.local.any(), f"rank {rank}: {np.count_nonzero(new.local)} non-zero"
        for target in range(size):
            buf = np.full(n, -1, np.int64)
            new.get(buf, target)
            new.flush(target)
            assert not buf.any(), f"rank {rank} read {np.count_nonzero(buf)} non-zero on {target}"
        comm.Barrier()
        new.free()
