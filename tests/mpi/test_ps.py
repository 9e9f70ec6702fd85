"""The parameter-server protocol (dbmpi.ps) at any number of ranks >= 2.

Roles are laid out without a coordinator (shards first, then workers) so that the protocol is
exercised even at 2 ranks. Every check is made on data gathered from all ranks.
"""

import time

import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.config import TopologyConfig
from dbmpi.optim import SGD, Adagrad
from dbmpi.ps import ParameterServer, ParamLayout, PSClient, ShardService
from dbmpi.ps.server import request_stop
from dbmpi.topology import Role, Topology

comm = MPI.COMM_WORLD
size = comm.Get_size()

# (shards, replicas) that fit this many ranks with no coordinator
CONFIGS = [(s, size - s) for s in (1, 2, 3) if size - s >= 1]


@pytest.fixture(autouse=True, params=[True, False], ids=["shared-memory", "rma"])
def data_path(request, monkeypatch):
    """Every test runs with bulk data through on-node shared memory and through RMA calls
    (what ranks on different nodes use)."""
    import dbmpi.ps.rma as rma

    monkeypatch.setattr(rma, "SHARED_MEMORY", request.param)
    return request.param


def _setup(shards, replicas, n, optimizer, init):
    topo = Topology.create(TopologyConfig(shards=shards, replicas=replicas), comm,
                           coordinator=False)
    layout = ParamLayout.even(n, shards)
    ps = ParameterServer(topo, layout, [(0, n)])
    service = None
    if topo.role is Role.SHARD:
        lo, hi = layout.block(topo.index)
        service = ShardService(ps, optimizer, init[lo:hi].copy())
    return topo, layout, ps, service


def _teardown(topo, ps):
    comm.Barrier()
    ps.free()
    topo.free()


@pytest.mark.parametrize("shards,replicas", CONFIGS)
def test_every_push_applied_exactly_once(shards, replicas):
    """Workers push integer gradients concurrently; with SGD(lr=1) from zero the final
    parameters are exactly minus the sum of everything pushed: nothing lost, nothing doubled,
    although each worker has up to NSLOTS (2) pushes in flight while the shards apply. Fetches
    racing the updates only ever see whole multiples of the pattern: no NaN, no value that no
    sequence of pushes produced."""
    n, pushes = 1237, 150  # n prime: shard edges fall at odd places
    pattern = (np.arange(n) % 7 + 1).astype(np.float32)
    topo, layout, ps, service = _setup(shards, replicas, n, SGD(1.0), np.zeros(n, np.float32))
    rng = np.random.default_rng(comm.Get_rank())
    bad_fetches = 0
    applied = -1
    if topo.role is Role.SHARD:
        applied = service.serve()
    else:
        w = topo.worker_id
        client = PSClient(ps, 0, n, worker=w, replica=topo.index)
        fetched = np.empty(n, np.float32)
        for k in range(pushes):
            client.push((w + 1) * pattern)
            if k % 10 == 0:
                client.fetch(fetched)
                # every element is minus a whole number of pushes' worth: no torn or foreign value
                ratio = -fetched / pattern
                bad_fetches += int(not np.all(np.isfinite(fetched))
                                   or not np.allclose(ratio, np.round(ratio))
                                   or ratio.min() < 0)
            if rng.random() < 0.2:
                time.sleep(rng.random() * 1e-3)
        client.wait_acknowledged()
        staleness = client.drain_staleness()
        assert all([k for k, _ in s] == list(range(1, pushes + 1)) for s in staleness)
        topo.comm_workers.Barrier()
        if topo.worker_id == 0:
            request_stop(ps)
    # gather the final blocks from the shards
    block = service.params.copy() if service else np.zeros(0, np.float32)
    blocks = comm.allgather(block)
    final = np.concatenate(blocks[:shards])
    expected = -pushes * sum(w + 1 for w in range(replicas)) * pattern
    np.testing.assert_array_equal(final, expected)
    assert comm.allreduce(bad_fetches) == 0
    totals = comm.allgather(applied)[:shards]
    assert totals == [pushes * replicas] * shards
    _teardown(topo, ps)


