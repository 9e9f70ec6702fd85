"""Sandblaster's shard-local vector service (dbmpi.ps.vector) at any number of ranks >= 2.

Rank 0 is the coordinator, then S shards, then R replicas (R may be 0). The coordinator
checks remote results against the same operations on whole vectors in one process.
"""

import time

import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.config import TopologyConfig
from dbmpi.optim.lbfgs import GW, LBFGS, NumpySpace, W, X, num_vectors
from dbmpi.ps.layout import ParamLayout
from dbmpi.ps.vector import ShardVectors, VectorClient, VectorShard, VectorWindows
from dbmpi.topology import Role, Topology

comm = MPI.COMM_WORLD
size = comm.Get_size()
N = 1009  # prime: shard edges fall at odd places
NV = 8

# (shards, replicas) that fit this many ranks with a coordinator
CONFIGS = [(s, size - 1 - s) for s in (1, 2, 3) if size - 1 - s >= 0]


def _vectors(count, seed=7):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(N) for _ in range(count)]


def _setup(shards, replicas, count=NV, init=None):
    topo = Topology.create(TopologyConfig(shards=shards, replicas=replicas), comm)
    layout = ParamLayout.even(N, shards)
    win = VectorWindows(topo, layout)
    init = _vectors(count) if init is None else init
    shard = None
    if topo.role is Role.SHARD:
        lo, hi = layout.block(topo.index)
        shard = VectorShard(win, count, init[0][lo:hi].copy())
        for h in range(1, count):
            shard.init_vector(h, init[h][lo:hi])
    comm.Barrier()
    return topo, win, shard, init


def _teardown(topo, win):
    comm.Barrier()
    win.free()
    topo.free()


@pytest.mark.parametrize("shards,replicas", CONFIGS)
def test_remote_ops_equal_local_ops(shards, replicas):
    topo, win, shard, init = _setup(shards, replicas)
    if shard is not None:
        assert shard.serve() > 0
    elif topo.role is Role.COORDINATOR:
        remote, local = ShardVectors(win), NumpySpace([v.copy() for v in init])
        for sp in (remote, local):
            sp.lincomb(3, 2.0, 1, -0.5, 2)
            sp.axpy(0, 0.25, 3)  # W changes: replicas would see it
            sp.scale(4, -3.0)
            sp.copy(5, 4)
            sp.mul(6, 5, 1)
            sp.lincomb(7, 1.0, 7, 1.0, 7)  # aliasing
        pairs = [(a, b) for a in range(NV) for b in range(a, NV)]
        np.testing.assert_allclose(remote.dots(pairs), local.dots(pairs), rtol=1e-12)
        w = np.empty(N)
        VectorClient(win).fetch(w)
        np.testing.assert_array_equal(w, local.v[0])
        remote.stop()
    _teardown(topo, win)


class DiagonalQuadratic:
    """f(W) = 1/2 sum a_i (w_i - c_i)^2 through vector ops only: A and C are vectors 5+2(m+1)
    and the next one; the gradient a * (W - C) is formed coefficient-wise where W lives."""

    def __init__(self, space, history):
        self.sp = space
        self.A = num_vectors(history)
        self.C = self.A + 1

    def begin_iteration(self, iteration):
        return False

    def evaluate(self, dots):
        sp = self.sp
        sp.lincomb(GW, 1.0, W, -1.0, self.C)
        sp.mul(GW, GW, self.A)
        sp.lincomb(self.C + 1, 1.0, W, -1.0, self.C)  # scratch: W - C
        out = sp.dots(list(dots) + [(GW, self.C + 1)])
        return 0.5 * out[-1], out[:-1]


@pytest.mark.parametrize("shards,replicas", CONFIGS)
@pytest.mark.parametrize("line_search", ["wolfe", "armijo"])
def test_lbfgs_on_shards_equals_lbfgs_in_one_process(shards, replicas, line_search):
    m = 4
    count = num_vectors(m) + 3
    vecs = [np.zeros(N) for _ in range(count)]
    rng = np.random.default_rng(1)
    vecs[X] = rng.standard_normal(N)
    vecs[W] = vecs[X].copy()
    vecs[num_vectors(m)] = np.geomspace(1.0, 1e3, N)  # A: condition number 1000
    vecs[num_vectors(m) + 1] = rng.standard_normal(N)  # C: the minimiser
    topo, win, shard, _ = _setup(shards, replicas, count, vecs)
    if shard is not None:
        shard.serve()
    elif topo.role is Role.COORDINATOR:
        runs = []
        for space in (ShardVectors(win), NumpySpace([v.copy() for v in vecs])):
            opt = LBFGS(space, DiagonalQuadratic(space, m), m, line_search)
            recs = opt.run(25)
            runs.append(np.array([[r.loss, r.grad_norm, r.step, r.evals] for r in recs]))
        np.testing.assert_allclose(runs[0], runs[1], rtol=1e-9)
        assert runs[0][-1, 0] < 1e-2 * runs[0][0, 0]  # it trains
        space = opt.space
        w = np.empty(N)
        VectorClient(win).fetch(w)
        np.testing.assert_allclose(w, space.v[W], rtol=1e-9, atol=1e-12)
        ShardVectors(win).stop()
    _teardown(topo, win)


@pytest.mark.parametrize("shards,replicas", [c for c in CONFIGS if c[1] >= 1])
def test_concurrent_pushes_each_count_once(shards, replicas):
    """Replicas push integer gradients concurrently; END_EVAL waits for every example and the
    gradient is exactly their sum over N examples."""
    pushes, per_push = 40, 3
    topo, win, shard, _ = _setup(shards, replicas, 4, [np.zeros(N)] * 4)
    pattern = (np.arange(N) % 5 + 1).astype(np.float64)
    if shard is not None:
        shard.serve()
    elif topo.role is Role.COORDINATOR:
        vec = ShardVectors(win)
        total = 0
        for round_ in range(3):
            vec.begin_eval()
            vec.flush()
            for r in range(replicas):
                comm.send(round_, dest=topo.worker_rank(r), tag=7)
            total += replicas * pushes * per_push
            n = replicas * pushes * per_push
            vec.end_eval(GW, n, total, 0.0)
            (gg,) = vec.dots([(GW, GW)])
            vec.copy(W, GW)
            vec.flush()
            g = np.empty(N)
            VectorClient(win).fetch(g)
            expected = sum(r + 1 for r in range(replicas)) * pushes * pattern / n
            np.testing.assert_allclose(g, expected, rtol=1e-12)
            assert gg == pytest.approx(expected @ expected, rel=1e-12)
        vec.stop()
    else:
        client = VectorClient(win)
        rng = np.random.default_rng(topo.index)
        for _ in range(3):
            comm.recv(source=0, tag=7)
            for _ in range(pushes):
                client.push((topo.index + 1) * pattern, per_push)
                if rng.random() < 0.2:
                    time.sleep(rng.random() * 1e-4)
    _teardown(topo, win)
