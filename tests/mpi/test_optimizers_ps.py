"""Momentum and Adam at the shards (dbmpi.optim.rules through dbmpi.ps) against serial numpy.

Shards first, then one worker (no coordinator, as tests/mpi/test_ps.py), at any number of ranks
>= 2. The worker pushes 200 seeded gradients, dense or sparse; since one worker's pushes are
applied in order, the shards' parameters must equal a serial float64 numpy implementation
written here from the papers' formulas (PyTorch's forms), not from dbmpi's code. Each push is
applied in several pieces (APPLY_CHUNK shrunk), so the state is cut as the block is.
"""

import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.config import TopologyConfig
from dbmpi.optim import Adam, Momentum
from dbmpi.ps import ParameterServer, ParamLayout, PSClient, ShardService
from dbmpi.ps.server import request_stop
from dbmpi.ps.sparse import SparseClient, SparseParameterServer, SparseShardService, row_layout
from dbmpi.topology import Role, Topology

comm = MPI.COMM_WORLD
size = comm.Get_size()
PUSHES = 200
LR = 0.01
V, D, REST = 41, 6, 29  # sparse: a 41 x 6 table, then 29 dense parameters
N = V * D + REST
RULES = {"momentum": lambda: Momentum(LR, momentum=0.9),
         "adam": lambda: Adam(LR, beta1=0.8, beta2=0.99, eps=1e-6)}


@pytest.fixture(autouse=True, params=[True, False], ids=["shared-memory", "rma"])
def data_path(request, monkeypatch):
    from dbmpi.ps import rma, server

    monkeypatch.setattr(rma, "SHARED_MEMORY", request.param)
    monkeypatch.setattr(server, "APPLY_CHUNK", 7)
    return request.param


class Reference:
    """Serial float64 momentum / Adam on a whole vector; ``mask`` = the coordinates a push
    updates (all of them for dense pushes, the pushed rows and the dense rest for sparse ones:
    a row never pushed keeps its state, as PyTorch's SparseAdam)."""

    def __init__(self, rule: str, p0: np.ndarray):
        self.rule, self.p = rule, p0.astype(np.float64)
        self.m, self.v, self.t = (np.zeros_like(self.p) for _ in range(3))

    def push(self, g: np.ndarray, mask: np.ndarray) -> None:
        g = g.astype(np.float64)
        if self.rule == "momentum":
            self.m[mask] = 0.9 * self.m[mask] + g[mask]
            self.p[mask] -= LR * self.m[mask]
            return
        b1, b2, eps = 0.8, 0.99, 1e-6
        self.t[mask] += 1
        self.m[mask] = b1 * self.m[mask] + (1 - b1) * g[mask]
        self.v[mask] = b2 * self.v[mask] + (1 - b2) * g[mask] ** 2
        mhat = self.m[mask] / (1 - b1 ** self.t[mask])
        vhat = self.v[mask] / (1 - b2 ** self.t[mask])
        self.p[mask] -= LR * mhat / (np.sqrt(vhat) + eps)


def _gradient(k: int, n: int) -> np.ndarray:
    return np.random.default_rng(1000 + k).standard_normal(n).astype(np.float32)


def _run(sparse: bool, rule: str):
    shards = size - 1
    topo = Topology.create(TopologyConfig(shards=shards, replicas=1), comm, coordinator=False)
    init = np.random.default_rng(7).standard_normal(N).astype(np.float32)
    if sparse:
        layout = row_layout(N, shards, V, D)
        ps = SparseParameterServer(topo, layout, [(0, N)], V, D, V)
    else:
        layout = ParamLayout.even(N, shards)
        ps = ParameterServer(topo, layout, [(0, N)])
    ref = Reference(rule, init)
    if topo.role is Role.SHARD:
        lo, hi = layout.block(topo.index)
        service = (SparseShardService if sparse else ShardService)(ps, RULES[rule](),
                                                                   init[lo:hi].copy())
    comm.Barrier()
    if topo.role is Role.SHARD:
        service.serve()
    else:
        client = (SparseClient if sparse else PSClient)(ps, 0, N, worker=0)
        for k in range(PUSHES):
            g = _gradient(k, N)
            mask = np.ones(N, bool)
            slot = client.push_buffer()
            if sparse:
                rng = np.random.default_rng(k)
                rows = np.unique(rng.integers(0, V, rng.integers(1, 9)))
                table = np.zeros((V, D), np.float32)
                table[rows] = g[:V * D].reshape(V, D)[rows]
                g[:V * D] = table.ravel()
                mask[:V * D] = np.isin(np.arange(V * D) // D, rows)
                slot[V * D:] = g[V * D:]
                client.push_rows(slot, rows, table[rows])
            else:
                slot[:] = g
                client.push(slot)
            ref.push(g, mask)
        client.wait_acknowledged()
        request_stop(ps)
    block = service.params.copy() if topo.role is Role.SHARD else np.zeros(0, np.float32)
    final = np.concatenate(comm.allgather(block)[:shards])
    comm.Barrier()
    ps.free()
    topo.free()
    return final, comm.bcast(ref.p if topo.role is Role.REPLICA else None, root=size - 1), init


@pytest.mark.parametrize("rule", sorted(RULES))
def test_dense_pushes_equal_serial_numpy(rule):
    final, want, init = _run(False, rule)
    assert np.abs(want - init).max() > 0.1  # training moved the parameters
    np.testing.assert_allclose(final, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_sparse_pushes_equal_serial_numpy(rule):
    """Rows a push does not carry keep their values and their state (lazy row updates)."""
    final, want, init = _run(True, rule)
    assert np.abs(want - init).max() > 0.1
    np.testing.assert_allclose(final, want, rtol=1e-4, atol=1e-5)
