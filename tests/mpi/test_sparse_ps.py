"""Sparse embedding traffic (dbmpi.ps.sparse) at any number of ranks >= 2.

Shards first, then workers, no coordinator (as tests/mpi/test_ps.py). Every test runs with
bulk data through on-node shared memory and through RMA calls (indexed-datatype Gets).
"""

import numpy as np
import pytest
from mpi4py import MPI

import cython_kernels.reference as ref
from dbmpi.config import TopologyConfig
from dbmpi.optim import SGD, Adagrad
from dbmpi.ps.server import request_stop
from dbmpi.ps.sparse import SparseClient, SparseParameterServer, SparseShardService, row_layout
from dbmpi.topology import Role, Topology

comm = MPI.COMM_WORLD
size = comm.Get_size()
CONFIGS = [(s, size - s) for s in (1, 2, 3) if size - s >= 1]
V, D, REST = 37, 5, 23  # table 37 x 5, then 23 dense parameters
N = V * D + REST


@pytest.fixture(autouse=True, params=[True, False], ids=["shared-memory", "rma"])
def data_path(request, monkeypatch):
    from dbmpi.ps import rma

    monkeypatch.setattr(rma, "SHARED_MEMORY", request.param)
    return request.param


def _setup(shards, replicas, optimizer, init, rows_max=V):
    topo = Topology.create(TopologyConfig(shards=shards, replicas=replicas), comm,
                           coordinator=False)
    layout = row_layout(N, shards, V, D)
    ps = SparseParameterServer(topo, layout, [(0, N)], V, D, rows_max)
    service = None
    if topo.role is Role.SHARD:
        lo, hi = layout.block(topo.index)
        service = SparseShardService(ps, optimizer, init[lo:hi].copy())
    comm.Barrier()  # the shards hold their blocks before anyone fetches
    return topo, layout, ps, service


def _finish(topo, ps, service):
    """Workers: stop the shards once all are done. Returns the final vector (all ranks)."""
    if topo.role is not Role.SHARD:
        topo.comm_workers.Barrier()
        if topo.worker_id == 0:
            request_stop(ps)
    else:
        service.serve()
    block = service.params.copy() if service else np.zeros(0, np.float32)
    final = np.concatenate(comm.allgather(block)[:topo.cfg.shards])
    comm.Barrier()
    ps.free()
    topo.free()
    return final


def test_row_layout_keeps_rows_whole():
    for shards in (1, 2, 3, 5):
        layout = row_layout(N, shards, V, D)
        assert layout.bounds[0] == 0 and layout.bounds[-1] == N
        assert all(b % D == 0 for b in layout.bounds if b <= V * D)


@pytest.mark.parametrize("shards,replicas", CONFIGS)
def test_sparse_push_changes_exactly_the_touched_rows(shards, replicas):
    """Worker 0 pushes rows {0, 3, 4, 17, 36} and the dense rest with Adagrad: exactly those
    rows and the rest change, to the values of numpy's Adagrad; every other row keeps its bits."""
    rng = np.random.default_rng(5)
    init = rng.standard_normal(N).astype(np.float32)
    lr, eps = 0.1, 1e-8
    rows = np.array([0, 3, 4, 17, 36], np.int64)
    grad_rows = rng.standard_normal((rows.size, D)).astype(np.float32)
    grad_rest = rng.standard_normal(REST).astype(np.float32)
    topo, layout, ps, service = _setup(shards, replicas, Adagrad(lr, eps), init)
    fetched = np.full(N, np.nan, np.float32)
    if topo.role is Role.REPLICA and topo.worker_id == 0:
        client = SparseClient(ps, 0, N, worker=0)
        slot = client.push_buffer()
        slot[:] = np.nan  # anything outside the packed rows and the rest must be ignored
        slot[V * D:] = grad_rest
        client.push_rows(slot, rows, grad_rows)
        client.wait_acknowledged()
        client.fetch(fetched)
    final = _finish(topo, ps, service)
    fetched = comm.bcast(fetched, root=shards)
    E0, E1 = init[:V * D].reshape(V, D), final[:V * D].reshape(V, D)
    want = E0.copy()
    ref.adagrad_rows(want, rows, grad_rows, np.zeros((V, D), np.float32), lr, eps)
    untouched = np.setdiff1d(np.arange(V), rows)
    assert np.array_equal(E1[untouched].view(np.int32), E0[untouched].view(np.int32))
    assert (E1[rows] != E0[rows]).all()
    np.testing.assert_allclose(E1, want, rtol=1e-6)
    rest = init[V * D:].copy()
    ref.adagrad_dense(rest, grad_rest, np.zeros(REST, np.float32), lr, eps)
    np.testing.assert_allclose(final[V * D:], rest, rtol=1e-6)
    np.testing.assert_array_equal(fetched, final)


@pytest.mark.parametrize("shards,replicas", CONFIGS)
def test_concurrent_sparse_pushes_applied_exactly_once(shards, replicas):
    """Every worker pushes 60 sparse pushes of random rows (integer gradients, SGD lr 1) while
    the others do: the final table is minus the sum of everything pushed, row by row."""
    pushes = 60
    topo, layout, ps, service = _setup(shards, replicas, SGD(1.0), np.zeros(N, np.float32),
                                       rows_max=12)
    total = np.zeros(N, np.float64)
    if topo.role is Role.REPLICA:
        w = topo.worker_id
        rng = np.random.default_rng(100 + w)
        client = SparseClient(ps, 0, N, worker=w, replica=topo.index)
        for _ in range(pushes):
            rows = np.unique(rng.integers(0, V, rng.integers(0, 13)))
            g = rng.integers(-3, 4, (rows.size, D)).astype(np.float32)
            slot = client.push_buffer()
            slot[V * D:] = w + 1
            client.push_rows(slot, rows, g)
            total[:V * D].reshape(V, D)[rows] += g
            total[V * D:] += w + 1
        client.wait_acknowledged()
    final = _finish(topo, ps, service)  # shards serve until every worker is done
    total = comm.allreduce(total)
    np.testing.assert_array_equal(final, -total.astype(np.float32))


@pytest.mark.parametrize("shards,replicas", CONFIGS)
def test_fetch_rows_reads_only_the_rows_asked(shards, replicas):
    """fetch_rows fills the rows asked and the dense rest with the shards' values, leaves every
    other row of the local table alone, and counts exactly those bytes."""
    init = np.arange(N, dtype=np.float32) * 0.5 - 3
    topo, layout, ps, service = _setup(shards, replicas, SGD(1.0), init)
    if topo.role is Role.REPLICA:
        client = SparseClient(ps, 0, N, worker=topo.worker_id, replica=topo.index)
        for rows in (np.array([0, 36]), np.arange(0, V, 3), np.array([], np.int64),
                     np.arange(V)):
            got = np.full(N, np.nan, np.float32)
            nbytes = client.fetch_rows(got, rows.astype(np.int64))
            E, E0 = got[:V * D].reshape(V, D), init[:V * D].reshape(V, D)
            np.testing.assert_array_equal(E[rows], E0[rows])
            assert np.isnan(np.delete(E, rows, axis=0)).all()
            np.testing.assert_array_equal(got[V * D:], init[V * D:])
            assert nbytes == 4 * (rows.size * D + REST)
    _finish(topo, ps, service)
