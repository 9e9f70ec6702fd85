"""COMM_WORLD split into roles, at any number of ranks."""

import pytest
from mpi4py import MPI

from dbmpi.config import TopologyConfig
from dbmpi.errors import TopologyError
from dbmpi.topology import Role, Topology, role_of

comm = MPI.COMM_WORLD
size, rank = comm.Get_size(), comm.Get_rank()


def _configs():
    out = [(TopologyConfig(shards=1, replicas=size - 1), False)]
    if size >= 3:
        out.append((TopologyConfig(shards=1, replicas=size - 2), True))
    if size >= 4:
        out.append((TopologyConfig(shards=size - 3, replicas=1, partitions=2), True))
    return out


@pytest.mark.parametrize("cfg,coord", _configs())
def test_split_roles_and_communicators(cfg, coord):
    topo = Topology.create(cfg, comm, coordinator=coord)
    roles = comm.allgather((int(topo.role), topo.index, topo.partition))
    expected = [tuple(map(int, role_of(cfg, r, coord))) for r in range(size)]
    assert roles == expected
    n_shard = sum(1 for r in roles if r[0] == Role.SHARD)
    assert n_shard == cfg.shards
    if topo.role is Role.SHARD:
        assert topo.comm_shards.Get_size() == cfg.shards
        assert topo.comm_shards.Get_rank() == topo.index
        assert topo.shard_rank(topo.index) == rank
    else:
        assert topo.comm_shards == MPI.COMM_NULL
    if topo.role is Role.REPLICA:
        assert topo.comm_replica.Get_size() == cfg.partitions
        assert topo.comm_replica.Get_rank() == topo.partition
        assert topo.comm_workers.Get_size() == cfg.replicas * cfg.partitions
        assert topo.worker_rank(topo.index, topo.partition) == rank
    else:
        assert topo.comm_replica == MPI.COMM_NULL
    topo.free()


def test_wrong_size_fails_on_every_rank():
    cfg = TopologyConfig(shards=2, replicas=size)  # needs size + 3 ranks
    with pytest.raises(TopologyError, match=f"needs {size + 3} MPI ranks .* this job has {size}"):
        Topology.create(cfg, comm)
