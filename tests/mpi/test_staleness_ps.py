"""Staleness-aware steps at the shards (``downpour.staleness_aware``, Zhang et al. 2016): a
push's learning rate is divided by its staleness, the other workers' pushes applied between
its fetch and itself. Two workers push in an order set by barriers, so every push's staleness
is known in advance; with SGD the shards' parameters must equal that serial sum, computed
here in float64. Shards first, then the two workers (no coordinator); needs >= 3 ranks."""

import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.config import TopologyConfig
from dbmpi.optim import SGD
from dbmpi.ps import ParameterServer, ParamLayout, PSClient, ShardService
from dbmpi.ps.server import request_stop
from dbmpi.topology import Role, Topology

comm = MPI.COMM_WORLD
size = comm.Get_size()
N, LR = 1000, 0.1
# (worker, fetch again first?, the push's staleness): both fetch at the start; B pushes twice
# (0, 0); A pushes twice on its first fetch (B's 2 were applied since: 2, 2); B fetches again
# and pushes (nothing applied since: 0); A pushes on its first fetch still (B's 3: 3)
SCRIPT = [("B", False, 0), ("B", False, 0), ("A", False, 2), ("A", False, 2), ("B", True, 0),
          ("A", False, 3)]


def _gradient(k: int) -> np.ndarray:
    return np.random.default_rng(500 + k).standard_normal(N).astype(np.float32)


def _run(aware: bool):
    shards = size - 2
    topo = Topology.create(TopologyConfig(shards=shards, replicas=2), comm, coordinator=False)
    init = np.random.default_rng(3).standard_normal(N).astype(np.float32)
    layout = ParamLayout.even(N, shards)
    ps = ParameterServer(topo, layout, [(0, N)])
    if topo.role is Role.SHARD:
        lo, hi = layout.block(topo.index)
        service = ShardService(ps, SGD(LR), init[lo:hi].copy(), staleness_aware=aware)
    comm.Barrier()
    records = []
    if topo.role is Role.SHARD:
        service.serve()
    else:
        me = "AB"[topo.index]
        client = PSClient(ps, 0, N, worker=topo.index)
        client.report_fetch = aware
        buf = np.zeros(N, np.float32)
        client.fetch(buf)
        for k, (who, refetch, _) in enumerate(SCRIPT):
            if who == me:
                if refetch:
                    client.fetch(buf)
                slot = client.push_buffer()
                slot[:] = _gradient(k)
                client.push(slot)
                client.wait_acknowledged()  # applied before the next push of the script
            topo.comm_workers.Barrier()
        records = [s for per_shard in client.drain_staleness() for _, s in per_shard]
        if topo.index == 0:
            request_stop(ps)
    block = service.params.copy() if topo.role is Role.SHARD else np.zeros(0, np.float32)
    final = np.concatenate(comm.allgather(block)[:shards])
    seen = comm.allgather(records)
    comm.Barrier()
    ps.free()
    topo.free()
    return final, init, seen[shards:]


@pytest.mark.skipif(size < 3, reason="two workers and a shard: 3 ranks or more")
@pytest.mark.parametrize("aware", [True, False], ids=["staleness-aware", "plain"])
def test_each_push_moves_by_lr_over_its_staleness(aware):
    final, init, seen = _run(aware)
    want = init.astype(np.float64)
    for k, (_, _, stale) in enumerate(SCRIPT):
        want -= (LR / max(1, stale) if aware else LR) * _gradient(k)
    np.testing.assert_allclose(final, want, rtol=1e-5, atol=1e-5)
    shards = size - 2
    for w, who in enumerate("AB"):  # the workers' own records agree, on every shard
        assert seen[w] == [stale for x, _, stale in SCRIPT if x == who] * shards