@pytest.mark.parametrize("shards,replicas", CONFIGS)
def test_read_own_pushes_fetch_sees_own_update(shards, replicas):
    """With read_own_pushes, worker 0's fetch after its push reflects it exactly (Adagrad)."""
    n = 101
    init = np.linspace(-1, 1, n).astype(np.float32)
    opt = Adagrad(0.1, eps=1e-8)
    topo, layout, ps, service = _setup(shards, replicas, n, opt, init)
    if topo.role is Role.SHARD:
        service.serve()
    else:
        client = PSClient(ps, 0, n, worker=topo.worker_id, replica=topo.index)
        if topo.worker_id == 0:
            params, accum = init.copy(), np.zeros(n, np.float32)
            got = np.empty(n, np.float32)
            rng = np.random.default_rng(0)
            for _ in range(20):
                g = rng.standard_normal(n).astype(np.float32)
                client.push(g)
                client.fetch(got, read_own_pushes=True)
                accum += g * g
                params -= 0.1 * g / (np.sqrt(accum) + 1e-8)
                np.testing.assert_allclose(got, params, rtol=1e-5, atol=1e-6)
            assert client.drain_staleness() == [[(k, 0) for k in range(1, 21)]] * len(
                client.segments)
        topo.comm_workers.Barrier()
        if topo.worker_id == 0:
            request_stop(ps)
    _teardown(topo, ps)


def test_accumulating_in_the_push_slot():
    """Gradients summed straight into the slot from push_buffer (Downpour with n_push > 1)
    arrive exactly, with slots reused while the shards still pull the previous push."""
    shards, replicas = CONFIGS[0]
    n, pushes = 997, 40
    topo, layout, ps, service = _setup(shards, replicas, n, SGD(1.0), np.zeros(n, np.float32))
    if topo.role is Role.SHARD:
        service.serve()
    else:
        w = topo.worker_id
        client = PSClient(ps, 0, n, worker=w, replica=topo.index)
        for k in range(pushes):
            slot = client.push_buffer()
            slot[:] = 1.0
            slot += np.arange(n, dtype=np.float32) * (w + 1)
            client.push(slot)
        client.wait_acknowledged()
        topo.comm_workers.Barrier()
        if w == 0:
            request_stop(ps)
    block = service.params.copy() if service else np.zeros(0, np.float32)
    final = np.concatenate(comm.allgather(block)[:shards])
    expected = -pushes * (replicas + np.arange(n, dtype=np.float32)
                          * sum(w + 1 for w in range(replicas)))
    np.testing.assert_array_equal(final, expected)
    _teardown(topo, ps)


def test_shard_refuses_a_non_finite_push_before_it_reaches_the_parameters(monkeypatch):
    """A NaN deep inside a push (applied in several chunks): the shard raises, naming the worker,
    and no parameter from the NaN's block on was touched (nothing non-finite was applied)."""
    import dbmpi.ps.server as server
    from dbmpi.errors import TrainingError

    monkeypatch.setattr(server, "APPLY_CHUNK", 1000)  # several chunks per push
    n, bad = 10_000, 5_500
    topo, layout, ps, service = _setup(1, size - 1, n, SGD(1.0), np.zeros(n, np.float32))
    if topo.role is Role.SHARD:
        deadline = time.monotonic() + 60
        with pytest.raises(TrainingError, match=r"worker 0 pushed a gradient holding NaN"):
            while time.monotonic() < deadline:
                service.poll()
                time.sleep(1e-3)
        # a prefix before the NaN (whole pieces already applied) holds the update, nothing
        # from the refused piece on was written: no NaN reached the parameters
        k = int(np.argmax(service.params != -1.0))
        assert k <= bad
        assert np.all(service.params[:k] == -1.0) and np.all(service.params[k:] == 0.0)
    elif topo.worker_id == 0:
        g = np.ones(n, np.float32)
        g[bad] = np.nan
        PSClient(ps, 0, n, worker=0, replica=0).push(g)
    _teardown(topo, ps)
